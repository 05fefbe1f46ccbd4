"""VLoRA: the image bends the LLM's weights instead of entering its sequence.

`VLoRAModel` holds the vision tower, the perceptual weights generator and a plain transformers backbone;
`VLoRAForCausalLM` adds the LM head and `generate`. Each `<image>` placeholder in `input_ids` takes one image;
its row gets that image's low-rank deltas, the placeholder itself is never attended to.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils.generic import can_return_tuple

from .configuration_vlora import TOWERS_WITH_CLS, VLoRAConfig
from .generator_vlora import PerceptualWeightsGenerator, WeightsDecoder
from .injection_vlora import LowRankDeltas, attach_delta_hooks, checkpoint_context, deltas_applied
from .outputs_vlora import CACHE, VLoRACausalLMOutputWithPast, VLoRAModelOutputWithPast
from .placeholders_vlora import mask_placeholders, row_weights, without_placeholders
from .validation_vlora import (check_checkpoint_keys, check_generate_inputs, check_ids_beside_embeds, check_images,
                               check_pixel_values, check_text_inputs, refuse_tensor_parallel)

# Saving registers the model under AutoModelForCausalLM (register_for_auto_class below: transformers copies this
# file and every file it imports relatively); users also load with AutoModel and AutoModelForImageTextToText,
# as with other remote-code VLM repos, so the config lists those too.
EXTRA_AUTO_CLASSES = ("AutoModel", "AutoModelForImageTextToText")


def remote_code_config(config: VLoRAConfig) -> None:
    """Fill what a folder needs in config.json to load with `trust_remote_code`: every Auto class in `auto_map`
    and the `image-to-text` pipeline (its file, pipeline_vlora.py, is imported here so it is copied too)."""
    from .pipeline_vlora import CUSTOM_PIPELINES

    model = "modeling_vlora.VLoRAForCausalLM"
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), "AutoConfig": "configuration_vlora.VLoRAConfig",
                       "AutoModelForCausalLM": model, **{auto: model for auto in EXTRA_AUTO_CLASSES}}
    config.custom_pipelines = CUSTOM_PIPELINES


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
        """transformers' post_init without the backbone's tensor-parallel plan, then `_no_split_modules` cut to the classes this model holds: the tower's
        list names classes of its whole family (CLIP's names the text embeddings), and FSDP's transformer-based
        wrap (accelerate), which falls back to this list, rejects a class name it cannot find."""
        super().post_init()
        self._tp_plan = {}  # the backbone's plan would shard projections whose full-width deltas cannot follow
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
        """transformers' `from_pretrained`, refusing tensor parallelism and weights whose generator tensors do not
        match the config."""
        refuse_tensor_parallel(kwargs)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        check_checkpoint_keys(info["missing_keys"], info["unexpected_keys"])
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, the config first completed for `trust_remote_code` loading."""
        remote_code_config(self.config)
        super().save_pretrained(save_directory, *args, **kwargs)


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

    def get_image_features(self, pixel_values=None, image_features=None, return_dict: bool = False, **kwargs):
        """The perceptual weights [n_images, D] of each image, from pixels or precomputed tower features.

        With `return_dict=True` (as `generate` asks transformers' VLMs): a `BaseModelOutputWithPooling` whose
        `pooler_output` is those weights and `last_hidden_state` the tower features they were made from.
        """
        if (pixel_values is None) == (image_features is None):
            raise ValueError("get_image_features needs exactly one of pixel_values or image_features")
        if image_features is None:
            image_features = self.get_vision_features(pixel_values)
        weights = self.generator(image_features)
        if return_dict:
            return BaseModelOutputWithPooling(last_hidden_state=image_features, pooler_output=weights)
        return weights

    def row_weights(self, input_ids: torch.Tensor, perceptual_weights: torch.Tensor) -> torch.Tensor:
        """Per-image weights [n_images, D] -> per-row weights [batch, D] (zeros for rows without an image)."""
        return row_weights(input_ids, perceptual_weights, self.config.image_token_id)

    def resolve_images(self, input_ids, pixel_values=None, image_features=None, perceptual_weights=None,
                       row_perceptual_weights=None, mm_encoder_outputs=None):
        """Whichever image input was given -> (per-row weights [batch, D] or None, `image_outputs` or None).

        The one place that checks images against placeholders, for `forward` and `generate` alike.
        """
        image_outputs = (mm_encoder_outputs or {}).get("image")
        given = [x for x in (pixel_values, image_features, perceptual_weights, image_outputs) if x is not None]
        if len(given) > 1:
            raise ValueError("pass only one of pixel_values, image_features, perceptual_weights or mm_encoder_outputs")
        if given and row_perceptual_weights is None:
            if input_ids is None:
                raise ValueError(
                    "images need input_ids holding their <image> placeholders; with inputs_embeds, pass input_ids "
                    "beside them (as for LLaVA) to say which rows hold an image and where"
                )
            check_images(self.config, input_ids, given[0] if image_outputs is None else image_outputs.pooler_output,
                         pixel_values)
            if perceptual_weights is not None:
                image_outputs = BaseModelOutputWithPooling(pooler_output=perceptual_weights)
            elif image_outputs is None:
                image_outputs = self.get_image_features(pixel_values=pixel_values, image_features=image_features,
                                                        return_dict=True)
            row_perceptual_weights = self.row_weights(input_ids, image_outputs.pooler_output)
        if row_perceptual_weights is None and input_ids is not None:
            placeholders = int((input_ids == self.config.image_token_id).sum())
            if placeholders:
                raise ValueError(
                    f"input_ids hold {placeholders} <image> placeholders but no image was given "
                    "(pixel_values, image_features or perceptual_weights)"
                )
        return row_perceptual_weights, image_outputs

    # ----- text side -------------------------------------------------------------------------------------
    @can_return_tuple
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
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> VLoRAModelOutputWithPast:
        """`pixel_values` / `image_features` / `perceptual_weights`: one entry per placeholder, in row order.

        `row_perceptual_weights` [batch, D] (zeros for text-only rows) is what `generate` passes between steps,
        when the placeholder is no longer part of `input_ids`. With `inputs_embeds`, `input_ids` may come beside
        them (same shape) to locate the placeholders; the embeddings are used, the placeholder's is never read.
        """
        check_ids_beside_embeds(input_ids, inputs_embeds)
        vocab_size = self.get_input_embeddings().num_embeddings
        check_text_inputs(input_ids, attention_mask, self.config.image_token_id, vocab_size)
        row_perceptual_weights, image_outputs = self.resolve_images(
            input_ids, pixel_values, image_features, perceptual_weights, row_perceptual_weights, mm_encoder_outputs
        )
        if input_ids is not None:
            is_image = input_ids == self.config.image_token_id
            if is_image.any():
                attention_mask, position_ids = mask_placeholders(is_image, attention_mask, position_ids)
                input_ids = input_ids.masked_fill(is_image, 0)  # the release's id; never attended to
            if inputs_embeds is not None:
                input_ids = None  # the backbone takes one of the two

        deltas = None
        if row_perceptual_weights is not None:
            dtype = self.language_model.get_input_embeddings().weight.dtype
            deltas = LowRankDeltas.build(self.generator.split(row_perceptual_weights), self.generator.scaled_B(), dtype)
        with deltas_applied(deltas):
            out = self.language_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True, **kwargs)
        return VLoRAModelOutputWithPast(
            last_hidden_state=out.last_hidden_state,
            **{CACHE: getattr(out, CACHE)},
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
            image_outputs=image_outputs,
        )


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

    def get_image_features(self, pixel_values=None, image_features=None, return_dict: bool = False, **kwargs):
        return self.model.get_image_features(pixel_values=pixel_values, image_features=image_features,
                                             return_dict=return_dict)

    @classmethod
    def from_text_and_vision_pretrained(cls, text_model, vision_tower, dtype=None, **vlora_kwargs):
        """A new VLoRA model from a pretrained causal LM and a pretrained vision tower, in one call.

        `text_model` / `vision_tower`: folders, Hub ids or loaded models (a full CLIP / SigLIP model gives its
        vision half). `vlora_kwargs` go to `VLoRAConfig`; pass `image_token_id=processor.image_token_id` when the
        tokenizer holds `<image>`. The generator starts fresh with B = 0, so until it is trained the model answers
        exactly as the text model does.
        """
        from transformers import AutoModelForCausalLM

        if not isinstance(text_model, nn.Module):
            text_model = AutoModelForCausalLM.from_pretrained(text_model, dtype=dtype)
        if not isinstance(vision_tower, nn.Module):
            vision_tower = AutoModel.from_pretrained(vision_tower, dtype=dtype)
        if hasattr(vision_tower, "vision_model") and hasattr(vision_tower, "text_model"):
            vision_tower = vision_tower.vision_model
        tower_config = vision_tower.config
        if tower_config.model_type not in TOWERS_WITH_CLS:
            vlora_kwargs.setdefault("vision_feature_select_strategy", "full")
        config = VLoRAConfig(text_config=text_model.config, vision_config=tower_config, **vlora_kwargs)
        model = cls(config)
        base = getattr(text_model, text_model.base_model_prefix)
        model.model.language_model.load_state_dict(base.state_dict(), strict=True)
        with torch.no_grad():
            model.lm_head.weight.copy_(text_model.get_output_embeddings().weight)
        load_tower_state(model.model.vision_tower, vision_tower.state_dict())
        model.generation_config = text_model.generation_config  # the backbone's eos / pad / sampling defaults
        return model.to(dtype) if dtype is not None else model

    @can_return_tuple
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
        mm_encoder_outputs: dict | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> VLoRACausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, pixel_values=pixel_values, image_features=image_features,
                         perceptual_weights=perceptual_weights, row_perceptual_weights=row_perceptual_weights,
                         mm_encoder_outputs=mm_encoder_outputs, use_cache=use_cache, return_dict=True, **kwargs)
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
            image_outputs=out.image_outputs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        perceptual_weights: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate`, with the images turned into per-row weights once, before prefill.

        The per-row weights travel through the decode steps as `row_perceptual_weights` (expanded row-wise for
        beams and `num_return_sequences`), so the tower and generator never run again. The placeholders, which
        no token may attend to, are taken out of the sequence (their rows are left-padded by one instead) and
        the remaining tokens keep the position ids they have in a plain forward: the KV cache holds text only
        and attention keeps its causal fast path. `inputs_embeds` (the prompt's embeddings) may come with
        `input_ids` beside them, which say where the placeholders are, as with LLaVA-style models.

        The returned `sequences` start with the `input_ids` given, placeholders included. The per-step outputs
        (`scores`, `logits`, `attentions`, `hidden_states`) see the text only: in a row with an image, the prompt
        they cover is one column shorter than the prompt part of `sequences`.
        """
        check_generate_inputs(self, input_ids, attention_mask, kwargs)
        check_ids_beside_embeds(input_ids, inputs_embeds)
        kwargs["row_perceptual_weights"], _ = self.model.resolve_images(
            input_ids, pixel_values, image_features, perceptual_weights, kwargs.get("row_perceptual_weights"),
            kwargs.pop("mm_encoder_outputs", None),
        )
        if input_ids is None or not (input_ids == self.config.image_token_id).any():
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                    **kwargs)

        text = without_placeholders(input_ids, attention_mask, self.config.image_token_id,
                                    self.generation_config.pad_token_id or 0, inputs_embeds=inputs_embeds)
        text_ids, text_mask, kwargs["position_ids"] = text[:3]
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = text[3]
        out = super().generate(input_ids=text_ids, attention_mask=text_mask, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, sequences[:, text_ids.shape[1]:]], dim=1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        """As `GenerationMixin`'s, with an explicit all-ones mask where it would give none and no cache.

        Without a cache and without a mask, transformers reads a jump in the position ids as the start of a new
        packed sequence; the placeholder taken out of the prompt leaves exactly such a jump (the text after it
        keeps its plain-forward positions), so the text would stop seeing what precedes the image.
        """
        inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if inputs.get("attention_mask") is None and inputs.get(CACHE) is None and inputs.get("position_ids") is not None:
            tokens = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            inputs["attention_mask"] = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return inputs


def load_tower_state(target: nn.Module, state: dict) -> None:
    """Load a vision tower's weights, with or without the `vision_model.` key prefix."""
    expected = set(target.state_dict())
    for candidate in (state, {k.removeprefix("vision_model."): v for k, v in state.items()},
                      {f"vision_model.{k}": v for k, v in state.items()}):
        if expected <= set(candidate):
            target.load_state_dict({k: candidate[k] for k in expected}, strict=True)
            return
    missing = sorted(expected - set(state))[:5]
    raise ValueError(f"the vision tower folder does not match the tower config: missing weights such as {missing}")


VLoRAForCausalLM.register_for_auto_class("AutoModelForCausalLM")
