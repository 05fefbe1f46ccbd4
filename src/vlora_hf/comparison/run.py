"""`vlora-hf compare`: train VLoRA and the LLaVA-1.5 baseline from one recipe on the same data, for the same
steps and seeds; score both on one held-out split along training; write the report (md + json + png).

  vlora-hf compare --recipe recipes/demo.yaml --shapes_families '{relation: 20000, small: 20000}' \\
      --seeds 0 1 --eval_every 250 --out docs/vlora_vs_llava

Each (system, seed) trains in its own process (`--jobs` of them at once, one torch thread each by the recipe);
arguments after `--` go to `vlora-hf train` unchanged for both systems (e.g. `-- --max_steps 500`).
`--variant NAME='{"lora_rank": 32}'` (repeatable) adds a VLoRA run with those keys of the recipe's `vlora:` block
overridden, reported as its own system `vlora-NAME`; `--resume` keeps the runs whose result.json exists.
"""

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

SYSTEMS = ("vlora", "llava")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlora-hf compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="the training recipe both systems use (e.g. recipes/demo.yaml)")
    p.add_argument("--shapes_families", default=None,
                   help="further shapes-vqa families for both, e.g. '{relation: 20000, small: 20000}'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    p.add_argument("--eval_every", type=int, default=250, help="held-out evaluation every N steps")
    p.add_argument("--eval_images", type=int, default=400,
                   help="classic held-out images (the families get their training proportion of this)")
    p.add_argument("--eval_seed", type=int, default=0, help="drawing seed of the held-out split")
    p.add_argument("--warm_start_steps", type=int, default=None, help="override the recipe's tower warm start")
    p.add_argument("--jobs", type=int, default=2, help="training processes at once")
    p.add_argument("--work", default="runs/compare", help="per-run folders (trainer output, models, results)")
    p.add_argument("--out", default="docs/vlora_vs_llava", help="report path without extension (.md .json .png)")
    p.add_argument("--full_scale_note", default=None, help="a line the report prints about the run's scale")
    p.add_argument("--analysis", default=None, help="a markdown file whose text the report appends (findings)")
    p.add_argument("--report_only", action="store_true",
                   help="rewrite the report from the result.json files already under --work (no training)")
    p.add_argument("--probe", action="store_true",
                   help="also fit linear probes on the tower features and generator output of each system's first-seed model")
    p.add_argument("--side_by_side", action="store_true",
                   help="also time a training step and the first token of both (first seed) in one process, "
                        "alternating, so both see the same load")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help="a VLoRA variant: NAME (letters, digits, _ .) and the recipe's vlora: keys it overrides, "
                        "e.g. rank32='{lora_rank: 32}' (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="do not train again the runs whose result.json is already under --work (same settings)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: SYSTEM:SEED, run by the parent
    return p


def parse_variants(specs: list[str]) -> dict[str, dict]:
    """["NAME=JSON-or-YAML mapping", ...] -> {NAME: overrides}; ValueError names the bad one."""
    variants = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        try:
            overrides = yaml.safe_load(text) if sep else None
        except yaml.YAMLError:
            overrides = None
        if not re.fullmatch(r"[A-Za-z0-9_.]+", name) or not isinstance(overrides, dict) or not overrides:
            raise ValueError(f"--variant {spec!r}: expected NAME='{{key: value, ...}}' (NAME of letters, digits, "
                             "_ and .; a non-empty mapping of vlora: keys)")
        if name in variants:
            raise ValueError(f"--variant {name!r} given twice")
        variants[name] = overrides
    return variants


def variant_label(overrides: dict) -> str:
    """{"lora_rank": 32} -> "VLoRA (lora_rank 32)"."""
    text = ", ".join(f"{k} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in overrides.items())
    return f"VLoRA ({text})"


def systems_of(args) -> list[str]:
    return [*SYSTEMS, *(f"vlora-{name}" for name in args.variants)]


def train_flags(args, system: str, seed: int, extra: list[str]) -> list[str]:
    run_dir = run_folder(args, system, seed)
    variant = args.variants.get(system.removeprefix("vlora-")) if system.startswith("vlora-") else None
    architecture = "vlora" if variant is not None else system
    flags = ["--recipe", args.recipe, "--architecture", architecture, "--seed", str(seed),
             "--output_dir", str(run_dir / "trainer"), "--export_dir", str(run_dir / "model"),
             "--heldout_images", "0", "--save_strategy", "no"]
    if args.shapes_families:
        flags += ["--shapes_families", args.shapes_families]
    if args.warm_start_steps is not None:
        tower = dict(yaml.safe_load(Path(args.recipe).read_text()).get("scratch_tower") or {})
        tower["warm_start"] = {**(tower.get("warm_start") or {}), "steps": args.warm_start_steps}
        flags += ["--scratch_tower", json.dumps(tower)]
    if variant is not None:  # after the common flags: the variant's keys win over the recipe's vlora block
        base = dict(yaml.safe_load(Path(args.recipe).read_text()).get("vlora") or {})
        return flags + extra + ["--vlora", json.dumps({**base, **variant})]
    return flags + extra


def run_folder(args, system: str, seed: int) -> Path:
    """One (system, seed) run's folder under --work: trainer output, model, result."""
    return Path(args.work) / f"{system}-seed{seed}"


def result_path(args, system: str, seed: int) -> Path:
    """Where a run keeps its result: --resume and --report_only read it back."""
    return run_folder(args, system, seed) / "result.json"


def run_one(args, system: str, seed: int, extra: list[str]) -> dict:
    """Train one system, scoring it along the way; -> its result (also written to RUN_DIR/result.json)."""
    start = time.time()
    import torch

    from ..data.shapes_dataset import heldout_rows
    from ..training.arguments import parse_args
    from ..training.callbacks import setup_logging
    from ..training.train import run
    from .along import EvalAlongTraining, HeldoutSet
    from .cost import inference_cost

    model_args, data_args, heldout_args, training_args = parse_args(train_flags(args, system, seed, extra))[:4]
    logger = setup_logging(training_args)
    images, rows = heldout_rows(args.eval_images, args.eval_seed, data_args.image_size, data_args.shapes_families,
                                data_args.num_images)
    heldout = HeldoutSet(images, rows, heldout_args.heldout_max_new_tokens, heldout_args.heldout_batch_size)
    along = EvalAlongTraining(heldout, args.eval_every, start=start, log=lambda m: logger.info(f"[{system}] {m}"))
    summary = run(model_args, data_args, heldout_args, training_args, callbacks=[along])
    total = time.time() - start

    model, processor = load_trained(training_args.export_dir)  # the exported model, as a user loads it
    cost_rows = rows[:: max(1, len(rows) // 24)][:24]  # every family
    cost = inference_cost(model, processor, [images[i] for i, _, _ in cost_rows], [q for _, q, _ in cost_rows])
    result = {"system": system, "seed": seed, "steps": summary["steps"], "points": along.points,
              "train_seconds": along.train_seconds, "setup_seconds": along.setup_seconds,
              "seconds_per_step": along.train_seconds / max(1, summary["steps"]), "total_seconds": total,
              "training_loss": summary["training_loss"], "trainable": summary["trainable"],
              "parameters": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads(),
              "batch_size": training_args.per_device_train_batch_size * training_args.world_size,
              "mean_text_tokens": mean_text_tokens(processor, rows), "inference": cost,
              "heldout_questions": len(rows), "model_dir": training_args.export_dir}
    if system != "llava":  # the report's analytic FLOPs read it (the model folder may be gone by then)
        result["vlora_config"] = model.config.to_dict()
    if system.startswith("vlora-"):
        overrides = args.variants[system.removeprefix("vlora-")]
        result["variant"] = {"name": system.removeprefix("vlora-"), "vlora": overrides,
                             "label": variant_label(overrides)}
    path = result_path(args, system, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return result


def load_trained(folder):
    """An exported model and its processor: a plain transformers LLaVA folder, or one of ours."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("model_type") == "llava":
        from transformers import LlavaForConditionalGeneration, LlavaProcessor

        return LlavaForConditionalGeneration.from_pretrained(folder).eval(), LlavaProcessor.from_pretrained(folder)
    from ..modeling import VLoRAForCausalLM
    from ..processing import VLoRAProcessor

    return VLoRAForCausalLM.from_pretrained(folder).eval(), VLoRAProcessor.from_pretrained(folder)


def mean_text_tokens(processor, rows) -> float:
    """Mean tokens of one question-answer conversation in the chat template (`<image>` as one token), over
    the held-out rows (the training questions, drawn the same way)."""
    from ..data.shapes import conversation
    from ..data.llava import chat_template_of
    from ..data.llava_format import encode_messages, to_messages

    lengths = []
    for i, q, a in rows[:200]:
        messages, _ = to_messages({"image": "x", "conversations": conversation(q, a)}, i, "vicuna_v1")
        ids, _, _ = encode_messages(processor.tokenizer, messages, "vicuna_v1", chat_template_of(processor))
        lengths.append(len(ids))
    return sum(lengths) / len(lengths)


def machine() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(own)
    try:
        args.variants = parse_variants(args.variant)
    except ValueError as err:
        parser.error(str(err))
    if args.one:
        system, seed = args.one.split(":")
        run_one(args, system, int(seed), extra)
        return 0
    if not Path(args.recipe).is_file():
        print(f"vlora-hf compare: error: recipe not found: {args.recipe}", file=sys.stderr)
        return 2
    jobs = [(system, seed) for seed in args.seeds for system in systems_of(args)]
    started = time.time()
    wall_file = Path(args.work) / "wall_seconds.json"
    if args.report_only:  # a variant's seeds not trained (yet) are left out; its report shows the seeds there
        jobs = [(s, k) for s, k in jobs if s in SYSTEMS or result_path(args, s, k).is_file()]
        missing = [str(result_path(args, s, k)) for s, k in jobs if not result_path(args, s, k).is_file()]
        if missing:
            print(f"vlora-hf compare: error: --report_only needs the trained runs' results under --work "
                  f"{args.work}; missing: {', '.join(missing)}", file=sys.stderr)
            return 2
        results = [json.loads(result_path(args, s, k).read_text()) for s, k in jobs]
        wall = json.loads(wall_file.read_text()) if wall_file.is_file() else max(r["total_seconds"] for r in results)
    else:
        results = run_jobs(own, extra, jobs, args)
        if results is None:
            return 1
        wall = time.time() - started
        if args.resume and wall_file.is_file():  # the kept runs' wall time, added
            wall += json.loads(wall_file.read_text())
        wall_file.write_text(json.dumps(wall) + "\n")
    if args.probe:
        from .probe import probe_model

        for (system, seed), r in zip(jobs, results):
            if "probes" not in r and seed == args.seeds[0]:  # kept in the run's result.json: a later report reuses them
                r["probes"] = probe_model(*load_trained(r["model_dir"]))
                path = result_path(args, system, seed)
                path.write_text(json.dumps(r, indent=1, default=float) + "\n")
    side = None
    if args.side_by_side:
        import torch

        torch.set_num_threads(1)
        saved = Path(args.work) / "side_by_side.json"
        side = json.loads(saved.read_text()) if saved.is_file() else {}
        if set(side) != set(systems_of(args)):  # measured again with every system, so all see the same load
            side = measure_side_by_side(args, results, extra)
            saved.write_text(json.dumps(side, indent=1) + "\n")
    from .report import write_report

    command = "vlora-hf compare " + shlex.join(training_argv(argv))
    analysis = Path(args.analysis).read_text() if args.analysis else None
    write_report(results, args.out, command=command, machine=machine(), settings=settings(args, extra),
                 wall_seconds=wall, note=args.full_scale_note, analysis=analysis, side_by_side=side)
    print(f"wrote {args.out}.md, .json and .png")
    return 0


def measure_side_by_side(args, results: list[dict], extra: list[str]) -> dict:
    """Every system's first-seed model timed in one process, alternating; a run whose model folder is gone is
    timed on an untrained model built the same way (`weights` says which)."""
    from .side_by_side import measure, untrained

    first = {r["system"]: r for r in results if r["seed"] == args.seeds[0]}
    models, weights = {}, {}
    for name, r in first.items():
        trained = (Path(r["model_dir"]) / "config.json").is_file()
        flags = train_flags(args, name, r["seed"], extra)
        models[name] = load_trained(r["model_dir"]) if trained else untrained(flags)
        weights[name] = "trained" if trained else "untrained"
    side = measure(models)
    return {name: {**side[name], "weights": weights[name]} for name in side}


def training_argv(argv: list[str]) -> list[str]:
    """The arguments that decide what trains (the report's own options left out): the command to rerun."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--analysis", "--full_scale_note", "--out"):
            skip = True
        elif a not in ("--report_only", "--probe", "--side_by_side", "--resume"):
            out.append(a)
    return out


def settings(args, extra) -> dict:
    return {"recipe": args.recipe, "shapes_families": yaml.safe_load(args.shapes_families or "{}"),
            "seeds": args.seeds, "eval_every": args.eval_every, "eval_images": args.eval_images,
            "eval_seed": args.eval_seed, "warm_start_steps": args.warm_start_steps, "train_flags": extra}


def run_jobs(own, extra, jobs, args) -> list[dict] | None:
    """Each (system, seed) in a child process, `args.jobs` at a time; -> the results, or None on a failure."""
    pending = [(s, k) for s, k in jobs if not (args.resume and result_path(args, s, k).is_file())]
    running, failed = [], []
    Path(args.work).mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            system, seed = pending.pop(0)
            log = open(Path(args.work) / f"{system}-seed{seed}.log", "w")
            cmd = [sys.executable, "-m", "vlora_hf.comparison.run", *own, "--one", f"{system}:{seed}", "--", *extra]
            running.append(((system, seed), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for job in list(running):
            (system, seed), proc, log = job
            if proc.poll() is not None:
                log.close()
                running.remove(job)
                if proc.returncode:
                    failed.append(f"{system} seed {seed} (exit {proc.returncode}, see {log.name})")
                print(f"{system} seed {seed}: done (exit {proc.returncode})", flush=True)
    if failed:
        print("vlora-hf compare: error: runs failed: " + "; ".join(failed), file=sys.stderr)
        return None
    return [json.loads(result_path(args, s, k).read_text()) for s, k in jobs]


if __name__ == "__main__":
    sys.exit(main())
