"""The serving benchmark's settings: named geometries, the dtype and threads every system shares, the analytic FLOP
ratio and the measured limit.

Geometries (random weights; the same tower, backbone and LM head in every system):
- `quick` / `full`: `vlora-hf bench`'s widths (LLM 128 / 256, 32 layers, tower a quarter as wide, rank scaled);
- `1b`: TinyLlama's shape (width 2048, 22 layers, 32 query / 4 KV heads, MLP 5632), CLIP ViT-L/14-336's tower
  (24 layers, width 1024, 577 tokens), the release's generator (g 1024, depth 8, 16 heads) and targets (rank 64,
  q/k/v/o/m every 4th layer): the LLM's FLOPs dominate per-op overhead;
- `7b`: the paper's (Vicuna-7B: width 4096, 32 layers, MLP 11008; the same tower and generator): for GPUs;
- `tiny`: 4 layers, a 2-layer tower, generator depth 1: only to keep the commands tested on CPU.
"""

from __future__ import annotations

from ..bench.systems import BenchSizes

RELEASE = dict(tower_hidden=1024, gen_dim=1024, gen_heads=16, rank=64)
GEOMETRIES = {
    "quick": BenchSizes.quick(),
    "full": BenchSizes(),
    "1b": BenchSizes(llm_hidden=2048, llm_layers=22, llm_kv_heads=4, intermediate=5632, **RELEASE),
    "7b": BenchSizes(llm_hidden=4096, **RELEASE),
    "tiny": BenchSizes(llm_hidden=128, llm_layers=4, tower_hidden=32, tower_layers=2, gen_depth=1),
}


def bench_sizes(quick: bool = False, width: int | None = None, geometry: str | None = None) -> BenchSizes:
    """A named geometry, LLM `width` with a tower a quarter as wide, `--quick`'s widths, or the full ones."""
    if geometry is not None:
        if geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {geometry!r}; known: {', '.join(GEOMETRIES)}")
        return GEOMETRIES[geometry]
    if width is not None:
        if width < 64 or width % 64:
            raise ValueError(f"--width must be a positive multiple of 64 (the head size), got {width}")
        return BenchSizes().widened(width)
    return GEOMETRIES["quick" if quick else "full"]


def bench_dtype(name: str = "auto") -> str:
    """`auto`: bfloat16 on GPUs and on CPUs with native bf16, float32 elsewhere (cpu.py)."""
    import torch

    from .cpu import cpu_dtype

    if name != "auto":
        return name
    return "bfloat16" if torch.cuda.is_available() else cpu_dtype()


def analytic_flops(sizes: BenchSizes, prompt_tokens: int, new_tokens: int) -> dict:
    """Per request, from our FLOPs model (vlora_hf.flops): LLaVA's and VLoRA's tower, prefill and decode, and their
    ratio; the first new token comes out of the prefill, the others out of decode steps."""
    from .. import flops as F
    from ..bench.systems import vlora_config

    config = vlora_config(sizes)
    n_vis = sizes.describe()["n_patches"]
    tower = F.tower(config)
    text = F.prefill(config, prompt_tokens, logits_rows=1)
    llava_prefill = text + F.llava_visual(config, n_vis) + F.image_key_attention(config, prompt_tokens - 1, n_vis)
    vlora_prefill = text + F.generator(config) + prompt_tokens * F.lowrank_per_token(config)
    steps = range(1, new_tokens)
    llava_decode = sum(F.decode_token(config, prompt_tokens + n_vis + i + 1) for i in steps)
    vlora_decode = sum(F.decode_token(config, prompt_tokens + i + 1) + F.lowrank_per_token(config) for i in steps)
    llava, vlora = tower + llava_prefill + llava_decode, tower + vlora_prefill + vlora_decode
    g = 1e9
    return {"gflops_per_request": {"llava": round(llava / g, 2), "vlora": round(vlora / g, 2),
                                   "tower": round(tower / g, 2), "llava_prefill": round(llava_prefill / g, 2),
                                   "vlora_prefill": round(vlora_prefill / g, 2)},
            "llava_over_vlora": round(llava / vlora, 2)}


def limits(raw: dict) -> dict:
    """Per level: LLaVA on vLLM's time ÷ (the text-only ceiling's time + VLoRA's image side), medians of the same
    run: what VLoRA on vLLM would reach if its LoRA cost nothing; and VLoRA on vLLM's measured ratio as a share of it."""
    import statistics

    out = {}
    if not {"vlora_vllm", "llava_vllm", "llama_vllm"} <= raw.keys():
        return out
    for n, mine in raw["vlora_vllm"].items():
        image = [sum(t.values()) / 1000 for t in mine["image"] if t]
        if not image:
            continue
        llava = statistics.median(raw["llava_vllm"][n]["total"])
        bound = llava / (statistics.median(raw["llama_vllm"][n]["total"]) + statistics.median(image))
        measured = llava / statistics.median(mine["total"])
        out[f"limit_vlora_vllm_vs_llava_vllm_throughput_N{n}"] = round(bound, 2)
        out[f"vlora_vllm_vs_llava_vllm_share_of_limit_N{n}"] = round(measured / bound, 2)
    return out
