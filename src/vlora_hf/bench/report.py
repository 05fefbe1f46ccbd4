"""Text, Markdown and PNG renderings of a `run_bench` result."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_file

ORDER = ("text_only", "vlora", "llava", "yopo")


def _ms(stats_s: dict) -> str:
    return f"{stats_s['median'] * 1e3:.1f} ({stats_s['min'] * 1e3:.1f}–{stats_s['max'] * 1e3:.1f})"


def _lengths(r):
    return sorted(int(k.rsplit("_t", 1)[1]) for k in r["stats_seconds"] if k.startswith("ttft_s_t"))


def summary_lines(r: dict) -> list[str]:
    lines = ["targets:"]
    for name, t in r["targets"].items():
        lines.append(f"  {'MET    ' if t['met'] else 'NOT MET'}  {name}: {t['value']:.3f}")
    m = r["medians"]
    for T in _lengths(r):
        lines.append(f"ttft ms T={T}: " + ", ".join(f"{k} {m[f'ttft_ms_t{T}'][k]:.1f}" for k in ORDER))
    lines.append("decode ms/token: " + ", ".join(f"{k} {m['decode_ms_per_token'][k]:.2f}" for k in ORDER))
    b = r["settings"]["batch"]
    lines.append(f"throughput tok/s b={b}: "
                 + ", ".join(f"{k} {m[f'throughput_tok_per_s_b{b}'][k]:.1f}" for k in ORDER))
    lines.append(f"generator {r['generator_ms']:.1f} ms, tower {r['tower_ms']:.1f} ms; elapsed {r['elapsed_s']:.0f} s")
    return lines


def markdown(r: dict, plot_path=None, md_path=None) -> str:
    s, m, st = r["settings"], r["medians"], r["stats_seconds"]
    b, T0 = s["batch"], s["ref_length"]
    z = s["sizes"]
    out = ["## Results", ""]
    out += ["| target | value | met |", "|---|---|---|"]
    out += [f"| {k} | {t['value']:.3f} | {'yes' if t['met'] else '**no**'} |" for k, t in r["targets"].items()]
    out += ["", f"Medians of {s['repeats']} interleaved repeats (3× that for the given-weights prefill and the generator), (min–max) in brackets; milliseconds unless noted.", ""]
    out += ["| figure | " + " | ".join(ORDER) + " |", "|---|" + "---|" * len(ORDER)]
    for T in _lengths(r):
        out.append(f"| TTFT, T={T} | " + " | ".join(_ms(st[f"ttft_s_t{T}"][k]) for k in ORDER) + " |")
    out.append("| decode, per token (b=1) | " + " | ".join(_ms(st["decode_s_per_token"][k]) for k in ORDER) + " |")
    out.append(f"| prefill with given perceptual weights, T={T0} (no tower) | "
               + " | ".join(_ms(st["prefill_given_s"][k]) if k in st["prefill_given_s"] else "–" for k in ORDER) + " |")
    out.append(f"| generate b={b}, {s['new_tokens']} new tokens each | "
               + " | ".join(_ms(st[f"generate_s_b{b}"][k]) for k in ORDER) + " |")
    out.append(f"| throughput b={b} (tok/s) | "
               + " | ".join(f"{m[f'throughput_tok_per_s_b{b}'][k]:.1f}" for k in ORDER) + " |")
    out.append(f"| KV cache after prefill, T={T0}, b=1 (MiB) | "
               + " | ".join(f"{m['kv_cache_bytes'][k] / 2**20:.2f}" for k in ORDER) + " |")
    if m.get("peak_memory_bytes"):
        out.append(f"| peak memory of the b={b} generate (MiB) | "
                   + " | ".join(f"{m['peak_memory_bytes'][k] / 2**20:.1f}" for k in ORDER) + " |")
    out += ["", f"Generator alone (b=1): {_ms(st['generator_s']['generator'])} ms; vision tower (shared by all "
            f"image systems): {_ms(st['generator_s']['tower'])} ms.", ""]
    if r.get("peak_memory_method"):
        out += [f"Peak memory: {r['peak_memory_method']}.", ""]
    fb, fp = r["flops"]["bench"], r["flops"]["paper_7b"]
    out += ["### Analytic FLOPs", "", "| | LLaVA | YOPO-style | VLoRA (generator + low-rank on text) | tower |",
            "|---|---|---|---|---|"]
    for label, f in (("this benchmark's models (GFLOPs)", fb), ("paper 7B setting (TFLOPs)", fp)):
        scale = 1e-3 if "TFLOPs" in label else 1.0
        vg = f["visual_gflops"]
        out.append(f"| visual compute, {label} | {vg['llava'] * scale:.3g} | {vg['yopo'] * scale:.3g} | "
                   f"{vg['vlora'] * scale:.3g} ({vg['vlora_generator'] * scale:.3g} + {vg['vlora_lowrank_text'] * scale:.3g})"
                   f" | {f['tower_gflops'] * scale:.3g} |")
    pk = f"prefill_gflops_t{T0}"
    if pk in fb:
        out.append(f"| whole prefill at T={T0}, this benchmark (GFLOPs; text-only {fb[pk]['text_only']:.3g}) | "
                   f"{fb[pk]['llava']:.3g} | {fb[pk]['yopo']:.3g} | {fb[pk]['vlora']:.3g} | – |")
    rep = fp["paper_reported_visual_tflops"]
    out += ["", f"Seed paper's reported visual compute at 7B: LLaVA-1.5 {rep['llava']} TFLOPs, YOPO {rep['yopo']} TFLOPs.",
            ""]
    if plot_path is not None:
        rel = os.path.relpath(Path(plot_path).resolve(), Path(md_path).resolve().parent) if md_path else str(plot_path)
        out += [f"![TTFT vs text length]({rel})", ""]
    mi = r["machine"]
    out += ["### Machine and settings", "",
            f"- {mi.get('cpu', '?')}, {mi['cpu_count']} logical CPUs, torch threads {mi['torch_threads']}, "
            f"device {mi['device']}, dtype {mi['dtype']}; torch {mi['torch']}, transformers {mi['transformers']}, "
            f"Python {mi['python']}, {mi['platform']}; load average at the end {mi.get('loadavg_at_end')}.",
            f"- Models: LLM hidden {z['llm_hidden']}, {z['llm_layers']} layers, {z['llm_heads']} heads, MLP "
            f"{z['llm_intermediate']}, vocab {z['vocab']}; tower hidden {z['tower_hidden']}, {z['tower_layers']} layers, "
            f"{z['image_size']} px / {z['patch_size']} px patches = {z['n_patches']} patches; generator g={z['gen_dim']}, "
            f"depth {z['gen_depth']}, {z['gen_heads']} heads, rank {z['rank']}, every {z['skip_layers']}th layer, qkvom.",
            f"- YOPO-style reductions: {r['settings']['yopo']}.",
            f"- Command: `{r.get('command', 'vlora-hf bench')}`; took {r['elapsed_s']:.0f} s.", ""]
    return "\n".join(out)


def plot(r: dict, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    st = r["stats_seconds"]
    Ts = _lengths(r)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for k in ORDER:
        med = [st[f"ttft_s_t{T}"][k]["median"] * 1e3 for T in Ts]
        lo = [med[i] - st[f"ttft_s_t{T}"][k]["min"] * 1e3 for i, T in enumerate(Ts)]
        hi = [st[f"ttft_s_t{T}"][k]["max"] * 1e3 - med[i] for i, T in enumerate(Ts)]
        ax.errorbar(Ts, med, yerr=[lo, hi], marker="o", capsize=3, label=k)
    ax.set_xscale("log", base=2)
    ax.set_xticks(Ts, [str(T) for T in Ts])
    ax.set_yscale("log")
    ax.set_xlabel("text tokens")
    ax.set_ylabel("time to first token (ms, median, min–max)")
    z = r["settings"]["sizes"]
    ax.set_title(f"TTFT, random weights, LLM h={z['llm_hidden']}×{z['llm_layers']}L, {z['n_patches']} patches", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return True
