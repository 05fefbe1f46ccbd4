"""VLoRA variants in the head-to-head (`vlora-hf compare --variant NAME='{...}'`): each is a VLoRA run with some
keys of the recipe's `vlora:` block overridden. This module reads them out next to VLoRA and LLaVA: accuracy per
family, step time and analytic FLOPs, and which families each variant still loses."""

GOAL_POINTS, GOAL_STEP_RATIO = 2.0, 0.5  # the goal: within 2 points, at <= 0.5x the step time


def variant_names(systems: dict) -> list[str]:
    return [name for name in systems if name not in ("vlora", "llava")]


def step_ratio(systems: dict, name: str, side_by_side: dict | None) -> dict:
    """A system's training s / step over LLaVA's: interleaved (same load) when measured, else from the runs."""
    if side_by_side and name in side_by_side and "llava" in side_by_side:
        return {"ratio": side_by_side[name]["step_seconds"] / side_by_side["llava"]["step_seconds"],
                "measured": "side_by_side"}
    return {"ratio": systems[name]["seconds_per_step"]["mean"] / systems["llava"]["seconds_per_step"]["mean"],
            "measured": "runs"}


def variant_verdicts(systems: dict, side_by_side: dict | None = None) -> dict:
    """{variant: {minus_llava_points, minus_vlora_points (per family), vlora_loses, step_time_ratio, goal_met}}."""
    llava, base = systems["llava"], systems["vlora"]
    out = {}
    for name in variant_names(systems):
        final = systems[name]["final"]
        vs_llava = {f: 100 * (final[f]["mean"] - llava["final"][f]["mean"]) for f in final}
        ratio = step_ratio(systems, name, side_by_side)
        out[name] = {"label": systems[name]["label"], "minus_llava_points": vs_llava,
                     "minus_vlora_points": {f: 100 * (final[f]["mean"] - base["final"][f]["mean"]) for f in final},
                     "vlora_loses": sorted(f for f, d in vs_llava.items() if d < -GOAL_POINTS),
                     "step_time_ratio": ratio["ratio"], "step_time_measured": ratio["measured"],
                     "goal_met": all(d >= -GOAL_POINTS for d in vs_llava.values()) and ratio["ratio"] <= GOAL_STEP_RATIO}
    return out


def _pct(s: dict) -> str:
    return f"{100 * s['mean']:.1f}" + (f" ± {100 * s['half_range']:.1f}" if len(s["values"]) > 1 else "")


def levers_markdown(report: dict) -> list[str]:
    """The "Levers" section: one table (family x system) and one verdict line per variant; [] without variants."""
    systems, families = report["systems"], report["families"]
    names = variant_names(systems)
    if not names:
        return []
    order = ["vlora", *names, "llava"]
    labels = {n: systems[n]["label"] for n in order}
    side = report.get("side_by_side") or {}
    lines = ["", "## Levers (held-out %, mean ± half-range over seeds)", "",
             "Each variant is VLoRA with the named key(s) of the recipe's `vlora:` block changed, trained and scored "
             "exactly as above (same data, seeds, steps, held-out split).", "",
             "| family | " + " | ".join(labels[n] for n in order) + " |", "|---|" + "---:|" * len(order)]
    for f in families:
        lines.append(f"| {f} | " + " | ".join(_pct(systems[n]["final"][f]) for n in order) + " |")
    lines.append("| **all** | " + " | ".join(_pct(systems[n]["final_overall"]) for n in order) + " |")
    if all(n in side for n in order):
        lines.append("| training s / step, side by side | "
                     + " | ".join(f"{side[n]['step_seconds']:.3f}" for n in order) + " |")
        lines.append("| … over LLaVA's | " + " | ".join(f"{side[n]['step_seconds'] / side['llava']['step_seconds']:.2f}"
                                                     for n in order) + " |")
    lines.append("| training s / step, own run | "
                 + " | ".join(f"{systems[n]['seconds_per_step']['mean']:.3f}" for n in order) + " |")
    flops = {n: systems[n].get("training_flops_per_sample") for n in order}
    flops["llava"] = report["training_flops_per_sample"]["llava"]
    lines.append("| training GFLOPs / sample | " + " | ".join(f"{flops[n] / 1e9:.4f}" if flops[n] else "—"
                                                          for n in order) + " |")
    lines.append("| parameters | " + " | ".join(f"{systems[n]['parameters']:,}" for n in order) + " |")
    lines += ["", "Per variant (families VLoRA loses by more than 2 points to LLaVA; step time over LLaVA's):", ""]
    base = report["verdict"]
    lines.append(f"- VLoRA: loses {', '.join(base['vlora_loses']) or 'none'}; step time "
                 f"{base['step_time_ratio']:.2f}×.")
    for name, v in report["verdict"]["variants"].items():
        lost = ", ".join(f"{f} ({v['minus_llava_points'][f]:+.1f})" for f in v["vlora_loses"]) or "none"
        lines.append(f"- {v['label']}: loses {lost}; step time {v['step_time_ratio']:.2f}× "
                     f"({'side by side' if v['step_time_measured'] == 'side_by_side' else 'separate runs'}); "
                     f"goal {'met' if v['goal_met'] else 'not met'}.")
    return lines


__all__ = ["levers_markdown", "step_ratio", "variant_names", "variant_verdicts"]
