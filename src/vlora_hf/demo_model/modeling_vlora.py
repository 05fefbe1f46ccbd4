"""VLoRA: the image bends the LLM's weights instead of entering its sequence.

`VLoRAModel` holds the vision tower, the perceptual weights generator and a plain transformers backbone;
`VLoRAForCausalLM` adds the LM head and `generate`. Each `<image>` placeholder in `input_ids` takes one image;
its row gets that image's low-rank deltas, the placeholder itself is never attended to.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_vlora import VLoRAConfig
from .generator_vlora import PerceptualWeightsGenerator, WeightsDecoder
from .injection_vlora import LowRankDeltas, attach_delta_hooks, checkpoint_context, deltas_applied
from .validation_vlora import (check_checkpoint_keys, check_generate_inputs, check_images, check_pixel_values,
                               check_text_inputs)

AUTO_MAP = {
    "AutoConfig": "configuration_vlora.VLoRAConfig",
    # Users load with AutoModel: give them the class that generates, as remote-code VLM repos do.
    "AutoModel": "modeling_vlora.VLoRAForCausalLM",
    "AutoModelForCausalLM": "modeling_vlora.VLoRAForCausalLM",
    "AutoModelForImageTextToText": "modeling_vlora.VLoRAForCausalLM",
}


# transformers 5.24 renamed the KV cache, as forward argument and output field, from `past_key_values` to
# `cache`. The outputs below inherit the installed version's fields, and the cache passes through `forward`
# under whichever name the caller (generate, a user) gave it.
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class VLoRAModelOutputWithPast(BaseModelOutputWithPast):
    """Backbone outputs plus the perceptual weights used for this call (one row per image)."""

    perceptual_weights: torch.FloatTensor | None = None


@dataclass
class VLoRACausalLMOutputWithPast(CausalLMOutputWithPast):
    """LM outputs plus the perceptual weights used for this call (one row per image)."""

    perceptual_weights: torch.FloatTensor | None = None


class VLoRAPreTrainedModel(PreTrainedModel):
    config: VLoRAConfig
    config_class = VLoRAConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["WeightsDecoder"]  # post_init adds the tower's and the backbone's own
    _skip_keys_device_placement = [CACHE]
    # Attention runs inside the unmodified backbone and tower; the deltas are plain matmuls beside it.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the deltas travel in a ContextVar, which dynamo does not trace

    def _init_weights(self, module):
        super()._init_weights(module)
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, WeightsDecoder):
            init.normal_(module.queries, mean=0.0, std=std)
        elif isinstance(module, PerceptualWeightsGenerator):
            init.normal_(module.pos_embed, mean=0.0, std=std)
            for b in module.lora_B.values():
                init.zeros_(b)

    def post_init(self):
        """transformers' post_init, then `_no_split_modules` cut to the classes this model holds: the tower's
        list names classes of its whole family (CLIP's names the text embeddings), and FSDP's transformer-based
        wrap (accelerate), which falls back to this list, rejects a class name it cannot find."""
        super().post_init()
        present = {type(m).__name__ for m in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}

    def _activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        """Checkpoint non-reentrantly, with a context that restores this call's deltas on recompute.

        Both `activation_checkpointing_enable` and the deprecated `gradient_checkpointing_enable` end here.
        """
        ckpt_kwargs = {**(activation_checkpointing_kwargs or {}), "use_reentrant": False, "context_fn": checkpoint_context}
        super()._activation_checkpointing_enable(ckpt_kwargs, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """transformers' `from_pretrained`, refusing weights whose generator tensors do not match the config."""
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        check_checkpoint_keys(info["missing_keys"], info["unexpected_keys"])
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save, listing every Auto class in `auto_map` and copying the remote-code files flat."""
        self.config.auto_map = dict(AUTO_MAP)
        pipelines = _custom_pipelines()
        if pipelines:
            self.config.custom_pipelines = pipelines
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            copy_remote_code(save_directory)


def copy_remote_code(save_directory) -> None:
    """Copy every module of this folder next to the weights, so `trust_remote_code` needs nothing else."""
    for source in Path(__file__).parent.glob("*.py"):
        if source.name != "__init__.py":
            shutil.copyfile(source, Path(save_directory) / source.name)


def _custom_pipelines() -> dict | None:
    try:
        from .pipeline_vlora import CUSTOM_PIPELINES
    except ImportError:
        return None
    return CUSTOM_PIPELINES


class VLoRAModel(VLoRAPreTrainedModel):
    """Vision tower + perceptual weights generator + plain language model (no LM head)."""

    def __init__(self, config: VLoRAConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.generator = PerceptualWeightsGenerator(config)
        self.language_model = AutoModel.from_config(config.text_config)
        attach_delta_hooks(self.language_model, config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # ----- image side ------------------------------------------------------------------------------------
    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, H, W] -> the tower's selected features [n, P, Dv]."""
        check_pixel_values(pixel_values, self.config.vision_config)
        tower_dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=True)
        features = out.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return features

    def get_image_features(self, pixel_values=None, image_features=None, **kwargs) -> torch.Tensor:
        """The perceptual weights [n_images, D] of each image, from pixels or precomputed tower features."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("get_image_features needs exactly one of pixel_values or image_features")
        if image_features is None:
            image_features = self.get_vision_features(pixel_values)
        return self.generator(image_features)

    def row_weights(self, input_ids: torch.Tensor, perceptual_weights: torch.Tensor) -> torch.Tensor:
        """Per-image weights -> per-row weights [batch, D]: row i gets the image of its placeholder, else zeros."""
        is_image = input_ids == self.config.image_token_id
        per_row = is_image.sum(dim=1)
        if (per_row > 1).any():
            rows = per_row.gt(1).nonzero().flatten().tolist()
            raise ValueError(f"VLoRA applies one image per sequence, but rows {rows} hold several <image> placeholders")
        has_image = per_row.bool()
        if int(has_image.sum()) != perceptual_weights.shape[0]:
            raise ValueError(
                f"got {perceptual_weights.shape[0]} images but input_ids hold {int(has_image.sum())} <image> "
                f"placeholders (id {self.config.image_token_id}); pass one image per placeholder, in row order"
            )
        if bool(has_image.all()):  # every row has its image: nothing to scatter (the usual training batch)
            return perceptual_weights
        rows = perceptual_weights.new_zeros(input_ids.shape[0], perceptual_weights.shape[1])
        rows[has_image] = perceptual_weights.to(rows.dtype)
        return rows

    def resolve_images(self, input_ids, pixel_values=None, image_features=None, perceptual_weights=None,
                       row_perceptual_weights=None):
        """Whichever image input was given -> (per-row weights [batch, D] or None, per-image weights or None).

        The one place that checks images against placeholders, for `forward` and `generate` alike.
        """
        given = [x for x in (pixel_values, image_features, perceptual_weights) if x is not None]
        if len(given) > 1:
            raise ValueError("pass only one of pixel_values, image_features or perceptual_weights")
        if given and row_perceptual_weights is None:
            if input_ids is None:
                raise ValueError("images need input_ids holding their <image> placeholders")
            check_images(self.config, input_ids, given[0], pixel_values)
            if perceptual_weights is None:
                perceptual_weights = self.get_image_features(pixel_values=pixel_values, image_features=image_features)
            row_perceptual_weights = self.row_weights(input_ids, perceptual_weights)
        if row_perceptual_weights is None and input_ids is not None:
            placeholders = int((input_ids == self.config.image_token_id).sum())
            if placeholders:
                raise ValueError(
                    f"input_ids hold {placeholders} <image> placeholders but no image was given "
                    "(pixel_values, image_features or perceptual_weights)"
                )
        return row_perceptual_weights, perceptual_weights

    # ----- text side -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        perceptual_weights: torch.FloatTensor | None = None,
        row_perceptual_weights: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> VLoRAModelOutputWithPast:
        """`pixel_values` / `image_features` / `perceptual_weights`: one entry per placeholder, in row order.

        `row_perceptual_weights` [batch, D] (zeros for text-only rows) is what `generate` passes between steps,
        when the placeholder is no longer part of `input_ids`.
        """
        vocab_size = self.get_input_embeddings().num_embeddings
        check_text_inputs(input_ids, attention_mask, self.config.image_token_id, vocab_size)
        row_perceptual_weights, perceptual_weights = self.resolve_images(
            input_ids, pixel_values, image_features, perceptual_weights, row_perceptual_weights
        )
        if input_ids is not None:
            is_image = input_ids == self.config.image_token_id
            if is_image.any():
                attention_mask, position_ids = mask_placeholders(is_image, attention_mask, position_ids)
                input_ids = input_ids.masked_fill(is_image, 0)  # the release's id; never attended to

        deltas = None
        if row_perceptual_weights is not None:
            dtype = self.language_model.get_input_embeddings().weight.dtype
            deltas = LowRankDeltas.build(self.generator.split(row_perceptual_weights), self.generator.scaled_B(), dtype)
        with deltas_applied(deltas):
            out = self.language_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        return VLoRAModelOutputWithPast(
            last_hidden_state=out.last_hidden_state,
            **{CACHE: getattr(out, CACHE)},
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
            perceptual_weights=perceptual_weights,
        )


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


class VLoRAForCausalLM(VLoRAPreTrainedModel, GenerationMixin):
    """VLoRA with a language-modelling head: `generate` and the usual shifted cross-entropy."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: VLoRAConfig):
        super().__init__(config)
        self.model = VLoRAModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def get_image_features(self, pixel_values=None, image_features=None, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values, image_features=image_features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        perceptual_weights: torch.FloatTensor | None = None,
        row_perceptual_weights: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> VLoRACausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_features=image_features,
            perceptual_weights=perceptual_weights,
            row_perceptual_weights=row_perceptual_weights,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            labels = labels.masked_fill(labels == self.config.image_token_id, -100)  # a slot, not a token
            loss = self.loss_function(logits, labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return VLoRACausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE: getattr(out, CACHE)},
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            perceptual_weights=out.perceptual_weights,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        perceptual_weights: torch.FloatTensor | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate`, with the images turned into per-row weights once, before prefill.

        The per-row weights travel through the decode steps as `row_perceptual_weights` (expanded row-wise for
        beams and `num_return_sequences`), so the tower and generator never run again. The placeholders, which
        no token may attend to, are taken out of the sequence (their rows are left-padded by one instead) and
        the remaining tokens keep the position ids they have in a plain forward: the KV cache holds text only
        and attention keeps its causal fast path. The returned sequences start with the `input_ids` given.
        """
        check_generate_inputs(self, input_ids, attention_mask, kwargs)
        kwargs["row_perceptual_weights"], _ = self.model.resolve_images(
            input_ids, pixel_values, image_features, perceptual_weights, kwargs.get("row_perceptual_weights")
        )
        if input_ids is None or not (input_ids == self.config.image_token_id).any():
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

        text_ids, text_mask, kwargs["position_ids"] = without_placeholders(
            input_ids, attention_mask, self.config.image_token_id, self.generation_config.pad_token_id or 0
        )
        out = super().generate(input_ids=text_ids, attention_mask=text_mask, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, sequences[:, text_ids.shape[1]:]], dim=1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out


def without_placeholders(input_ids: torch.Tensor, attention_mask, image_token_id: int, pad_token_id: int = 0):
    """Take the `<image>` placeholders out of left-padded prompts, for generation.

    Each placeholder moves to the front of its row as padding; a column that is padding in every row is dropped.
    Returns (input_ids, attention_mask, position_ids), the position ids being those of a plain forward (the
    placeholder still counts), so the logits are the same as with the placeholder masked in place.
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
    return ids[:, start:], mask[:, start:], positions[:, start:]
