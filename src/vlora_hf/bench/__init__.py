"""Benchmark of VLoRA against text-only, LLaVA and YOPO-style LLaVA (`vlora-hf bench`, `python -m vlora_hf.bench`)."""

from .run import BenchSettings, main, run_bench

__all__ = ["BenchSettings", "main", "run_bench"]
