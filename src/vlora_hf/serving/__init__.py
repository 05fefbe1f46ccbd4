"""Serving VLoRA on vLLM: each image becomes a per-request LoRA adapter on vLLM's own backbone.

`VLoRAEngine` (offline batches) and `vlora-hf serve` (OpenAI-compatible server) share the image side, the adapter
store and the vLLM plugin. Importing this package does not import vLLM.
"""

from __future__ import annotations

__all__ = ["VLoRAEngine", "export_for_vllm"]


def __getattr__(name):
    if name == "VLoRAEngine":
        from .engine import VLoRAEngine

        return VLoRAEngine
    if name == "export_for_vllm":
        from .export import export_for_vllm

        return export_for_vllm
    raise AttributeError(name)
