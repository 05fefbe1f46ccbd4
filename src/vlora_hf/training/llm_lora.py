"""Fine-tune the language model with LoRA (PEFT) instead of fully, as LLaVA users do on one GPU.

Recipe: `llm_lora: {r, alpha, target_modules, dropout}`. PEFT wraps the backbone's projections and
keeps each as `.base_layer`, which is where the per-image delta hooks sit: both the image's deltas and the
LoRA update apply. Only the language model's layers are targeted (the vision tower has `q_proj` / `v_proj`
too). Before export the LoRA update is merged into the weights, so the checkpoint is a plain VLoRA model.
"""

from __future__ import annotations

import re

KEYS = {"r", "alpha", "target_modules", "dropout"}


def check_llm_lora(spec: dict, stage: str) -> None:
    """One clear error for a malformed `llm_lora`."""
    if not isinstance(spec, dict) or set(spec) - KEYS or not spec.get("target_modules"):
        raise ValueError(f"llm_lora takes {sorted(KEYS)} (target_modules required, e.g. [q_proj, v_proj]); "
                         f"got {spec!r}")
    if stage != "finetune":
        raise ValueError(f"llm_lora trains the language model, which stage {stage!r} keeps as it is: use "
                         "stage finetune")


def apply_llm_lora(model, target_modules, r: int = 8, alpha: float | None = None, dropout: float = 0.0) -> int:
    """Wrap the language model's `target_modules` (names such as q_proj, v_proj) in LoRA layers, in place, and
    make them the only trainable part of the language model (lm_head included). Returns their parameter count."""
    from peft import LoraConfig, inject_adapter_in_model

    names = "|".join(re.escape(name) for name in target_modules)
    config = LoraConfig(r=int(r), lora_alpha=float(alpha if alpha is not None else r), lora_dropout=float(dropout),
                        target_modules=rf"model\.language_model\.layers\.\d+\.(?:.+\.)?(?:{names})")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():  # PEFT froze everything else; the stage decides that
        p.requires_grad_(name in trainable)
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    lora = [p for n, p in model.model.language_model.named_parameters() if ".lora_" in n]
    if not lora:
        raise ValueError(f"llm_lora: no module of the language model matches target_modules={target_modules}")
    for p in lora:
        p.requires_grad_(True)
    return sum(p.numel() for p in lora)


def merge_llm_lora(model) -> int:
    """Fold every LoRA layer of the language model into its base weight and put the base layer back (its delta
    hooks with it). Returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.model.language_model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.model.language_model.get_submodule(parent_name), child, module.get_base_layer())
            merged += 1
    return merged


__all__ = ["apply_llm_lora", "merge_llm_lora", "check_llm_lora"]
