"""CPU serving defaults: bf16 where the CPU computes it natively, and every core for vLLM's worker on small machines.

- dtype: vLLM's CPU backend runs bf16 GEMMs through oneDNN; with AMX-BF16 or AVX512-BF16 (`/proc/cpuinfo` flags
  `amx_bf16`, `avx512_bf16`) that is the fast path, elsewhere bf16 is emulated and fp32 is faster.
- cores: with multiprocessing, vLLM reserves one core per local rank for its scheduler process and binds the
  worker's OpenMP threads to the rest (`VLLM_CPU_NUM_OF_RESERVED_CPU`, vllm/utils/ompmultiprocessing.py). On a
  machine of `SHARED_CORES_UP_TO` cores or fewer that leaves the worker half the machine or less, so we reserve
  none: the worker's threads use every core and the scheduler shares one with them.
"""

from __future__ import annotations

import os
from pathlib import Path

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
SHARED_CORES_UP_TO = 4


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is missing, e.g. macOS)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def cpu_dtype(flags: set[str] | None = None) -> str:
    """The dtype every system serves in on this CPU: bfloat16 with native bf16, else float32."""
    return "bfloat16" if native_bf16(flags) else "float32"


def share_cores(cores: int | None = None) -> str | None:
    """Reserve no core for vLLM's scheduler on small machines (unless the variable is set); -> the setting used."""
    cores = os.cpu_count() if cores is None else cores
    if cores is not None and cores <= SHARED_CORES_UP_TO:
        os.environ.setdefault(RESERVED_ENV, "0")
    return os.environ.get(RESERVED_ENV)
