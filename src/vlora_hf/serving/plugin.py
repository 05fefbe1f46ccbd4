"""vLLM plugin (entry point `vllm.general_plugins`): loaded by vLLM in every process it starts.

Registers the out-of-tree model that carries target `m`, and the `vlora` tokenizer mode, whose renderer takes
the `<image>` placeholder out of each prompt (the image itself reaches the model as the request's adapter).
"""

from __future__ import annotations

MLP_DELTA_ARCH = "VLoRALlamaForCausalLM"
TOKENIZER_MODE = "vlora"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    if MLP_DELTA_ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MLP_DELTA_ARCH, "vlora_hf.serving.vllm_model:VLoRALlamaForCausalLM")
    TokenizerRegistry.tokenizers.setdefault(TOKENIZER_MODE, ("vllm.tokenizers.hf", "CachedHfTokenizer"))
    RENDERER_REGISTRY.renderers.setdefault(TOKENIZER_MODE, ("vlora_hf.serving.renderer", "VLoRARenderer"))
