"""`vlora-hf compare` on a toy recipe: both systems train, and the report holds every field it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from test_training import TINY
from vlora_hf.cli import main as cli_main
from vlora_hf.comparison.report import spread
from vlora_hf.data import shapes_families
from vlora_hf.data.shapes_families import question_family

FAMILIES = ["color", "shape", "count", "describe", "relation_color", "relation_yesno", "small_count", "small_shape"]


def test_spread_is_mean_and_half_range():
    assert spread([0.5, 0.75]) == {"mean": 0.625, "half_range": 0.125, "values": [0.5, 0.75]}


def toy_recipe(tmp_path) -> Path:
    recipe = {k: v for k, v in TINY.items() if k not in ("torch_threads",)}
    recipe.update({"torch_threads": 1, "max_steps": 4, "logging_steps": 2, "heldout_max_new_tokens": 5,
                   "scratch_tower": {"patch_embedding": "fan_in", "position_embedding": "sincos",
                                     "warm_start": {"steps": 2, "batch_size": 4}}})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_compare_on_a_toy_recipe_writes_every_field(tmp_path):
    path = toy_recipe(tmp_path)
    out = tmp_path / "report" / "cmp"
    assert cli_main(["compare", "--recipe", str(path), "--shapes_families", "{relation: 6, small: 6}",
                     "--seeds", "0", "1", "--eval_every", "2", "--eval_images", "4", "--jobs", "2",
                     "--work", str(tmp_path / "work"), "--out", str(out)]) == 0

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["families"] == FAMILIES
    for key in ("command", "machine", "settings", "wall_seconds", "training_flops_per_sample", "verdict"):
        assert key in report, key
    assert report["settings"]["shapes_families"] == {"relation": 6, "small": 6}
    flops = report["training_flops_per_sample"]
    assert flops["llava"] > flops["vlora"] > 0  # LLaVA runs 4 extra patch tokens through the same decoder
    for name in ("vlora", "llava"):
        system = report["systems"][name]
        assert system["seeds"] == [0, 1] and system["steps"] == 4
        for run in system["runs"]:
            assert [p["step"] for p in run["points"]] == [0, 2, 4]
            times = [p["train_seconds"] for p in run["points"]]
            assert times == sorted(times) and run["train_seconds"] == times[-1]
            assert run["seconds_per_step"] == pytest.approx(run["train_seconds"] / 4)
            assert set(run["points"][-1]["per_family"]) == set(FAMILIES)
            assert run["inference"]["ttft_ms"] > 0 and run["inference"]["kv_cache_bytes"] > 0
        for family in FAMILIES:
            finals = [r["points"][-1]["per_family"][family] for r in system["runs"]]
            assert system["final"][family] == spread(finals)
        for key in ("seconds_per_step", "train_seconds", "setup_seconds", "total_seconds", "ttft_ms"):
            assert set(system[key]) == {"mean", "half_range", "values"}, key
    # the same text tokens; LLaVA's prompt holds the 4 patch tokens where VLoRA's holds one placeholder
    v, l = report["systems"]["vlora"], report["systems"]["llava"]
    assert l["prompt_tokens"] - v["prompt_tokens"] == pytest.approx(4 - 1)
    assert v["image_weights_bytes_per_question"] > 0 and l["image_weights_bytes_per_question"] == 0
    verdict = report["verdict"]
    assert set(verdict["vlora_minus_llava_points"]) == set(FAMILIES)
    assert sorted(verdict["vlora_wins"] + verdict["within_2_points"] + verdict["vlora_loses"]) == sorted(FAMILIES)

    md = out.with_suffix(".md").read_text()
    for family in FAMILIES:
        assert f"| {family} |" in md
    assert "![held-out accuracy vs training time](cmp.png)" in md
    with Image.open(out.with_suffix(".png")) as png:
        assert png.format == "PNG" and png.size[0] > 500

    # the report can be rewritten from the runs' results alone, with findings appended
    notes = tmp_path / "findings.md"
    notes.write_text("## Findings\n\nA line.\n")
    assert cli_main(["compare", "--recipe", str(path), "--seeds", "0", "1", "--work", str(tmp_path / "work"),
                     "--out", str(out), "--report_only", "--analysis", str(notes)]) == 0
    assert out.with_suffix(".md").read_text().rstrip().endswith("A line.")
    assert json.loads(out.with_suffix(".json").read_text())["systems"]["vlora"]["final"] == v["final"]


def test_report_only_without_runs_names_the_missing_results(tmp_path, capsys):
    work = tmp_path / "empty"
    recipe = Path(__file__).parents[1] / "recipes" / "demo.yaml"
    assert cli_main(["compare", "--recipe", str(recipe), "--seeds", "0", "--work", str(work),
                     "--out", str(tmp_path / "cmp"), "--report_only"]) == 2
    err = capsys.readouterr().err
    assert "--report_only needs the trained runs' results" in err and str(work / "vlora-seed0" / "result.json") in err
    assert not (tmp_path / "cmp.md").exists()


def test_every_question_has_a_family():
    with pytest.raises(ValueError, match="not a shapes-vqa question"):
        question_family("What is the meaning of life?")


def test_linear_probe_finds_a_linear_signal_and_not_noise():
    import torch

    from vlora_hf.comparison.probe import linear_probe, targets

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    signal = [str(int(v > 0)) for v in x[:, 3]]
    assert linear_probe(x[:300], signal[:300], x[300:], signal[300:]) > 0.95
    noise = [str(int(v > 0)) for v in torch.randn(400, generator=g)]
    assert linear_probe(x[:300], noise[:300], x[300:], noise[300:]) < 0.7
    images, labels = targets("relation", 4, "eval")  # axis and first colour, as drawn
    for k, label in enumerate(labels):
        s = shapes_families.draw_family("relation", k, 0, "eval")
        (_, colour, _, a), (_, _, _, b) = s.shapes
        axis, first = label.split(":")
        assert first == colour
        assert (a[0] + a[2] + shapes_families.RELATION_GAP <= b[0]) if axis == "x" else (a[1] + a[2] + shapes_families.RELATION_GAP <= b[1])


@pytest.mark.slow
def test_compare_variant_is_its_own_system_in_the_report(tmp_path):
    """`--variant r2='{lora_rank: 2}'` trains a VLoRA with that vlora: key changed, reported beside VLoRA and
    LLaVA; `--resume` trains nothing already there; a side-by-side timing of a run whose model folder is gone uses
    an untrained model of the same shapes."""
    path, work, out = toy_recipe(tmp_path), tmp_path / "work", tmp_path / "report" / "cmp"
    common = ["compare", "--recipe", str(path), "--seeds", "0", "--eval_every", "2", "--eval_images", "4",
              "--work", str(work), "--out", str(out), "--variant", "r2={lora_rank: 2}"]
    assert cli_main([*common, "--jobs", "2"]) == 0
    result = json.loads((work / "vlora-r2-seed0" / "result.json").read_text())
    assert result["variant"] == {"name": "r2", "vlora": {"lora_rank": 2}, "label": "VLoRA (lora_rank 2)"}
    assert result["vlora_config"]["lora_rank"] == 2 and result["vlora_config"]["generator_hidden_size"] == 16
    assert json.loads((work / "vlora-seed0" / "result.json").read_text())["vlora_config"]["lora_rank"] == 4

    for log in work.glob("*.log"):
        log.unlink()
    import shutil

    shutil.rmtree(work / "llava-seed0" / "model")
    assert cli_main([*common, "--resume", "--side_by_side"]) == 0
    assert not list(work.glob("*.log"))  # every run was there: nothing trained again

    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["systems"]) == ["vlora", "llava", "vlora-r2"]
    system = report["systems"]["vlora-r2"]
    assert system["label"] == "VLoRA (lora_rank 2)" and system["variant"]["vlora"] == {"lora_rank": 2}
    assert system["seeds"] == [0] and set(system["final"]) == set(FAMILIES[:4])  # the classic families
    # rank 2 instead of 4: fewer generated weights, fewer FLOPs than the baseline VLoRA
    assert 0 < system["training_flops_per_sample"] < report["systems"]["vlora"]["training_flops_per_sample"]
    assert report["systems"]["vlora"]["training_flops_per_sample"] == report["training_flops_per_sample"]["vlora"]
    verdict = report["verdict"]["variants"]["vlora-r2"]
    assert set(verdict["minus_llava_points"]) == set(FAMILIES[:4])
    assert verdict["minus_llava_points"]["color"] == pytest.approx(
        100 * (system["final"]["color"]["mean"] - report["systems"]["llava"]["final"]["color"]["mean"]))
    assert verdict["step_time_measured"] == "side_by_side" and verdict["step_time_ratio"] > 0
    side = report["side_by_side"]
    assert set(side) == {"vlora", "llava", "vlora-r2"}
    assert side["llava"]["weights"] == "untrained" and side["vlora-r2"]["weights"] == "trained"

    md = out.with_suffix(".md").read_text()
    assert "## Levers" in md and "| family | VLoRA | VLoRA (lora_rank 2) | LLaVA-1.5 |" in md
    assert "- VLoRA (lora_rank 2): loses" in md


def test_variant_flags_are_checked():
    from vlora_hf.comparison.run import parse_variants, variant_label

    assert parse_variants(['gud={"target_modules": [q, gate]}']) == {"gud": {"target_modules": ["q", "gate"]}}
    assert variant_label({"target_modules": ["q", "gate"], "lora_rank": 2}) == "VLoRA (target_modules q,gate, lora_rank 2)"
    for bad in ("r32", "r 32={lora_rank: 32}", "r32=[32]", "r32={}", "r32={lora_rank: [}"):
        with pytest.raises(ValueError, match="expected NAME="):
            parse_variants([bad])
    with pytest.raises(ValueError, match="given twice"):
        parse_variants(["a={lora_rank: 2}", "a={lora_rank: 4}"])
