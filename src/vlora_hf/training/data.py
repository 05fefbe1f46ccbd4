"""Chat templates by name, the one-image user turn, and preprocessing images once into a pixel bank."""

from __future__ import annotations

import torch

from ..processing.chat_templates import CHAT_TEMPLATES


def resolve_chat_template(name_or_template):
    """A template name (vicuna_v1, plain) or a jinja string -> the jinja string (None stays None)."""
    if name_or_template is None:
        return None
    if name_or_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_template]
    if "{" not in name_or_template:
        raise ValueError(f"chat_template {name_or_template!r} is neither a known name {sorted(CHAT_TEMPLATES)} "
                         "nor jinja")
    return name_or_template


def user_message(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def preprocess_bank(images, image_processor, chunk: int = 256) -> torch.Tensor:
    """A list of images -> pixel tensor [N, 3, H, W] (in chunks, to bound memory)."""
    parts = []
    for start in range(0, len(images), chunk):
        out = image_processor(images[start : start + chunk], return_tensors="pt")
        parts.append(out["pixel_values"])
    return torch.cat(parts) if parts else torch.empty(0)


__all__ = [
    "resolve_chat_template",
    "user_message",
    "preprocess_bank",
]
