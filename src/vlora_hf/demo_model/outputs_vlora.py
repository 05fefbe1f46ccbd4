"""VLoRA's model outputs: the backbone's, plus what the image side produced (`image_outputs`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import ModelOutput

# transformers 5.24 renamed the KV cache, as forward argument and output field, from `past_key_values` to
# `cache`. The outputs below inherit the installed version's fields, and the cache passes through `forward`
# under whichever name the caller (generate, a user) gave it.
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class _ImageOutputs:
    """`image_outputs` as transformers' VLMs have it: `pooler_output` holds the perceptual weights (one row per
    image), `last_hidden_state` the tower features the generator read (when the tower ran in this call)."""

    @property
    def perceptual_weights(self) -> torch.FloatTensor | None:
        return None if self.image_outputs is None else self.image_outputs.pooler_output

    def to_tuple(self) -> tuple:
        # transformers' multimodal outputs flatten the nested encoder output the same way
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in super().to_tuple())


@dataclass
class VLoRAModelOutputWithPast(_ImageOutputs, BaseModelOutputWithPast):
    """Backbone outputs plus `image_outputs` (`.perceptual_weights`: the weights used for this call)."""

    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class VLoRACausalLMOutputWithPast(_ImageOutputs, CausalLMOutputWithPast):
    """LM outputs plus `image_outputs` (`.perceptual_weights`: the weights used for this call)."""

    image_outputs: BaseModelOutputWithPooling | None = None
