"""`vlora-hf bench`: VLoRA against text-only, LLaVA and YOPO-style LLaVA on random-weight models.

Every figure is the median of interleaved repeats (system A, B, C, D, A, B, ...) with min and max. All systems
share the same tower and backbone weights and run the same greedy loop (prefill → argmax → decode steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_file
from . import flops as F
from .systems import (
    BenchSizes, Llava, TextOnly, VLoRA, Yopo, build_llava, build_text_only, build_vlora,
)
from .timing import describe_times, interleaved, peak_memory, sync, timed
from .yopo import YopoReductions

SYSTEMS = ("text_only", "vlora", "llava", "yopo")


@dataclass
class BenchSettings:
    sizes: BenchSizes = field(default_factory=BenchSizes)
    text_lengths: tuple = (32, 64, 256)
    ref_length: int = 64  # T for decode, overhead, KV and throughput figures
    repeats: int = 5
    decode_tokens: int = 16
    batch: int = 8
    new_tokens: int = 16  # tokens generated per row in the throughput run
    yopo: YopoReductions = field(default_factory=YopoReductions)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    seed: int = 0
    memory: bool = True

    @classmethod
    def full(cls) -> "BenchSettings":
        return cls()

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(sizes=BenchSizes.quick(), repeats=3, decode_tokens=8, new_tokens=8)

    @classmethod
    def toy(cls) -> "BenchSettings":
        """Tiny sizes for tests (16 patches on a 56-px image); code paths only, figures meaningless."""
        return cls(
            sizes=BenchSizes(llm_hidden=64, llm_layers=4, tower_hidden=32, tower_layers=2, image_size=56,
                             gen_depth=1, skip_layers=2),
            text_lengths=(4, 8), ref_length=8, repeats=2, decode_tokens=2, batch=2, new_tokens=2,
            yopo=YopoReductions(keep_layers=2, head_fraction=0.5, ffn_fraction=0.5, window=8),
        )


# ----------------------------------------------------------------------------------------------- main run
def greedy(sys_, inputs, n_new: int):
    """Prefill + (n_new - 1) decode steps; returns the generated ids [b, n_new] and the final state."""
    logits, state = sys_.prefill(inputs)
    tok = logits.argmax(-1)
    toks = [tok]
    for _ in range(n_new - 1):
        logits, state = sys_.decode(tok, state)
        tok = logits.argmax(-1)
        toks.append(tok)
    return torch.stack(toks, 1), state


def build_systems(st: BenchSettings):
    dtype = getattr(torch, st.dtype)
    s = st.sizes
    llava = build_llava(s, dtype=dtype, seed=st.seed).to(st.device)
    text = build_text_only(s, llava, dtype=dtype).to(st.device)
    vlora = build_vlora(s, llava, dtype=dtype, seed=st.seed + 1).to(st.device)
    n_vis = (s.image_size // s.patch_size) ** 2
    red = YopoReductions(min(st.yopo.keep_layers, s.llm_layers), st.yopo.head_fraction, st.yopo.ffn_fraction,
                         min(st.yopo.window, n_vis))
    return {"text_only": TextOnly(text), "vlora": VLoRA(vlora), "llava": Llava(llava), "yopo": Yopo(llava, red)}


def _inputs(st: BenchSettings, batch: int, T: int, gen: torch.Generator):
    s = st.sizes
    ids = torch.randint(3, 32000, (batch, T), generator=gen)
    ids[:, 0] = 1  # BOS, then the image, then T-1 text tokens
    px = torch.randn(batch, 3, s.image_size, s.image_size, generator=gen)  # a different image per row
    return ids.to(st.device), px.to(st.device, getattr(torch, st.dtype))


def run_bench(st: BenchSettings, log=print) -> dict:
    """Build the four systems, time them side by side, and summarise (ratios, medians, FLOPs, machine)."""
    if st.threads:
        torch.set_num_threads(st.threads)
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(st.seed)
    log(f"building models: {st.sizes.describe()}")
    systems = build_systems(st)
    ids1, px1 = _inputs(st, 1, max(st.text_lengths + (st.ref_length,)), gen)
    prepared = {T: {k: s_.prepare(ids1[:, :T], px1) for k, s_ in systems.items()}
                for T in set(st.text_lengths) | {st.ref_length}}
    for per in prepared.values():  # warm-up: one prefill + decode per system and length
        for k, s_ in systems.items():
            greedy(s_, per[k], 2)
    raw = time_latencies(st, systems, prepared, px1, log)
    raw.update(time_batches(st, systems, prepared, gen, log))
    result = summarize(st, systems, prepared, raw)
    result["elapsed_s"] = time.perf_counter() - t_start
    return result


def time_latencies(st: BenchSettings, systems: dict, prepared: dict, px1, log) -> dict:
    """Batch-1 timings: time to first token per length, decode per token, the LLM overhead of given weights,
    the generator and the tower alone. -> {measurement: {system: [seconds per repeat]}}"""
    dev, T0, v = st.device, st.ref_length, systems["vlora"]
    raw: dict = {}
    # 1. time to first token (tower + generator / projector + prefill + argmax), batch 1
    for T in st.text_lengths:
        log(f"ttft T={T}")
        fns = {k: (lambda k=k, T=T: timed(lambda: systems[k].prefill(prepared[T][k])[0].argmax(-1), dev)[0])
               for k in systems}
        raw[f"ttft_s_t{T}"] = interleaved(fns, st.repeats)

    # 2. per-token decode latency, batch 1, after a T0 prefill (untimed)
    log("decode")

    def _decode(k):
        logits, state = systems[k].prefill(prepared[T0][k])
        tok = logits.argmax(-1)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(st.decode_tokens):
            logits, state = systems[k].decode(tok, state)
            tok = logits.argmax(-1)
        sync(dev)
        return (time.perf_counter() - t0) / st.decode_tokens

    raw["decode_s_per_token"] = interleaved({k: (lambda k=k: _decode(k)) for k in systems}, st.repeats)

    # 3. LLM overhead of the perceptual weights: VLoRA prefill with given weights vs the plain backbone
    log("llm overhead (prefill with given weights)")
    with torch.inference_mode():
        w1 = v.weights(px1)
    raw["prefill_given_s"] = interleaved(
        {
            "text_only": lambda: timed(lambda: systems["text_only"].prefill(prepared[T0]["text_only"]), dev)[0],
            "vlora": lambda: timed(lambda: v.prefill_with(prepared[T0]["vlora"], w1), dev)[0],
        },
        3 * st.repeats,  # cheap and noise-sensitive: three times the repeats
    )

    # 4. the generator's own time and the (shared) tower's time, batch 1
    log("generator")
    with torch.inference_mode():
        feats = v.model.model.get_vision_features(px1)
        raw["generator_s"] = interleaved(
            {"generator": lambda: timed(lambda: v.model.model.generator(feats), dev)[0],
             "tower": lambda: timed(lambda: v.model.model.get_vision_features(px1), dev)[0]},
            3 * st.repeats)

    return raw


def time_batches(st: BenchSettings, systems: dict, prepared: dict, gen, log) -> dict:
    """Batch generate throughput, KV-cache bytes after a batch-1 prefill, and peak memory of a batch generate."""
    dev, T0 = st.device, st.ref_length
    raw: dict = {}
    # batch generate throughput: `batch` rows, a different image each, T0 text tokens, new_tokens each
    log(f"throughput b={st.batch}")
    idsb, pxb = _inputs(st, st.batch, T0, gen)
    prep_b = {k: s_.prepare(idsb, pxb) for k, s_ in systems.items()}
    for k, s_ in systems.items():
        greedy(s_, prep_b[k], 2)
    raw[f"generate_s_b{st.batch}"] = interleaved(
        {k: (lambda k=k: timed(lambda: greedy(systems[k], prep_b[k], st.new_tokens), dev)[0]) for k in systems},
        st.repeats)

    # KV-cache bytes after a batch-1 prefill of T0 text tokens
    kv = {}
    for k, s_ in systems.items():
        _, state = s_.prefill(prepared[T0][k])
        kv[k] = s_.cache_bytes(state)
        del state

    # peak memory of one batch generate per system (after the timings; models already resident)
    mem, mem_method = {}, ""
    if st.memory:
        log("peak memory")
        for k in systems:
            mem[k], mem_method = peak_memory(lambda k=k: greedy(systems[k], prep_b[k], st.new_tokens), dev)
    return {**raw, "kv_cache_bytes": kv, "peak_memory_bytes": mem, "peak_memory_method": mem_method}


def summarize(st: BenchSettings, systems: dict, prepared: dict, measured: dict) -> dict:
    """Medians, spreads and the headline ratios of the timings, with the FLOPs and the settings."""
    dev, T0 = st.device, st.ref_length
    kv, mem = measured.pop("kv_cache_bytes"), measured.pop("peak_memory_bytes")
    mem_method = measured.pop("peak_memory_method")
    raw = measured
    med = {name: {k: statistics.median(x) for k, x in d.items()} for name, d in raw.items()}
    stats = {name: {k: describe_times(x) for k, x in d.items()} for name, d in raw.items()}
    tput = {k: st.batch * st.new_tokens / x for k, x in med[f"generate_s_b{st.batch}"].items()}
    ttft = med[f"ttft_s_t{T0}"] if f"ttft_s_t{T0}" in med else None
    if ttft is None:  # ref length not among the TTFT lengths: measure it now
        ttft = {k: statistics.median(x) for k, x in interleaved(
            {k: (lambda k=k: timed(lambda: systems[k].prefill(prepared[T0][k]), dev)[0]) for k in systems},
            st.repeats).items()}
    dec = med["decode_s_per_token"]
    pg = med["prefill_given_s"]
    result = {
        f"ttft_ratio_vs_llava_t{T0}": ttft["vlora"] / ttft["llava"],
        f"ttft_ratio_vs_yopo_t{T0}": ttft["vlora"] / ttft["yopo"],
        f"throughput_ratio_vs_llava_b{st.batch}": tput["vlora"] / tput["llava"],
        f"throughput_ratio_vs_yopo_b{st.batch}": tput["vlora"] / tput["yopo"],
        "llm_overhead_prefill": pg["vlora"] / pg["text_only"],
        "llm_overhead_decode": dec["vlora"] / dec["text_only"],
        "kv_cache_ratio_vs_llava": kv["vlora"] / kv["llava"],
        "generator_ms": med["generator_s"]["generator"] * 1e3,
        "tower_ms": med["generator_s"]["tower"] * 1e3,
        "medians": {
            **{f"ttft_ms_t{T}": {k: x * 1e3 for k, x in med[f"ttft_s_t{T}"].items()} for T in st.text_lengths},
            "decode_ms_per_token": {k: x * 1e3 for k, x in dec.items()},
            f"prefill_given_weights_ms_t{T0}": {k: x * 1e3 for k, x in pg.items()},
            f"generate_ms_b{st.batch}": {k: x * 1e3 for k, x in med[f"generate_s_b{st.batch}"].items()},
            f"throughput_tok_per_s_b{st.batch}": tput,
            "kv_cache_bytes": kv,
            "peak_memory_bytes": mem,
        },
        "stats_seconds": stats,
        "raw_seconds": raw,
        "peak_memory_method": mem_method,
        "flops": {"bench": st.sizes.flops(systems["yopo"].runner.red, T0), "paper_7b": F.paper_7b()},
        "settings": {
            **{k: v_ for k, v_ in asdict(st).items() if k not in ("sizes", "yopo")},
            "sizes": st.sizes.describe(),
            "yopo": asdict(systems["yopo"].runner.red),
        },
        "machine": machine_info(st),
    }
    # short aliases required by the spec (the reference length is 64 in full and quick mode)
    result.setdefault("ttft_ratio_vs_llava_t64", result[f"ttft_ratio_vs_llava_t{T0}"])
    result.setdefault("ttft_ratio_vs_yopo_t64", result[f"ttft_ratio_vs_yopo_t{T0}"])
    result.setdefault("throughput_ratio_vs_llava_b8", result[f"throughput_ratio_vs_llava_b{st.batch}"])
    result["targets"] = targets(result)
    return result


def targets(r: dict) -> dict:
    """The speed goals, each with its measured value and whether it is met."""
    rows = {
        "llm_overhead_prefill <= 1.05": (r["llm_overhead_prefill"], r["llm_overhead_prefill"] <= 1.05),
        "llm_overhead_decode <= 1.05": (r["llm_overhead_decode"], r["llm_overhead_decode"] <= 1.05),
        "ttft_ratio_vs_llava_t64 <= 0.25": (r["ttft_ratio_vs_llava_t64"], r["ttft_ratio_vs_llava_t64"] <= 0.25),
        "throughput_ratio_vs_llava_b8 >= 3": (r["throughput_ratio_vs_llava_b8"], r["throughput_ratio_vs_llava_b8"] >= 3),
        "vlora faster than yopo at T=64 (ttft_ratio_vs_yopo_t64 < 1)": (
            r["ttft_ratio_vs_yopo_t64"], r["ttft_ratio_vs_yopo_t64"] < 1),
    }
    return {k: {"value": round(val, 4), "met": bool(ok)} for k, (val, ok) in rows.items()}


def machine_info(st: BenchSettings) -> dict:
    import transformers

    info = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": st.device, "dtype": st.dtype,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    if st.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ----------------------------------------------------------------------------------------------- CLI
def _atomic_write(path: Path, data: bytes):
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlora-hf bench",
        description="Benchmark VLoRA against text-only, LLaVA and YOPO-style LLaVA on random-weight models with "
        "the paper's geometry scaled in width (336-px CLIP-style tower, 576 patches, 32-layer Llama backbone).",
    )
    p.add_argument("--quick", action="store_true", help="narrower models, 3 repeats (about 1-3 minutes on 2 cores)")
    p.add_argument("--json", type=Path, help="write all figures as JSON here")
    p.add_argument("--markdown", type=Path, help="write a Markdown report here")
    p.add_argument("--plot", type=Path, help="write a PNG of TTFT vs text length here (needs matplotlib)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: most stable on a shared machine; 0 = torch's default)")
    p.add_argument("--repeats", type=int, help="interleaved repeats per figure (default 5, quick 3)")
    p.add_argument("--hidden", type=int, help="LLM width (default 256, quick 128); tower width = hidden/4")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--toy", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    st = BenchSettings.toy() if args.toy else BenchSettings.quick() if args.quick else BenchSettings.full()
    if args.hidden:
        if args.hidden % 64 and not args.toy:
            raise ValueError(f"--hidden must be a multiple of 64 (head size 64), got {args.hidden}")
        st.sizes = st.sizes.widened(args.hidden)
    if args.repeats:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
        st.repeats = args.repeats
    st.device, st.dtype, st.threads, st.memory = args.device, args.dtype, args.threads or None, not args.no_memory
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    res = run_bench(st, log=log)
    res["command"] = "vlora-hf bench " + " ".join(sys.argv[1:] if argv is None else argv)
    from .report import markdown, plot, summary_lines

    print("\n".join(summary_lines(res)))
    if args.json:
        _atomic_write(args.json, json.dumps(res, indent=2).encode())
    if args.plot:
        if not plot(res, args.plot):
            log("matplotlib is not installed: no plot written (pip install matplotlib)")
    if args.markdown:
        _atomic_write(args.markdown, markdown(res, plot_path=args.plot, md_path=args.markdown).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
