"""Write the backbone of one of our checkpoints as a folder vLLM loads (config, weights, tokenizer).

vLLM serves the plain text backbone; each image arrives later as a LoRA adapter. Targets q/k/v/o and
gate/up/down are linears vLLM's LoRA already wraps, so a checkpoint without target `m` keeps its backbone's own
architecture. Target `m` (a delta beside the whole MLP) needs our out-of-tree class, named in `config.json` with
the receiving layers it adds the zero h→h linear to.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..atomic import atomic_folder
from ..conversion.io import iter_checkpoint, weight_files, write_safetensors_shards
from .plugin import MLP_DELTA_ARCH

# Backbones whose vLLM decoder our `m` class extends (vLLM runs Mistral through its Llama code as well).
MLP_DELTA_BACKBONES = ("llama", "mistral")
LANGUAGE_PREFIX = "model.language_model."
MANIFEST = "vlora_serving.json"
FORMAT_VERSION = 1


def serving_config(config) -> dict:
    """The backbone's config.json for vLLM: the text config, plus the `m` layers when the model targets `m`."""
    text = config.text_config.to_dict()
    text.pop("architectures", None)
    arch = type(config.text_config).__name__.replace("Config", "ForCausalLM")
    if "m" in config.target_modules:
        if text["model_type"] not in MLP_DELTA_BACKBONES:
            raise ValueError(
                f"target 'm' is served through vLLM's Llama decoder; a {text['model_type']!r} backbone with target "
                f"'m' is not supported (supported: {MLP_DELTA_BACKBONES})"
            )
        arch = MLP_DELTA_ARCH
        text["vlora_mlp_delta_layers"] = list(config.receiving_layers)
    text["architectures"] = [arch]
    text["vlora_image_token_id"] = int(config.image_token_id)  # the renderer drops it from served prompts
    text["tie_word_embeddings"] = bool(getattr(config, "tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return text


def backbone_state(model_dir) -> dict:
    """The language model's tensors under vLLM's Llama names (`model.layers...`, `lm_head.weight`)."""
    state = {}
    for name, tensor in iter_checkpoint(model_dir, desc="exporting the backbone of"):
        if name.startswith(LANGUAGE_PREFIX):
            state["model." + name[len(LANGUAGE_PREFIX):]] = tensor
        elif name == "lm_head.weight":
            state[name] = tensor
    if not state:
        raise ValueError(f"{model_dir} holds no backbone tensors (expected names starting with {LANGUAGE_PREFIX!r})")
    return state


def source_fingerprint(model_dir) -> str:
    """Changes whenever the checkpoint's config or weights change (sizes and mtimes, not contents: cheap)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256(f"v{FORMAT_VERSION}:{model_dir.resolve()}".encode())
    for path in [model_dir / "config.json", *weight_files(model_dir)]:
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def export_for_vllm(model_dir, output, force: bool = False, pad_head_dim: int | None = None) -> Path:
    """Write `output`: config.json, safetensors weights, tokenizer (+ chat template), generation config.

    `pad_head_dim` (measurements only, see pad_heads.py): the attention embedded exactly in that head size."""
    from .. import VLoRAConfig
    from ..processing import VLoRAProcessor

    model_dir = Path(model_dir)
    config = VLoRAConfig.from_pretrained(model_dir)
    text = serving_config(config)
    try:
        processor = VLoRAProcessor.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):  # no tokenizer: vLLM can still run token ids (skip_tokenizer_init)
        processor = None
    state = backbone_state(model_dir)
    if pad_head_dim is not None:
        from .pad_heads import HeadPadding

        padding = HeadPadding(text, pad_head_dim)
        text, state = padding.config(text), padding.state(state)
    if text["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    with atomic_folder(output, replace=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(text, indent=2, sort_keys=True) + "\n")
        write_safetensors_shards(state, tmp)
        if processor is not None:
            tokenizer, template = processor.tokenizer, processor.chat_template
            tokenizer.chat_template = template if isinstance(template, str) else template["default"]
            tokenizer.save_pretrained(tmp)
        if (model_dir / "generation_config.json").is_file():
            (tmp / "generation_config.json").write_bytes((model_dir / "generation_config.json").read_bytes())
        manifest = {"source": str(model_dir.resolve()), "fingerprint": source_fingerprint(model_dir),
                    "format": FORMAT_VERSION}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(output)


def cached_export(model_dir, cache_dir=None) -> Path:
    """The vLLM folder for `model_dir`, exported once into a cache and reused while the checkpoint is unchanged."""
    cache = Path(cache_dir or os.environ.get("VLORA_SERVING_CACHE") or Path.home() / ".cache" / "vlora_hf" / "vllm")
    folder = cache / f"{Path(model_dir).resolve().name}-{source_fingerprint(model_dir)}"
    if not (folder / MANIFEST).is_file():
        export_for_vllm(model_dir, folder, force=True)
    return folder
