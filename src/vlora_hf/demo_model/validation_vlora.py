"""Checks that turn bad model input into one clear error before any work runs.

Without them a wrong input fails deep inside the tower or the backbone (shape, index or reshape errors), or,
worse, gives an answer: NaN pixels give NaN logits, integer pixels are cast, a checkpoint whose generator does
not match its config loads with a warning and answers wrong. This file imports only torch, so it ships flat as
remote code beside modeling_vlora.py.
"""

from __future__ import annotations

import re
import warnings

import torch

GENERATOR_KEY = re.compile(r"(^|\.)generator\.")


def check_pixel_values(pixel_values, vision_config) -> None:
    """Shape [n, channels, size, size] with n > 0, floating point, finite: what the processor returns."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch tensor, got {type(pixel_values).__name__}")
    channels = getattr(vision_config, "num_channels", 3)
    size = vision_config.image_size
    expected = f"[n_images, {channels}, {size}, {size}]"
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
        raise ValueError(
            f"pixel_values has shape {list(pixel_values.shape)}, expected {expected} (one image per <image> "
            "placeholder, as the processor returns)"
        )
    if pixel_values.shape[0] == 0:
        raise ValueError(f"pixel_values holds no images (shape {list(pixel_values.shape)}): pass None for text only")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values has dtype {pixel_values.dtype}, expected floating point: give the processor's output "
            "(rescaled and normalised), not raw pixel values"
        )
    if not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("pixel_values holds NaN or infinite values")


def check_images(config, input_ids, images, pixel_values=None) -> None:
    """Pixel values well-formed (when given) and one image per placeholder, checked before the tower runs."""
    if pixel_values is not None:
        check_pixel_values(pixel_values, config.vision_config)
    if input_ids is None:
        return
    placeholders = int((input_ids == config.image_token_id).sum())
    if images.shape[0] != placeholders:
        raise ValueError(
            f"got {images.shape[0]} images but input_ids hold {placeholders} <image> placeholders (id "
            f"{config.image_token_id}); pass one image per placeholder, in row order"
        )


def check_text_inputs(input_ids, attention_mask, image_token_id: int, vocab_size: int) -> None:
    """Token ids inside the embedding table (the placeholder aside); a 2-D mask covering every id."""
    if input_ids is None:
        return
    if attention_mask is not None and attention_mask.ndim == 2 and (
        attention_mask.shape[0] != input_ids.shape[0] or attention_mask.shape[1] < input_ids.shape[1]
    ):
        raise ValueError(
            f"attention_mask has shape {list(attention_mask.shape)} but input_ids {list(input_ids.shape)}: the mask "
            "needs one column per token (and per cached token)"
        )
    ids = input_ids.masked_fill(input_ids == image_token_id, 0)
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        values = sorted(set(ids[bad].tolist()))[:5]
        raise ValueError(
            f"input_ids hold ids outside the vocabulary [0, {vocab_size}): {values}; encode the text with the "
            "model's own tokenizer"
        )


def check_generate_inputs(model, input_ids, attention_mask, kwargs: dict) -> None:
    """Before `generate`: the mask matches the prompt, every image row has a token to attend to, and generation
    stays within `max_position_embeddings` (a longer prompt is refused; new tokens past it are cut, with a
    warning, since the model never saw those positions)."""
    if input_ids is None:
        return
    config = model.config
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {list(attention_mask.shape)} but input_ids {list(input_ids.shape)}: "
            "they must match"
        )
    is_image = input_ids == config.image_token_id
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    empty = ((mask.bool() & ~is_image).sum(1) == 0) & is_image.any(1)
    if bool(empty.any()):
        raise ValueError(
            f"attention_mask leaves rows {empty.nonzero().flatten().tolist()} with no token to attend to besides "
            "the <image> placeholder: give each image row its prompt"
        )
    limit = getattr(config.text_config, "max_position_embeddings", None)
    if not limit:
        return
    prompt = int(mask.sum(1).max())  # positions count the placeholder too
    if prompt >= limit:
        raise ValueError(
            f"the prompt takes {prompt} positions, but the model has max_position_embeddings={limit}: no room to "
            "generate. Shorten the prompt."
        )
    generation_config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", getattr(generation_config, "max_new_tokens", None))
    if new is None:
        new = kwargs.get("max_length", generation_config.max_length) - input_ids.shape[1]
    if prompt + new > limit:
        warnings.warn(
            f"prompt ({prompt} positions) + max_new_tokens ({new}) exceeds the model's max_position_embeddings="
            f"{limit}: generating at most {limit - prompt} new tokens",
            stacklevel=3,
        )
        kwargs["max_new_tokens"] = limit - prompt
        kwargs.pop("max_length", None)


def check_checkpoint_keys(missing_keys, unexpected_keys) -> None:
    """The generator (its lora_B included) must load completely: its shape follows the config's targets and
    layers, so a missing or extra tensor means the config and the weights disagree."""
    missing = sorted(k for k in missing_keys if GENERATOR_KEY.search(k))
    unexpected = sorted(k for k in unexpected_keys if GENERATOR_KEY.search(k))
    if missing or unexpected:
        parts = [f"missing {missing}"] if missing else []
        parts += [f"unexpected {unexpected}"] if unexpected else []
        raise ValueError(
            "the checkpoint's perceptual weights generator does not match its config ("
            + "; ".join(parts)
            + "): config.json's target_modules, skip_layers / target_layers or generator sizes differ from the "
            "weights"
        )


def check_ids_beside_embeds(input_ids, inputs_embeds) -> None:
    """`input_ids` given beside `inputs_embeds` locate the placeholders, so they must cover the same tokens."""
    if inputs_embeds is not None and input_ids is not None and inputs_embeds.shape[:2] != input_ids.shape:
        raise ValueError(
            f"inputs_embeds {tuple(inputs_embeds.shape[:2])} and input_ids {tuple(input_ids.shape)} given together "
            "must cover the same [batch, sequence] (input_ids only locate the <image> placeholders)"
        )


def refuse_tensor_parallel(load_kwargs: dict) -> None:
    """Raise where `from_pretrained` would shard the backbone: the per-image deltas are full-width and would
    not follow the shards of q/k/v/o/MLP (and the plan leaves the tied `lm_head` whole)."""
    dist = load_kwargs.get("distributed_config")
    dist = dist if isinstance(dist, dict) else {} if dist is None else vars(dist)
    plans = (load_kwargs.get("tp_plan"), dist.get("tp_plan"))
    sizes = (load_kwargs.get("tp_size"), dist.get("tp_size"))
    if any(plan is not None for plan in plans) or any((size or 1) > 1 for size in sizes):
        raise ValueError(
            "VLoRA does not support tensor parallelism (tp_plan / tp_size): the per-image low-rank deltas are "
            "added at full width around q/k/v/o/MLP and do not follow sharded projections. Load without tp_plan "
            "(one device, device_map, or FSDP / DeepSpeed data parallelism for training)."
        )
