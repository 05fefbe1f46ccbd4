"""vLLM's own Llama, plus a place for the release's `m` delta: a parallel h→h branch around the whole MLP.

`m` sits on no existing linear, so each receiving layer gets an h→h linear of vLLM's own kind whose base output is
zero. vLLM's LoRA machinery wraps it like any other linear, and the image's adapter supplies `x·A·Bᵀ` there. Every
other piece (attention, MLP, weight loading, tensor parallelism) is vLLM's code, unchanged.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index


class ZeroLinear(ReplicatedLinear):
    """An h→h linear whose base output is zero, without holding (or multiplying by) an h×h zero matrix.

    Replicated across tensor-parallel ranks: the MLP's output is already reduced where the branch is added.
    """

    def __init__(self, size: int, prefix: str = ""):
        super().__init__(size, size, bias=False, return_bias=False, prefix=prefix)
        del self.weight
        # LoRA places its stacked factors on `weight.device`; nothing is loaded into it or repacked.
        self.register_buffer("weight", torch.zeros(0, size), persistent=False)
        self.quant_method = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.output_size)


class VLoRALlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer; receiving layers add `mlp_delta(x)` to the MLP's output (x: the MLP input)."""

    def __init__(self, vllm_config, prefix: str = "", config=None, **kwargs):
        super().__init__(vllm_config, prefix=prefix, config=config, **kwargs)
        config = config or vllm_config.model_config.hf_config
        if extract_layer_index(prefix) in set(getattr(config, "vlora_mlp_delta_layers", ())):
            self.mlp_delta = ZeroLinear(config.hidden_size, prefix=f"{prefix}.mlp_delta")  # see vllm_names.py
            self.mlp.register_forward_hook(self._add_mlp_delta)

    def _add_mlp_delta(self, mlp, args, output):
        return output + self.mlp_delta(args[0])


class VLoRALlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=VLoRALlamaDecoderLayer)
