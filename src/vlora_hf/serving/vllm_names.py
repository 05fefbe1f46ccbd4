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
