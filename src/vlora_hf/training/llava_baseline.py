"""The LLaVA-1.5 baseline on our training path (`architecture: llava`).

transformers' own `LlavaForConditionalGeneration`, built from the same tower and backbone configs, tokenizer,
chat template and tower initialisation as a VLoRA recipe, so that a head-to-head differs only in how the image
reaches the LLM: here the tower's patch features pass a 2-layer MLP projector and enter as input tokens (one
`<image>` placeholder becomes one token per patch), in VLoRA they become low-rank weight deltas. It exports as a
plain transformers LLaVA checkpoint with a `LlavaProcessor`: no remote code.
"""

import json

import torch
from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from ..atomic import atomic_folder
from ..data.llava_format import IGNORE_INDEX
from .model_builder import _as_config, configs_tokenizer, resolve_chat_template
from .scratch_tower import init_scratch_tower
from .stages import STAGES, unused_tower_modules


def is_llava(model) -> bool:
    return isinstance(model, LlavaForConditionalGeneration)


def image_processor_for(kwargs: dict | None, vision_config) -> CLIPImageProcessorPil:
    """Square inputs of the tower's size, as `VLoRAImageProcessor.from_vision_config` makes them for VLoRA (a square image is
    never padded, so both processors give the same pixels)."""
    kwargs = {k: v for k, v in (kwargs or {}).items() if k not in ("image_aspect_ratio", "array_range")}
    kwargs.setdefault("size", {"shortest_edge": vision_config.image_size})
    kwargs.setdefault("crop_size", {"height": vision_config.image_size, "width": vision_config.image_size})
    return CLIPImageProcessorPil(**kwargs)


def build_llava(args, rows=None, multi_turn: bool = False):
    """-> (LlavaForConditionalGeneration, LlavaProcessor) with random weights, from a scratch recipe's configs."""
    if not args.text_config:
        raise ValueError("architecture llava builds from configs: give text_config and vision_config (stage scratch)")
    tokenizer, text_config = configs_tokenizer(args, rows, multi_turn)
    text_config = _as_config(text_config, "llama")
    vision_config = _as_config(args.vision_config, "clip_vision_model")
    processor = LlavaProcessor(image_processor=image_processor_for(args.image_processor, vision_config),
                               tokenizer=tokenizer, patch_size=vision_config.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=resolve_chat_template(args.chat_template or "vicuna_v1"))
    config = LlavaConfig(text_config=text_config, vision_config=vision_config,
                         image_token_id=processor.image_token_id,
                         vision_feature_layer=(args.vlora or {}).get("vision_feature_layer", -1),
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=bool(text_config.tie_word_embeddings))
    model = LlavaForConditionalGeneration(config)
    init_scratch_tower(model, **{k: v for k, v in (args.scratch_tower or {}).items() if k != "warm_start"})
    return model, processor


def image_tokens(model) -> int:
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


class TowerView:
    """A LLaVA model seen the way `warm_start_tower` sees a VLoRA one: its tower, and the features the projector
    reads (the selected layer, CLS dropped) -- the same features VLoRA's generator reads."""

    def __init__(self, llava):
        self.config = llava.config
        self.model = self
        self.vision_tower = llava.model.vision_tower

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        features = out.hidden_states[self.config.vision_feature_layer]
        return features[:, 1:] if self.config.vision_feature_select_strategy == "default" else features


class ExpandImageTokens:
    """Wraps a collator: each row's single `<image>` id becomes `n` of them (labels ignored there), the input
    LLaVA's processor would have produced from the same conversation."""

    def __init__(self, collator, image_token_id: int, n: int):
        self.collator, self.image_token_id, self.n = collator, int(image_token_id), int(n)

    def expand(self, row: dict) -> dict:
        ids, labels = torch.as_tensor(row["input_ids"]), torch.as_tensor(row["labels"])
        where = (ids == self.image_token_id).nonzero().flatten()
        if len(where) == 0:
            return row
        p = int(where[0])
        ids = torch.cat([ids[:p], ids.new_full((self.n,), self.image_token_id), ids[p + 1 :]])
        labels = torch.cat([labels[:p], labels.new_full((self.n,), IGNORE_INDEX), labels[p + 1 :]])
        return {**row, "input_ids": ids, "labels": labels}

    def __call__(self, rows):
        return self.collator([self.expand(r) for r in rows])


def apply_llava_stage(model, stage: str, freeze_tower: bool = False) -> dict[str, int]:
    """The VLoRA stage's freezing with the projector in the generator's place; -> {part: trainable parameters}."""
    parts = {**STAGES[stage], **({"vision_tower": False} if freeze_tower else {})}
    modules = {"vision_tower": [model.model.vision_tower], "projector": [model.model.multi_modal_projector],
               "language_model": [model.model.language_model, model.lm_head]}
    trains = {"vision_tower": parts["vision_tower"], "projector": parts["generator"],
              "language_model": parts["language_model"]}
    for part, on in trains.items():
        for module in modules[part]:
            module.requires_grad_(on)
    for module in unused_tower_modules(model):
        module.requires_grad_(False)
    counts = {}
    for part, mods in modules.items():
        unique = {id(p): p for m in mods for p in m.parameters() if p.requires_grad}  # a tied head counts once
        counts[part] = sum(p.numel() for p in unique.values())
    return counts


def export_llava(model, processor, export_dir, summary: dict) -> None:
    """A plain transformers LLaVA folder (weights, config, processor, tokenizer) plus training_summary.json."""
    model.config.use_cache = True
    with atomic_folder(export_dir, replace=True) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


__all__ = ["ExpandImageTokens", "TowerView", "apply_llava_stage", "build_llava", "export_llava", "image_tokens",
           "is_llava"]
