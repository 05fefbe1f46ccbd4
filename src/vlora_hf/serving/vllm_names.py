"""Where each VLoRA target lives in vLLM's Llama decoder layer (adapter tensor names address these modules)."""

VLLM_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "m": "mlp_delta",  # the zero h→h linear of vllm_model.py, beside the MLP
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

# vLLM runs q/k/v as one linear and gate/up as one: LoRA wraps those (the adapter still names the parts).
VLLM_PACKED = {
    "self_attn.q_proj": "self_attn.qkv_proj",
    "self_attn.k_proj": "self_attn.qkv_proj",
    "self_attn.v_proj": "self_attn.qkv_proj",
    "mlp.gate_proj": "mlp.gate_up_proj",
    "mlp.up_proj": "mlp.gate_up_proj",
}


def lora_target_modules(targets, receiving_layers) -> list[str]:
    """The full names of the vLLM modules that receive deltas: vLLM's `lora_target_modules`, so that LoRA wraps
    those alone. Without it vLLM wraps every linear of the model, the embedding and the LM head, and runs the
    LoRA ops of all of them at every step although only the receiving layers have nonzero factors."""
    names = set()
    for t in targets:
        module = VLLM_MODULES[t]
        names.update(f"model.layers.{layer}.{VLLM_PACKED.get(module, module)}" for layer in receiving_layers)
    return sorted(names)
