"""Tiny random configurations shared by the tests (no network, a few thousand parameters)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig, Qwen2Config, SiglipVisionConfig

REPO = Path(__file__).resolve().parents[1]
# A tiny checkpoint saved by the authors' release code, with its outputs: the parity reference.
FIXTURE = REPO / "tests" / "fixtures" / "official_vlora_tiny_a"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"release fixture missing: {FIXTURE}")

TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4)


def llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TEXT, "num_key_value_heads": 4, **overrides})


def qwen2_config(**overrides) -> Qwen2Config:  # GQA: 4 query heads, 2 key/value heads
    return Qwen2Config(**{**TEXT, "num_key_value_heads": 2, "tie_word_embeddings": False, **overrides})


def mistral_config(**overrides) -> MistralConfig:
    return MistralConfig(**{**TEXT, "num_key_value_heads": 1, "sliding_window": None, **overrides})


def clip_config(**overrides) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        **{"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "image_size": 28, "patch_size": 14, **overrides}
    )


def siglip_config(**overrides) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        **{"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "image_size": 28, "patch_size": 14, **overrides}
    )


def vlora_config(text=None, vision=None, **overrides):
    from vlora_hf import VLoRAConfig

    vision = vision or clip_config()
    strategy = "full" if vision.model_type != "clip_vision_model" else "default"
    return VLoRAConfig(
        **{"text_config": text or llama_config(), "vision_config": vision, "generator_hidden_size": 16,
           "generator_depth": 1, "generator_num_heads": 4, "lora_rank": 4, "lora_alpha": 8, "skip_layers": 2,
           "vision_feature_select_strategy": strategy, **overrides}
    )


def randomize_B(model, seed: int = 0) -> None:
    """B starts at zero (the image has no effect before training); give it values so images matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.model.generator.lora_B.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.5)


def tiny_model(seed: int = 0, **config_kwargs):
    from vlora_hf import VLoRAForCausalLM

    torch.manual_seed(seed)
    model = VLoRAForCausalLM(vlora_config(**config_kwargs)).eval()
    randomize_B(model, seed)
    return model


def hidden_package_env() -> dict:
    """Environment for a subprocess in which `import vlora_hf` must fail (remote code only)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    return env


HIDE_PACKAGE = (
    "import sys\n"
    # keep site-packages even when the venv sits in a folder named like the project (a clone in /tmp/vlora_hf)
    "sys.path = [p for p in sys.path if 'site-packages' in p or ('vlora' not in p.lower() and not p.endswith('/src'))]\n"
    "sys.modules['vlora_hf'] = None\n"
    "try:\n"
    "    import vlora_hf\n"
    "    raise SystemExit('vlora_hf is importable')\n"
    "except ImportError:\n"
    "    pass\n"
)

PYTHON = sys.executable
