"""The serving bench's settings and `make bench-gpu`'s command (run on CPU at the tiny geometry, so it cannot rot),
the adapter writer against safetensors' reader, and the CPU defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlora_hf.serving.adapters import write_safetensors
from vlora_hf.serving.bench_setup import GEOMETRIES, analytic_flops, bench_sizes
from vlora_hf.serving.cpu import RESERVED_ENV, cpu_dtype, share_cores

ROOT = Path(__file__).resolve().parents[1]


def test_1b_geometry_is_tinyllamas_shape_with_the_release_generator():
    from vlora_hf.bench.systems import text_config, vlora_config

    s = bench_sizes(geometry="1b")
    tc = text_config(s)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads,
            tc.intermediate_size) == (2048, 22, 32, 4, 5632)
    c = vlora_config(s)
    vc = c.vision_config
    assert (vc.hidden_size, vc.num_hidden_layers, (vc.image_size // vc.patch_size) ** 2 + 1) == (1024, 24, 577)
    assert (c.lora_rank, c.generator_hidden_size, c.generator_depth, "".join(c.target_modules)) == (64, 1024, 8, "qkvom")
    assert c.receiving_layers == [3, 7, 11, 15, 19]  # every 4th layer, as the release counts them


def test_unknown_geometry_is_one_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown geometry 'huge'; known: " + ", ".join(GEOMETRIES)):
        bench_sizes(geometry="huge")
    proc = subprocess.run([sys.executable, "-m", "vlora_hf.serving.bench", "--geometry", "huge"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and "invalid choice: 'huge'" in proc.stderr and "1b" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_analytic_flop_ratio_grows_with_the_visual_tokens_share():
    quick, big = (analytic_flops(bench_sizes(geometry=g), 64, 16) for g in ("quick", "7b"))
    for f in (quick, big):
        gf = f["gflops_per_request"]
        assert gf["llava"] > gf["vlora"] > gf["tower"] > 0
        assert f["llava_over_vlora"] == round(gf["llava"] / gf["vlora"], 2)
    # at 7B: LLaVA's 576 visual tokens through 32 layers (~7.6 TFLOP, the paper's figure) dominate
    assert 7000 < big["gflops_per_request"]["llava_prefill"] - big["gflops_per_request"]["vlora_prefill"] < 9000


def test_adapter_writer_reads_back_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a.lora_A.weight": torch.randn(8, 64).bfloat16(), "a.lora_B.weight": torch.randn(64, 8),
               "b": torch.randn(4, 6).half(), "strided": torch.randn(6, 4).T}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())


def test_cpu_defaults(monkeypatch):
    assert cpu_dtype({"avx512f", "avx512_bf16"}) == "bfloat16" == cpu_dtype({"amx_bf16"})
    assert cpu_dtype({"avx2", "avx512f"}) == "float32"
    monkeypatch.delenv(RESERVED_ENV, raising=False)
    assert share_cores(64) is None and RESERVED_ENV not in os.environ  # big machines: vLLM's own reservation
    assert share_cores(2) == "0"
    monkeypatch.setenv(RESERVED_ENV, "1")
    assert share_cores(2) == "1"  # the user's setting wins


@pytest.mark.slow
def test_gpu_run_command_on_cpu_at_the_tiny_geometry(tmp_path):
    """`make bench-gpu`'s command (`--gpu-run`) with the tiny geometry: three vLLM engines, the limit, the FLOP
    ratio and the 7B adapter traffic in the JSON."""
    pytest.importorskip("vllm", reason="vLLM is not installed here: the serving tests run in .venv-serve")
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "vlora_hf.serving.bench", "--gpu-run", "--geometry", "tiny",
                           "--dtype", "float32", "--concurrency", "2", "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"vlora_vllm", "llava_vllm", "llama_vllm"}
    assert result["sizes"]["llm_layers"] == 4 and result["dtype"] == "float32"
    ratios = result["ratios"]
    for key in ("vlora_vllm_vs_llava_vllm_throughput_N2", "limit_vlora_vllm_vs_llava_vllm_throughput_N2",
                "vlora_vllm_vs_llava_vllm_share_of_limit_N2"):
        assert ratios[key] > 0
    assert result["analytic_flops"]["llava_over_vlora"] > 1
    traffic = result["adapter_traffic_7b"]
    assert traffic["adapter_mb"] == pytest.approx(41.9, abs=0.1) and traffic["write_ms"] > 0
    assert set(result["torch_threads"].values()) == {os.cpu_count()}
