"""Convert the authors' VLoRA checkpoint (`feipengma/VLoRA-7b-v1` layout, model_type `llava_vlora`) to vlora_hf.

    python -m vlora_hf.conversion.convert_official --checkpoint DIR --output DIR [--vision-tower DIR]
        [--tokenizer DIR] [--dtype float32|bfloat16|float16] [--max-shard-size 5GB] [--force] [--push-to-hub REPO]

Every release tensor is mapped to exactly one of ours (the mapping is listed in docs/conversion.md): the LLM under
`model.language_model.`, the tower under `model.vision_tower.`, the generator under `model.generator.` with the
static factor `Bs` [1, T*k, h*r] split into `lora_B.{t}` [k, h, r]. The conversion fails, writing nothing, when a
release tensor is left unused or one of ours is left unset (the rotary `inv_freq` buffers are the only exception:
transformers recomputes them). The output is a complete Hub-ready folder, written to a temp folder and renamed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from .export import add_output_options
from ..atomic import atomic_folder
from .io import (DTYPES, ConversionError, check_output, iter_checkpoint, read_json, weight_files,
                 write_safetensors_shards)

# LlamaConfig fields the release's config.json carries (a LlamaConfig plus the VLoRA/LLaVA fields).
LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp", "tie_word_embeddings",
    "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "mlp_bias",
)
STRATEGIES = {"patch": "default", "cls_patch": "full"}
ASPECT_RATIOS = {"pad": "pad", "square": "square", None: "square"}
RELEASE_HEADS = 16  # the release's generator blocks always use 16 heads (its config path passes no head count)
ROTARY = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
TOWER_RELEASE = "model.vision_tower.vision_tower."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


# ----- config ------------------------------------------------------------------------------------------------
def read_release_config(checkpoint: Path) -> dict:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise ConversionError(f"{checkpoint} has no config.json: is it the release checkpoint folder?")
    cfg = read_json(path)
    if cfg.get("mm_projector_type") != "vlora":
        raise ConversionError(
            f"{path}: mm_projector_type is {cfg.get('mm_projector_type')!r}, expected 'vlora' (a VLoRA release "
            f"checkpoint, model_type llava_vlora; got model_type {cfg.get('model_type')!r})"
        )
    needed = ["vlora_dim", "vlora_depth", "vlora_pos_num", "vlora_rank", "vlora_type", "skip_layers",
              "mm_vision_select_layer", "hidden_size", "num_hidden_layers", "vocab_size"]
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise ConversionError(f"{path} lacks the release fields {missing}")
    return cfg


def resolve_tower(vision_tower: str | None, release: dict, checkpoint: Path) -> Path:
    """The CLIP folder: --vision-tower, else `mm_vision_tower` as a folder (relative to the checkpoint, absolute,
    or in the local Hugging Face cache)."""
    if vision_tower is not None:
        path = Path(vision_tower)
        if not (path / "config.json").is_file():
            raise ConversionError(f"--vision-tower {path} is not a model folder (no config.json)")
        return path
    name = release.get("mm_vision_tower") or release.get("vision_tower")
    if not name:
        raise ConversionError("the release config names no mm_vision_tower: pass --vision-tower DIR")
    for candidate in (checkpoint / name, checkpoint.parent / name, Path(name)):
        if (candidate / "config.json").is_file():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(name, local_files_only=True))
        if (cached / "config.json").is_file():
            return cached
    except Exception:  # noqa: BLE001 - not a repo id or not cached
        pass
    raise ConversionError(
        f"vision tower {name!r} (mm_vision_tower) is neither a folder next to the checkpoint nor in the local "
        f"Hugging Face cache: download it (`hf download {name} --local-dir DIR`) and pass --vision-tower DIR"
    )


def tower_vision_config(tower: Path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tower)
    return getattr(cfg, "vision_config", None) or cfg


def build_config(release: dict, vision_config):
    """VLoRAConfig from the release's config.json fields (checking they agree with each other)."""
    from transformers import LlamaConfig

    from vlora_hf import VLoRAConfig

    text = LlamaConfig(**{k: release[k] for k in LLAMA_FIELDS if k in release and release[k] is not None})
    for field, ours in (("vlora_llm_dim", text.hidden_size), ("vlora_llm_depth", text.num_hidden_layers),
                        ("vlora_visual_dim", vision_config.hidden_size), ("mm_hidden_size", vision_config.hidden_size)):
        if field in release and release[field] != ours:
            raise ConversionError(
                f"release config: {field}={release[field]} disagrees with the "
                f"{'LLM' if 'llm' in field else 'vision tower'} ({ours})"
            )
    select = release.get("mm_vision_select_feature", "patch")
    if select not in STRATEGIES:
        raise ConversionError(f"mm_vision_select_feature={select!r} is not supported (expected {sorted(STRATEGIES)})")
    aspect = release.get("image_aspect_ratio")
    if aspect not in ASPECT_RATIOS:
        raise ConversionError(f"image_aspect_ratio={aspect!r} is not supported (expected 'pad' or 'square')")
    if release.get("mm_use_im_start_end"):
        raise ConversionError("mm_use_im_start_end=True (image start/end tokens) is not supported by VLoRA models")
    return VLoRAConfig(
        text_config=text,
        vision_config=vision_config,
        vision_feature_layer=release["mm_vision_select_layer"],
        vision_feature_select_strategy=STRATEGIES[select],
        generator_hidden_size=release["vlora_dim"],
        generator_depth=release["vlora_depth"],
        generator_num_heads=RELEASE_HEADS,
        num_visual_positions=release["vlora_pos_num"],
        separate_generators=bool(release.get("weights_sep", True)),
        lora_rank=release["vlora_rank"],
        lora_alpha=release.get("vlora_alpha"),
        target_modules=release["vlora_type"],
        skip_layers=release["skip_layers"],
        image_aspect_ratio=ASPECT_RATIOS[aspect],
    )


# ----- key mapping -------------------------------------------------------------------------------------------
def expected_state(config) -> tuple[dict[str, torch.Size], str]:
    """Our state-dict names and shapes (model built on the meta device) and the tower's key prefix."""
    from vlora_hf import VLoRAForCausalLM

    with torch.device("meta"):
        model = VLoRAForCausalLM(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    # Non-persistent buffers (e.g. CLIP position_ids) are not in the state dict; persistent ones must be set.
    prefix = "model.vision_tower.vision_model." if any(
        k.startswith("model.vision_tower.vision_model.") for k in shapes) else "model.vision_tower."
    return shapes, prefix


def _tower_key(rest: str, prefix: str) -> str:
    return prefix + (rest[len("vision_model."):] if rest.startswith("vision_model.") else rest)


def map_key(name: str, config, tower_prefix: str) -> str | None:
    """Release name -> our name (None: the release's rotary buffer, recomputed by transformers). `Bs` is split
    separately (see split_bs)."""
    if ROTARY.match(name):
        return None
    if name.startswith(TOWER_RELEASE):
        return _tower_key(name[len(TOWER_RELEASE):], tower_prefix)
    if name.startswith("model.mm_projector."):
        rest = name[len("model.mm_projector."):]
        if rest in ("visual_proj.weight", "visual_proj.bias", "pos_embed"):
            return "model.generator." + rest
        match = re.match(r"^gen\.(?:(\d+)\.)?(.+)$", rest)
        if match:
            index, tail = match.groups()
            if (index is None) == config.separate_generators:
                kind = "separate (weights_sep)" if config.separate_generators else "shared"
                raise ConversionError(f"{name}: does not fit the config's {kind} generators")
            tail = re.sub(r"^decoders\.(\d+)\.", r"blocks.\1.", tail)
            return f"model.generator.decoders.{index or 0}.{tail}"
        return "model.generator." + rest  # unknown: reported by the accounting as unset/unused
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    if name == "lm_head.weight":
        return name
    return "unmapped:" + name


def split_bs(bs: torch.Tensor, config) -> dict[str, torch.Tensor]:
    """Release `Bs` [1, T*k, h*r] -> {`model.generator.lora_B.{t}`: [k, h, r]} (row-major, t in vlora_type order)."""
    targets = list(config.target_modules)
    k, r = len(config.receiving_layers), config.lora_rank
    h = config.text_config.hidden_size
    if tuple(bs.shape) != (1, len(targets) * k, h * r):
        raise ConversionError(
            f"model.mm_projector.Bs has shape {list(bs.shape)}, expected [1, {len(targets)}*{k}, {h}*{r}] "
            f"(targets {targets}, {k} receiving layers, hidden {h}, rank {r})"
        )
    blocks = bs.reshape(len(targets), k, h, r)
    return {f"model.generator.lora_B.{t}": blocks[i].clone() for i, t in enumerate(targets)}


def convert_state(checkpoint: Path, tower: Path | None, config, dtype: torch.dtype) -> tuple[dict, list[str], int]:
    """Read and map every tensor; returns (our state dict, ignored release names, tensors taken from the tower)."""
    shapes, tower_prefix = expected_state(config)
    ours: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unused, ignored, bad_shape = [], [], []

    def put(target: str, value: torch.Tensor, source: str) -> None:
        if target not in shapes:
            unused.append(source)
            return
        if target in ours:
            raise ConversionError(f"{source} and {origin[target]} both map to {target}")
        if tuple(value.shape) != tuple(shapes[target]):
            bad_shape.append(f"{source} {list(value.shape)} -> {target} {list(shapes[target])}")
            return
        ours[target] = value.to(dtype) if value.is_floating_point() else value
        origin[target] = source

    for name, value in iter_checkpoint(checkpoint, desc="reading"):
        if name == "model.mm_projector.Bs":
            for target, b in split_bs(value, config).items():
                put(target, b, name)
            continue
        target = map_key(name, config, tower_prefix)
        if target is None:
            ignored.append(name)
        else:
            put(target, value, name)

    from_tower = 0
    tower_missing = [k for k in shapes if k.startswith("model.vision_tower.") and k not in ours]
    if tower_missing:
        if tower is None:
            raise ConversionError(f"the checkpoint lacks {len(tower_missing)} vision tower tensors and no tower folder was found")
        for name, value in iter_checkpoint(tower, desc="reading tower"):
            if name.startswith(("text_model.", "visual_projection", "text_projection", "logit_scale")):
                continue  # the text half of a full CLIP checkpoint
            target = _tower_key(name, tower_prefix)
            if target in shapes and target not in ours:
                put(target, value, f"{tower.name}/{name}")
                from_tower += 1

    unset = sorted(k for k in shapes if k not in ours)
    if unused or unset or bad_shape:
        parts = []
        if unused:
            parts.append(f"{len(unused)} release tensors not used by the conversion: {sorted(unused)}")
        if unset:
            parts.append(f"{len(unset)} of our tensors left unset: {unset}")
        if bad_shape:
            parts.append(f"{len(bad_shape)} shape mismatches: {bad_shape}")
        raise ConversionError("key accounting failed: " + "; ".join(parts))
    return ours, sorted(ignored), from_tower


# ----- processor ---------------------------------------------------------------------------------------------
def find_tokenizer(tokenizer: str | None, checkpoint: Path) -> Path | None:
    if tokenizer is not None:
        path = Path(tokenizer)
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ConversionError(f"--tokenizer {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        return path
    if any((checkpoint / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return checkpoint
    return None


def build_processor(tower: Path | None, tokenizer_dir: Path | None, config):
    """(VLoRAProcessor, or the image processor alone when there is no tokenizer)."""
    from vlora_hf.processing import VICUNA_V1_TEMPLATE, VLoRAImageProcessor, VLoRAProcessor

    image_processor = VLoRAImageProcessor.from_vision_config(config.vision_config, tower,
                                                             image_aspect_ratio=config.image_aspect_ratio)
    if tokenizer_dir is None:
        return image_processor
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token  # what the release does for vicuna_v1
    tokenizer.chat_template = VICUNA_V1_TEMPLATE
    return VLoRAProcessor(image_processor=image_processor, tokenizer=tokenizer)


def release_generation_config(checkpoint: Path, config):
    from transformers import GenerationConfig

    if (checkpoint / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(checkpoint)
    return None


# ----- writing -----------------------------------------------------------------------------------------------
def save_config_and_code(config, folder: Path) -> None:
    """config.json ready for `trust_remote_code`, and the modeling files beside it: what `save_pretrained` writes
    (transformers' `custom_object_save` copies the model's file and its relative imports the same way)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from vlora_hf.modeling import modeling_vlora

    modeling_vlora.remote_code_config(config)
    config.architectures = ["VLoRAForCausalLM"]
    config.save_pretrained(folder)
    for source in (modeling_vlora.__file__, *get_relative_import_files(modeling_vlora.__file__)):
        shutil.copyfile(source, folder / Path(source).name)


def convert(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    vision_tower: str | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    model_id: str | None = None,
    base_model: str | None = None,
    license: str = "other",
) -> Path:
    """Convert a release checkpoint folder into a Hub-ready vlora_hf folder at `output` (atomically)."""
    from .export import check_folder, save_generation_config, save_processor, write_card

    checkpoint, output = Path(checkpoint), Path(output)
    check_output(output, force)
    release = read_release_config(checkpoint)
    weight_files(checkpoint)  # fail early without weights
    tower = resolve_tower(vision_tower, release, checkpoint)
    config = build_config(release, tower_vision_config(tower))
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    target_dtype = DTYPES.get(dtype or release.get("torch_dtype") or release.get("dtype") or "float32", torch.float32)
    config.dtype = target_dtype

    tokenizer_dir = find_tokenizer(tokenizer, checkpoint)
    processor = build_processor(tower, tokenizer_dir, config)
    if tokenizer_dir is not None:
        config.image_token_id = int(processor.image_token_id)

    state, ignored, from_tower = convert_state(checkpoint, tower, config, target_dtype)
    n_params = sum(t.numel() for t in state.values())
    model_id = model_id or f"your-name/{output.absolute().name}"
    with atomic_folder(output, replace=force) as tmp:
        write_safetensors_shards(state, tmp, max_shard_size)
        del state
        save_config_and_code(config, tmp)
        has_tokenizer = save_processor(processor, tmp, config)
        save_generation_config(tmp, config, release_generation_config(checkpoint, config))
        source = (f"Converted from the authors' release checkpoint"
                  f"{f' [{base_model}](https://huggingface.co/{base_model})' if base_model else ''} with "
                  f"`vlora-hf convert` (every tensor mapped; logits match the release within 1e-4 in fp32).")
        write_card(tmp, config, model_id=model_id, base_model=base_model, license=license, source=source,
                   has_tokenizer=has_tokenizer, num_parameters=n_params)
        check_folder(tmp)
    print(f"converted {checkpoint} -> {output} ({n_params:,} parameters, {str(target_dtype).replace('torch.', '')})")
    if from_tower:
        print(f"  {from_tower} vision tower tensors taken from {tower}")
    if ignored:
        print(f"  ignored {len(ignored)} rotary buffers (recomputed by transformers): {', '.join(ignored)}")
    if tokenizer_dir is None:
        print("  tokenizer missing: saved the image processor only; pass --tokenizer DIR (Vicuna's) for a full processor")
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlora-hf convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the release checkpoint folder (config.json + weights)")
    parser.add_argument("--output", required=True, help="the Hub-ready folder to write (must be empty unless --force)")
    parser.add_argument("--vision-tower", default=None,
                        help="CLIP folder (default: mm_vision_tower, relative to the checkpoint or in the HF cache)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's, if any)")
    add_output_options(parser, dtype_help="default: the release's torch_dtype", license_default="other")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = convert(args.checkpoint, args.output, vision_tower=args.vision_tower, tokenizer=args.tokenizer,
                      dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force,
                      model_id=args.model_id or args.push_to_hub, base_model=args.base_model, license=args.license)
    except (ValueError, OSError) as err:
        print(f"vlora-hf convert: error: {err}", file=sys.stderr)
        return 2
    if args.push_to_hub:
        from .push import main as push_main

        return push_main([str(out), args.push_to_hub] + (["--private"] if args.private else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
