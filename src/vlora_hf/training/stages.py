"""Training stages: which parts of the model learn.

The release trains in two stages (the generator alone, then the generator with the LLM); `scratch` trains
everything from random weights, as for the tiny demo model.
"""

STAGES = {
    "pretrain": {"vision_tower": False, "generator": True, "language_model": False},
    "finetune": {"vision_tower": False, "generator": True, "language_model": True},
    "scratch": {"vision_tower": True, "generator": True, "language_model": True},
}


def unused_tower_modules(model) -> list:
    """Tower modules the features never pass through: layers after `vision_feature_layer`, the final norm and
    any pooling head (VLoRA reads `hidden_states[vision_feature_layer]`). DDP needs every trainable parameter to
    get a gradient, so these stay frozen."""
    tower = model.model.vision_tower
    inner = getattr(tower, "vision_model", tower)
    layers = inner.encoder.layers
    k = model.config.vision_feature_layer
    k = k if k >= 0 else len(layers) + 1 + k  # hidden_states[k] is the output of layers[:k]
    return list(layers[k:]) + [m for m in (getattr(inner, "post_layernorm", None), getattr(inner, "head", None))
                               if m is not None]


def apply_stage(model, stage: str, freeze_tower: bool = False) -> dict[str, int]:
    """Freeze what `stage` keeps fixed (and the tower too with `freeze_tower`); -> {part: trainable parameters}."""
    parts = {**STAGES[stage], **({"vision_tower": False} if freeze_tower else {})}
    modules = {
        "vision_tower": [model.model.vision_tower],
        "generator": [model.model.generator],
        "language_model": [model.model.language_model, model.lm_head],
    }
    for part, trains in parts.items():
        for module in modules[part]:
            module.requires_grad_(trains)
    for module in unused_tower_modules(model):
        module.requires_grad_(False)
    return {part: sum(p.numel() for mod in mods for p in mod.parameters() if p.requires_grad)
            for part, mods in modules.items()}


__all__ = ["STAGES", "apply_stage", "unused_tower_modules"]
