"""VLoRA model: configuration, perceptual weights generator, delta injection, model classes."""

from .configuration_vlora import VLoRAConfig
from .generator_vlora import PerceptualWeightsGenerator
from .injection_vlora import LowRankDeltas, add_low_rank_delta
from .modeling_vlora import VLoRAForCausalLM, VLoRAModel, VLoRAPreTrainedModel

__all__ = [
    "LowRankDeltas",
    "PerceptualWeightsGenerator",
    "VLoRAConfig",
    "VLoRAForCausalLM",
    "VLoRAModel",
    "VLoRAPreTrainedModel",
    "add_low_rank_delta",
]
