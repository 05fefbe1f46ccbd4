"""The head-to-head's report: one JSON holding every number, a markdown page reading it out, and a plot of
held-out accuracy against training time."""

import json
from pathlib import Path

from ..atomic import atomic_file
from .cost import TRAIN_FACTOR, training_flops_per_sample
from .levers import GOAL_POINTS, GOAL_STEP_RATIO, levers_markdown, variant_verdicts

NAMES = {"vlora": "VLoRA", "llava": "LLaVA-1.5"}


def spread(values: list[float]) -> dict:
    """Mean and half the range over seeds (with two seeds: mean ± half their difference)."""
    values = [float(v) for v in values]
    return {"mean": sum(values) / len(values), "half_range": (max(values) - min(values)) / 2, "values": values}


def summarize(results: list[dict]) -> dict:
    """Per-run results -> per-system aggregates (final accuracy per family, timing, cost); VLoRA and LLaVA
    first, then the VLoRA variants in the order given."""
    systems = {}
    for name in dict.fromkeys([*NAMES, *(r["system"] for r in results)]):
        runs = sorted((r for r in results if r["system"] == name), key=lambda r: r["seed"])
        if not runs:
            continue
        families = list(runs[0]["points"][-1]["per_family"])
        systems[name] = {
            "label": NAMES.get(name) or runs[0]["variant"]["label"],
            "variant": runs[0].get("variant"),
            "seeds": [r["seed"] for r in runs],
            "final": {f: spread([r["points"][-1]["per_family"][f] for r in runs]) for f in families},
            "final_overall": spread([r["points"][-1]["overall"] for r in runs]),
            "seconds_per_step": spread([r["seconds_per_step"] for r in runs]),
            "train_seconds": spread([r["train_seconds"] for r in runs]),
            "setup_seconds": spread([r["setup_seconds"] for r in runs]),
            "total_seconds": spread([r["total_seconds"] for r in runs]),
            "steps": runs[0]["steps"], "batch_size": runs[0]["batch_size"],
            "parameters": runs[0]["parameters"], "trainable": runs[0]["trainable"],
            "ttft_ms": spread([r["inference"]["ttft_ms"] for r in runs]),
            "kv_cache_bytes_per_question": runs[0]["inference"]["kv_cache_bytes"],
            "image_weights_bytes_per_question": runs[0]["inference"]["image_weights_bytes"],
            "prompt_tokens": runs[0]["inference"]["prompt_tokens"],
            "runs": runs,
        }
        probed = [r for r in runs if "probes" in r]
        if probed:
            systems[name]["probes"] = {f: {where: spread([r["probes"][f][where] for r in probed]) for where in acc}
                                       for f, acc in probed[0]["probes"].items()}
            systems[name]["probe_seeds"] = [r["seed"] for r in probed]
    return systems


def training_flops(systems: dict) -> dict:
    """Analytic training FLOPs per sample for both, from the VLoRA run's config and mean conversation length;
    each VLoRA variant's from its own config (kept in its system as `training_flops_per_sample`)."""
    from ..modeling import VLoRAConfig

    def config_of(run):
        if "vlora_config" in run:
            return VLoRAConfig.from_dict(run["vlora_config"])
        return VLoRAConfig.from_pretrained(run["model_dir"])

    run = systems["vlora"]["runs"][0]
    tokens = round(run["mean_text_tokens"])
    for name, system in systems.items():
        if name != "llava":
            system["training_flops_per_sample"] = training_flops_per_sample(config_of(system["runs"][0]), tokens)["vlora"]
    return {"text_tokens": tokens, "factor": TRAIN_FACTOR, **training_flops_per_sample(config_of(run), tokens)}


def verdict(systems: dict, flops: dict, side_by_side: dict | None = None) -> dict:
    """Per-family differences and the step-time ratio (the interleaved one when measured: separate runs on a
    shared machine see different loads)."""
    v, l = systems["vlora"], systems["llava"]
    families = {f: 100 * (v["final"][f]["mean"] - l["final"][f]["mean"]) for f in v["final"]}
    if side_by_side:
        ratio = side_by_side["vlora"]["step_seconds"] / side_by_side["llava"]["step_seconds"]
    else:
        ratio = v["seconds_per_step"]["mean"] / l["seconds_per_step"]["mean"]
    return {"vlora_minus_llava_points": families,
            "vlora_wins": sorted(f for f, d in families.items() if d > GOAL_POINTS),
            "within_2_points": sorted(f for f, d in families.items() if abs(d) <= GOAL_POINTS),
            "vlora_loses": sorted(f for f, d in families.items() if d < -GOAL_POINTS),
            "step_time_ratio": ratio, "flops_ratio": flops["vlora"] / flops["llava"],
            "goal_met": all(d >= -GOAL_POINTS for d in families.values()) and ratio <= GOAL_STEP_RATIO,
            "variants": variant_verdicts(systems, side_by_side)}


def build_report(results: list[dict], command: str, machine: dict, settings: dict, wall_seconds: float,
                 note: str | None = None, analysis: str | None = None, side_by_side: dict | None = None) -> dict:
    systems = summarize(results)
    flops = training_flops(systems)
    return {"command": command, "machine": machine, "settings": settings, "scale_note": note,
            "wall_seconds": wall_seconds, "families": list(systems["vlora"]["final"]),
            "training_flops_per_sample": flops, "systems": systems, "verdict": verdict(systems, flops, side_by_side),
            "analysis": analysis, "side_by_side": side_by_side}


def _pct(s: dict) -> str:
    if len(s["values"]) == 1:
        return f"{100 * s['mean']:.1f}"
    return f"{100 * s['mean']:.1f} ± {100 * s['half_range']:.1f}"


def markdown(report: dict, png_name: str) -> str:
    """The page, section by section in reading order (one function over 60 lines so that order stays visible;
    the Levers section is levers_markdown's)."""
    v, l = report["systems"]["vlora"], report["systems"]["llava"]
    verdict, flops = report["verdict"], report["training_flops_per_sample"]
    m = report["machine"]
    lines = ["# VLoRA vs LLaVA-1.5 at equal size, same data, same steps", ""]
    if report.get("scale_note"):
        lines += [f"> **Scale:** {report['scale_note']}", ""]
    lines += [f"Both systems are built by `vlora-hf train` from `{report['settings']['recipe']}` (same tower, backbone, "
              "tokenizer, chat template, data, batch, schedule and steps); they differ only in how the image reaches "
              "the LLM: VLoRA's generator turns it into low-rank weight deltas, LLaVA-1.5 (transformers' "
              "`LlavaForConditionalGeneration`) feeds the tower's patch tokens through a 2-layer MLP projector.", "",
              f"- Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, "
              f"transformers {m['transformers']}; {v['runs'][0]['torch_threads']} torch thread per run.",
              f"- Steps: {v['steps']} × batch {v['batch_size']}; seeds {v['seeds']}; held-out: "
              f"{v['runs'][0]['heldout_questions']} questions (eval split, never trained on), scored every "
              f"{report['settings']['eval_every']} steps.",
              f"- Command: `{report['command']}` ({report['wall_seconds'] / 60:.0f} min wall).", "",
              "## Held-out exact match at the end (%, mean ± half-range over seeds)", "",
              "| family | VLoRA | LLaVA-1.5 | VLoRA − LLaVA (points) |", "|---|---:|---:|---:|"]
    for f in report["families"]:
        lines.append(f"| {f} | {_pct(v['final'][f])} | {_pct(l['final'][f])} | "
                     f"{verdict['vlora_minus_llava_points'][f]:+.1f} |")
    lines.append(f"| **all** | {_pct(v['final_overall'])} | {_pct(l['final_overall'])} | "
                 f"{100 * (v['final_overall']['mean'] - l['final_overall']['mean']):+.1f} |")
    lines += ["", f"![held-out accuracy vs training time]({png_name})", "",
              "## Along training (held-out %, mean over seeds)", "",
              "| step | VLoRA train s | VLoRA all | LLaVA train s | LLaVA all |", "|---:|---:|---:|---:|---:|"]
    for i, point in enumerate(v["runs"][0]["points"]):
        vs = [r["points"][i] for r in v["runs"] if i < len(r["points"])]
        ls = [r["points"][i] for r in l["runs"] if i < len(r["points"])]
        mean = lambda ps, k: sum(p[k] for p in ps) / len(ps)  # noqa: E731
        lines.append(f"| {point['step']} | {mean(vs, 'train_seconds'):.0f} | {100 * mean(vs, 'overall'):.1f} | "
                     f"{mean(ls, 'train_seconds'):.0f} | {100 * mean(ls, 'overall'):.1f} |")
    lines += ["", "Per family and per seed along training: `" + Path(report.get("json_name", "")).name + "`.", "",
              "## Cost", "", "| | VLoRA | LLaVA-1.5 | ratio |", "|---|---:|---:|---:|"]
    rows = [("training s / step", v["seconds_per_step"]["mean"], l["seconds_per_step"]["mean"], ".3f"),
            ("training s in all (steps)", v["train_seconds"]["mean"], l["train_seconds"]["mean"], ".0f"),
            ("setup s (data, tower warm start)", v["setup_seconds"]["mean"], l["setup_seconds"]["mean"], ".0f"),
            (f"training GFLOPs / sample ({TRAIN_FACTOR}× forward, {flops['text_tokens']} text tokens)",
             flops["vlora"] / 1e9, flops["llava"] / 1e9, ".4f"),
            ("time to first token, ms (1 question)", v["ttft_ms"]["mean"], l["ttft_ms"]["mean"], ".1f"),
            ("prompt tokens in the LLM", v["prompt_tokens"], l["prompt_tokens"], ".0f"),
            ("KV-cache bytes / question", v["kv_cache_bytes_per_question"], l["kv_cache_bytes_per_question"], ",.0f"),
            ("+ per-image low-rank weights, bytes", v["image_weights_bytes_per_question"], 0, ",.0f"),
            ("parameters", v["parameters"], l["parameters"], ",")]
    for name, a, b, fmt in rows:
        ratio = f"{a / b:.2f}" if b else "—"
        lines.append(f"| {name} | {format(a, fmt)} | {format(b, fmt)} | {ratio} |")
    side = report.get("side_by_side")
    if side:
        sv, sl = side["vlora"], side["llava"]
        untrained = [report["systems"][n]["label"] for n in side
                     if side[n].get("weights") == "untrained" and n in report["systems"]]
        lines += ["", f"Side by side (one process, one thread, the systems alternating so all see the same load; "
                      f"medians of {sv['steps']} training steps of batch {sv['batch_size']} and of {sv['questions']} "
                      "questions" + (f"; {', '.join(untrained)} timed on untrained models of the same shapes: a "
                                     "step's time does not depend on the weights' values" if untrained else "") + "):", "", "| | VLoRA | LLaVA-1.5 | ratio |", "|---|---:|---:|---:|",
                  f"| training s / step | {sv['step_seconds']:.3f} | {sl['step_seconds']:.3f} | "
                  f"{sv['step_seconds'] / sl['step_seconds']:.2f} |",
                  f"| time to first token, ms | {sv['ttft_ms']:.1f} | {sl['ttft_ms']:.1f} | "
                  f"{sv['ttft_ms'] / sl['ttft_ms']:.2f} |"]
    lines += ["", "## Verdict", "",
              f"- VLoRA wins by more than {GOAL_POINTS:g} points: {', '.join(verdict['vlora_wins']) or 'none'}.",
              f"- Within {GOAL_POINTS:g} points: {', '.join(verdict['within_2_points']) or 'none'}.",
              f"- VLoRA loses by more than {GOAL_POINTS:g} points: {', '.join(verdict['vlora_loses']) or 'none'}.",
              f"- Training time per step VLoRA / LLaVA: {verdict['step_time_ratio']:.2f} (goal ≤ {GOAL_STEP_RATIO}); "
              f"analytic training FLOPs ratio {verdict['flops_ratio']:.2f}.",
              f"- Goal (within {GOAL_POINTS:g} points on every family at ≤ {GOAL_STEP_RATIO}× the step time): "
              f"{'met' if verdict['goal_met'] else 'not met'}."]
    if "probes" in v and "probes" in l:
        lines += ["", f"## Linear probes (held-out accuracy %, seed {v['probe_seeds']} models)", "",
                  "What each image alone decides, read linearly from the tower's features (both systems) and from "
                  "VLoRA's generated weights; targets: shape count (count, small_count), small shapes' kind, and "
                  "for relation images the axis with the first shape's colour (softmax regression on standardised "
                  "features, 600 training-split images, 300 eval-split images).", "",
                  "| target | VLoRA tower | VLoRA generator output | LLaVA tower |", "|---|---:|---:|---:|"]
        for f, acc in v["probes"].items():
            lines.append(f"| {f} | {_pct(acc['tower'])} | {_pct(acc['generator'])} | "
                         f"{_pct(l['probes'][f]['tower'])} |")
    lines += levers_markdown(report)
    if report.get("analysis"):
        lines += ["", report["analysis"].strip()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["overall", *report["families"]]
    cols = 3
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(12, 3.2 * -(-len(panels) // cols)),
                             squeeze=False)
    others = ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
    colours = {"vlora": "tab:blue", "llava": "tab:orange"}
    colours.update({n: others[i % len(others)] for i, n in enumerate(n for n in report["systems"] if n not in colours)})
    for ax, panel in zip(axes.flat, panels):
        for name, system in report["systems"].items():
            for k, run in enumerate(system["runs"]):
                xs = [p["train_seconds"] / 60 for p in run["points"]]
                ys = [100 * (p["overall"] if panel == "overall" else p["per_family"][panel]) for p in run["points"]]
                ax.plot(xs, ys, color=colours[name], linestyle="-" if k == 0 else "--", marker=".",
                        label=f"{system['label']} seed {run['seed']}")
        ax.set_title(panel)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("training time (min, evaluation excluded)")
    axes[0][0].set_ylabel("held-out exact match (%)")
    if len(report["systems"]) <= 2:
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
    else:  # with variants the legend would hide the first panel: below the panels instead
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.tight_layout(rect=(0, 0.06 + 0.012 * len(labels) / 3, 1, 1))
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(results: list[dict], out, command: str, machine: dict, settings: dict, wall_seconds: float,
                 note: str | None = None, analysis: str | None = None, side_by_side: dict | None = None) -> dict:
    """out.json, out.md and out.png (each written to a temporary name, then renamed); -> the report."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = build_report(results, command, machine, settings, wall_seconds, note, analysis, side_by_side)
    report["json_name"] = out.name + ".json"
    files = {".json": json.dumps(report, indent=1, default=float) + "\n", ".md": markdown(report, out.name + ".png")}
    for suffix, text in files.items():
        with atomic_file(out.with_name(out.name + suffix)) as tmp:
            tmp.write_text(text)
    with atomic_file(out.with_name(out.name + ".png")) as tmp:
        plot(report, tmp)
    return report


__all__ = ["build_report", "markdown", "plot", "spread", "summarize", "write_report"]
