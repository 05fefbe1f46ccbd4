"""Where the images sit in the sequence: one `<image>` placeholder per image, which no token attends to.

The release keeps the placeholder in the sequence (it takes a position id) and masks it; `generate` takes it
out instead (the KV cache then holds text only) and keeps the other tokens' position ids.
"""

from __future__ import annotations

import torch


def row_weights(input_ids: torch.Tensor, perceptual_weights: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Per-image weights [n_images, D] -> per-row weights [batch, D]: row i gets the image of its placeholder,
    rows without one get zeros (no delta)."""
    is_image = input_ids == image_token_id
    per_row = is_image.sum(dim=1)
    if (per_row > 1).any():
        rows = per_row.gt(1).nonzero().flatten().tolist()
        raise ValueError(f"VLoRA applies one image per sequence, but rows {rows} hold several <image> placeholders")
    has_image = per_row.bool()
    if int(has_image.sum()) != perceptual_weights.shape[0]:
        raise ValueError(
            f"got {perceptual_weights.shape[0]} images but input_ids hold {int(has_image.sum())} <image> "
            f"placeholders (id {image_token_id}); pass one image per placeholder, in row order"
        )
    if bool(has_image.all()):  # every row has its image: nothing to scatter (the usual training batch)
        return perceptual_weights
    rows = perceptual_weights.new_zeros(input_ids.shape[0], perceptual_weights.shape[1])
    rows[has_image] = perceptual_weights.to(rows.dtype)
    return rows


def mask_placeholders(is_image: torch.Tensor, attention_mask, position_ids):
    """Hide the placeholder columns from attention; keep their position ids (the release's positions).

    `is_image` covers the last `is_image.shape[1]` columns of `attention_mask` (earlier ones are cached).
    Position ids, when not given, count every non-padding token, the placeholder included.
    """
    batch, seq = is_image.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq, dtype=torch.long, device=is_image.device)
    if position_ids is None and attention_mask.shape[1] == seq:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = torch.zeros_like(attention_mask, dtype=torch.bool)
    hidden[:, attention_mask.shape[1] - seq :] = is_image
    return attention_mask.masked_fill(hidden, 0), position_ids


def without_placeholders(input_ids: torch.Tensor, attention_mask, image_token_id: int, pad_token_id: int = 0,
                         inputs_embeds: torch.Tensor | None = None):
    """Take the `<image>` placeholders out of left-padded prompts, for generation.

    Each placeholder moves to the front of its row as padding; a column that is padding in every row is dropped.
    Returns (input_ids, attention_mask, position_ids), the position ids being those of a plain forward (the
    placeholder still counts), so the logits are the same as with the placeholder masked in place; with
    `inputs_embeds` [batch, seq, hidden], those embeddings rearranged the same way come fourth.
    """
    is_image = input_ids == image_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    order = torch.sort((~is_image).int(), dim=1, stable=True).indices  # placeholders first, rest in order
    moved = is_image.gather(1, order)
    ids = input_ids.gather(1, order).masked_fill(moved, pad_token_id)
    mask = attention_mask.gather(1, order).masked_fill(moved, 0)
    positions = positions.gather(1, order)
    start = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
    text = (ids[:, start:], mask[:, start:], positions[:, start:])
    if inputs_embeds is None:
        return text
    embeds = inputs_embeds.gather(1, order[..., None].expand(-1, -1, inputs_embeds.shape[-1]))
    return (*text, embeds[:, start:])
