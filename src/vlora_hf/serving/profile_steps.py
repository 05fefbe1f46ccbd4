"""Where an engine step's time goes, per serving system, at the serving benchmark's geometry.

  python -m vlora_hf.serving.profile_steps [--quick] [--width W] --system vlora_vllm|llama_vllm|llava_vllm [-n 16]

One system per process (vLLM's engine in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0). Measurement only: for the
timed run it wraps a handful of vLLM methods with wall-clock timers (scheduler, model runner, forward, the CPU
LoRA ops, adapter loading) and restores them afterwards; a second, separate run counts the torch ops each
part dispatches (a TorchDispatchMode). Steps are split into prefill steps (any request with more than one
scheduled token) and decode steps. Prints one JSON object: per phase, mean milliseconds per step for each part
(exclusive of the parts nested in it), ops per step, and the image side's own times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class StepTimers:
    """Exclusive wall time and dispatched-op counts per label, grouped into engine steps by phase."""

    def __init__(self):
        self.stack: list[list] = []  # [label, start, child_seconds]
        self.current: dict[str, float] | None = None
        self.ops: dict[str, int] | None = None
        self.phase = "other"
        self.steps: list[tuple[str, dict, dict]] = []
        self.patched: list[tuple[type, str, object]] = []

    def push(self, label):
        self.stack.append([label, time.perf_counter(), 0.0])

    def pop(self):
        label, start, children = self.stack.pop()
        elapsed = time.perf_counter() - start
        if self.current is not None:
            self.current[label] = self.current.get(label, 0.0) + elapsed - children
        if self.stack:
            self.stack[-1][2] += elapsed

    def count_op(self):
        if self.ops is not None:
            label = self.stack[-1][0] if self.stack else "outside"
            self.ops[label] = self.ops.get(label, 0) + 1

    def wrap(self, cls, name, label, on_call=None):
        original = cls.__dict__[name]

        def wrapper(*args, **kwargs):
            if on_call is not None:
                on_call(*args, **kwargs)
            self.push(label)
            try:
                return original(*args, **kwargs)
            finally:
                self.pop()

        setattr(cls, name, wrapper)
        self.patched.append((cls, name, original))

    def wrap_step(self, cls, name):
        """The engine step: one entry of `steps` per call (phase set by the model runner inside it)."""
        original = cls.__dict__[name]

        def step(*args, **kwargs):
            self.current, self.ops, self.phase = {}, ({} if self.ops is not None else None), "idle"
            self.push("step_other")
            try:
                return original(*args, **kwargs)
            finally:
                self.pop()
                self.steps.append((self.phase, self.current, self.ops or {}))
                self.current = None
                if self.ops is not None:
                    self.ops = {}

        setattr(cls, name, step)
        self.patched.append((cls, name, original))

    def set_phase(self, runner, scheduler_output, *args, **kwargs):
        tokens = scheduler_output.num_scheduled_tokens
        self.phase = "decode" if tokens and max(tokens.values()) == 1 else ("prefill" if tokens else "idle")

    def restore(self):
        for cls, name, original in reversed(self.patched):
            setattr(cls, name, original)
        self.patched.clear()

    def summary(self) -> dict:
        out = {}
        for phase in ("prefill", "decode"):
            steps = [s for s in self.steps if s[0] == phase]
            if not steps:
                continue
            ms, ops = defaultdict(float), defaultdict(int)
            for _, times, counts in steps:
                for k, v in times.items():
                    ms[k] += v
                for k, v in counts.items():
                    ops[k] += v
            n = len(steps)
            out[phase] = {"steps": n, "ms_per_step": {k: round(1000 * v / n, 3) for k, v in sorted(ms.items())},
                          "total_ms_per_step": round(1000 * sum(ms.values()) / n, 3),
                          "ops_per_step": {k: round(v / n, 1) for k, v in sorted(ops.items())}}
        return out


class CountOps(TorchDispatchMode):
    def __init__(self, timers: StepTimers):
        super().__init__()
        self.timers = timers

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.timers.count_op()
        return func(*args, **(kwargs or {}))


def instrument(timers: StepTimers) -> None:
    """Timers around vLLM's scheduler, model runner, forward, CPU LoRA ops and adapter loading (restored after)."""
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    timers.wrap_step(LLMEngine, "step")
    timers.wrap(Scheduler, "schedule", "schedule")
    timers.wrap(Scheduler, "update_from_output", "schedule")
    timers.wrap(GPUModelRunner, "execute_model", "runner_other", on_call=timers.set_phase)
    timers.wrap(GPUModelRunner, "sample_tokens", "sample")
    timers.wrap(GPUModelRunner, "_model_forward", "forward_base")
    timers.wrap(LoRAModelRunnerMixin, "set_active_loras", "lora_mapping")
    timers.wrap(LoRAModelManager, "activate_adapter", "lora_activate")
    timers.wrap(WorkerLoRAManager, "_load_adapter", "lora_load")
    from .fused_lora import FusedPunicaWrapperCPU

    for name in ("add_lora_linear", "add_lora_logits", "add_lora_embedding"):
        timers.wrap(PunicaWrapperCPU, name, name.replace("add_", ""))
    timers.wrap(FusedPunicaWrapperCPU, "add_lora_linear", "lora_linear")  # nested in it: vLLM's, where it falls back


def lora_manager(llm):
    """vLLM's LoRA model manager of an in-process engine (None without LoRA)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.worker.model_runner.lora_manager._adapter_manager
    except AttributeError:
        return None


def lora_module_count(llm) -> int | None:
    """How many modules vLLM wrapped with LoRA (None without LoRA)."""
    manager = lora_manager(llm)
    return None if manager is None else len(manager.modules)


def punica_wrapper_name(llm) -> str | None:
    """The class of the LoRA wrapper vLLM runs (None without LoRA)."""
    manager = lora_manager(llm)
    return None if manager is None else type(next(iter(manager.punica_wrapper_mapping.values()))).__name__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlora_hf.serving.profile_steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--system", required=True, choices=["vlora_vllm", "llama_vllm", "llava_vllm"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--geometry", default=None, help="a named geometry of the bench (bench_setup.py)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--width", type=int, default=None, help="LLM width (tower: a quarter of it); default: bench's")
    p.add_argument("-n", type=int, default=16, help="concurrent requests")
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from .bench import Setting, bench_dtype, make_system, random_requests

    out = sys.stdout
    sys.stdout = sys.stderr
    timers = StepTimers()
    with tempfile.TemporaryDirectory() as tmp:
        setting = Setting(args.quick, args.width, args.geometry, bench_dtype(args.dtype), os.cpu_count())
        sizes, system = make_system(args.system, Path(tmp), setting, args.n)
        warm = random_requests(args.n, sizes, torch.Generator().manual_seed(1))
        system.run(*warm, 2)
        ids, pixels = random_requests(args.n, sizes, torch.Generator().manual_seed(2))
        instrument(timers)
        try:
            t0 = time.perf_counter()
            system.run(ids, pixels, args.tokens)
            wall = time.perf_counter() - t0
            timed = timers.summary()
            timers.steps.clear()
            timers.ops = {}
            with CountOps(timers):
                system.run(*random_requests(args.n, sizes, torch.Generator().manual_seed(3)), args.tokens)
            counted = timers.summary()
        finally:
            timers.restore()
        for phase, row in timed.items():
            row["ops_per_step"] = counted.get(phase, {}).get("ops_per_step", {})
        result = {"system": args.system, "n": args.n, "new_tokens": args.tokens, "sizes": sizes.describe(),
                  "wall_s": round(wall, 3), "phases": timed, "lora_modules": lora_module_count(system.llm),
                  "punica_wrapper": punica_wrapper_name(system.llm),
                  "dtype": setting.dtype, "torch_threads": torch.get_num_threads(),
                  "image_side_ms": getattr(system, "last_times", None), "loadavg": os.getloadavg()}
    print(json.dumps(result, indent=1), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
