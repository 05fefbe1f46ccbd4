"""Export a VLoRA model trained with this package as a Hub-ready folder (`vlora-hf export MODEL_DIR OUTPUT_DIR`).

The folder holds everything `from_pretrained(..., trust_remote_code=True)` needs without this package: config with
`auto_map`, the modeling/processing code flat, sharded safetensors + index, the processor (image processor +
tokenizer with `<image>` and the vicuna_v1 chat template), generation_config.json and a README.md model card.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..atomic import atomic_folder
from .io import DTYPES, check_output
from .model_card import build_model_card, check_card

REQUIRED_FILES = ("config.json", "generation_config.json", "README.md", "preprocessor_config.json")


def save_processor(processor, folder: Path, config) -> bool:
    """Save a VLoRAProcessor (-> True) or an image processor alone (-> False, tokenizer missing)."""
    from transformers import ProcessorMixin

    if processor is None:
        from vlora_hf.processing import VLoRAImageProcessor

        processor = VLoRAImageProcessor.from_vision_config(config.vision_config,
                                                           image_aspect_ratio=config.image_aspect_ratio)
    if isinstance(processor, ProcessorMixin):
        token_id = getattr(processor, "image_token_id", None)
        if token_id is not None and int(token_id) != int(config.image_token_id):
            raise ValueError(
                f"the processor's {processor.image_token!r} token has id {token_id} but config.image_token_id is "
                f"{config.image_token_id}: the model would not find its images"
            )
        # The processor's length check (and the image-text-to-text pipeline's) reads this: the LLM's real limit.
        processor.tokenizer.model_max_length = int(config.text_config.max_position_embeddings)
        processor.save_pretrained(folder)
        # transformers 5 nests the image processor in processor_config.json; keep the standalone file as well
        # (AutoImageProcessor, older readers and Hub tooling look for preprocessor_config.json).
        processor.image_processor.save_pretrained(folder)
        return True
    processor.save_pretrained(folder)
    print(
        "tokenizer missing: only the image processor was saved; add a tokenizer (with an <image> token) to make "
        "AutoProcessor work",
        file=sys.stderr,
    )
    return False


def save_generation_config(folder: Path, config, generation_config=None) -> None:
    from transformers import GenerationConfig

    if generation_config is None:
        tc = config.text_config
        generation_config = GenerationConfig(
            bos_token_id=getattr(tc, "bos_token_id", None),
            eos_token_id=getattr(tc, "eos_token_id", None),
            pad_token_id=getattr(tc, "pad_token_id", None),
        )
    generation_config.save_pretrained(folder)


def write_card(folder: Path, config, *, model_id: str, base_model=None, license: str = "apache-2.0", tags=None,
               source=None, has_tokenizer: bool = True, num_parameters=None, notes=None) -> None:
    card = build_model_card(config, model_id=model_id, base_model=base_model, license=license, tags=tags,
                            source=source, has_tokenizer=has_tokenizer, num_parameters=num_parameters, notes=notes)
    card.save(folder / "README.md")
    check_card(folder / "README.md")


def check_folder(folder: Path) -> None:
    """The files a Hub-ready VLoRA folder must hold (ValueError naming the missing ones)."""
    missing = [n for n in REQUIRED_FILES if not (folder / n).is_file()]
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        missing.append("model.safetensors (or model.safetensors.index.json)")
    if not list(folder.glob("modeling_*.py")):
        missing.append("modeling_vlora.py (remote code)")
    if missing:
        raise ValueError(f"{folder} is not a complete VLoRA Hub folder: missing {missing}")


def export_folder(
    model,
    processor,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    model_id: str | None = None,
    base_model: str | list[str] | None = None,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    source: str | None = None,
    notes: list[str] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write `model` (a VLoRAForCausalLM) + `processor` as a complete Hub-ready folder, atomically.

    `processor`: a VLoRAProcessor, an image processor alone (the tokenizer is reported missing) or None (a
    default `pad` image processor sized for the tower). `dtype`: "float32" / "bfloat16" / "float16" to cast the
    saved weights (the model passed in is left untouched). `extra_files`: {name: text} written into the folder
    too, inside the same atomic write. Returns the output folder.
    """
    out_dir = Path(out_dir)
    model_id = model_id or f"your-name/{out_dir.absolute().name}"
    config = model.config
    state_dict = None
    old_dtype = getattr(config, "dtype", None)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        state_dict = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    try:
        check_output(out_dir, force)
        with atomic_folder(out_dir, replace=force) as tmp:
            if dtype is not None:
                config.dtype = DTYPES[dtype]
            model.save_pretrained(tmp, max_shard_size=max_shard_size, state_dict=state_dict)
            has_tokenizer = save_processor(processor, tmp, config)
            if not (tmp / "generation_config.json").is_file():
                save_generation_config(tmp, config, getattr(model, "generation_config", None))
            n_params = sum(p.numel() for p in model.parameters())
            write_card(tmp, config, model_id=model_id, base_model=base_model, license=license, tags=tags,
                       source=source, has_tokenizer=has_tokenizer, num_parameters=n_params, notes=notes)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            check_folder(tmp)
    finally:
        if dtype is not None:
            config.dtype = old_dtype
    return out_dir


def load_processor(model_dir: str | os.PathLike):
    """The folder's VLoRAProcessor, else its image processor alone, else None."""
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001 - no tokenizer: fall back to the image processor
        pass
    try:
        return AutoImageProcessor.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlora-hf export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a folder saved by VLoRAForCausalLM.save_pretrained (e.g. a training run)")
    parser.add_argument("output_dir", help="the Hub-ready folder to write (must be empty unless --force)")
    add_output_options(parser, dtype_help="cast the weights (default: as saved)", license_default="apache-2.0")
    return parser


def add_output_options(parser: argparse.ArgumentParser, dtype_help: str, license_default: str) -> None:
    """Options shared by `convert` and `export`: how the Hub-ready folder is written, carded and pushed."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=dtype_help)
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--model-id", default=None, help="repo id shown in the card (default: --push-to-hub)")
    parser.add_argument("--base-model", default=None, help="base_model metadata of the card (a Hub repo id)")
    parser.add_argument("--license", default=license_default, help=f"license metadata of the card (default {license_default})")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the folder afterwards")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vlora_hf import VLoRAForCausalLM

    try:
        model = VLoRAForCausalLM.from_pretrained(args.model_dir).eval()
        processor = load_processor(args.model_dir)
        out = export_folder(
            model, processor, args.output_dir, force=args.force, max_shard_size=args.max_shard_size,
            dtype=args.dtype, model_id=args.model_id or args.push_to_hub, base_model=args.base_model,
            license=args.license, source="Exported with `vlora-hf export` from a model trained with vlora_hf.",
        )
    except (ValueError, OSError) as err:
        print(f"vlora-hf export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    if args.push_to_hub:
        from .push import main as push_main

        return push_main([str(out), args.push_to_hub] + (["--private"] if args.private else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
