"""VLoRA model: configuration, perceptual weights generator, delta injection, model classes.

`CACHE` is the installed transformers' name of the KV cache argument and output field (`cache` from 5.24,
`past_key_values` before); `without_placeholders` is how `generate` lays out a prompt without its `<image>`."""

from .configuration_vlora import VLoRAConfig
from .generator_vlora import PerceptualWeightsGenerator
from .injection_vlora import LowRankDeltas, add_low_rank_delta
from .modeling_vlora import VLoRAForCausalLM, VLoRAModel, VLoRAPreTrainedModel
from .outputs_vlora import CACHE, VLoRACausalLMOutputWithPast, VLoRAModelOutputWithPast
from .placeholders_vlora import without_placeholders

__all__ = [
    "CACHE",
    "LowRankDeltas",
    "PerceptualWeightsGenerator",
    "VLoRAConfig",
    "VLoRAForCausalLM",
    "VLoRAModel",
    "VLoRACausalLMOutputWithPast",
    "VLoRAModelOutputWithPast",
    "VLoRAPreTrainedModel",
    "add_low_rank_delta",
    "without_placeholders",
]
