"""vLLM platform plugin (entry point `vllm.platform_plugins`): vLLM's own CPU platform with the fused LoRA wrapper.

vLLM picks its LoRA kernels through the platform's `get_punica_wrapper()`; `VLoRACpuPlatform` is vLLM's
`CpuPlatform` with that one method changed (fused_lora.py). It activates only when all of these hold, and
otherwise logs one line saying why and returns None, so vLLM's own platform is used:

- our code asked for it: `VLORA_FUSED_LORA=1` in the environment (`vlora-hf serve`, `VLoRAEngine` and the
  serving bench set it before vLLM starts its processes, unless it is set already; `0` turns it off);
- vLLM resolves to its plain CPU platform (not CUDA, ROCm, XPU, TPU or the zentorch CPU platform);
- the installed vLLM is the version the wrapper was tested against.

(vLLM skips platform plugins altogether under `VLLM_TARGET_DEVICE=cpu`.)
"""

from __future__ import annotations

import logging
import os

ENV = "VLORA_FUSED_LORA"
TESTED_VLLM = "0.32.0"
VLLM_CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"
PLATFORM = "vlora_hf.serving.platform.VLoRACpuPlatform"
WRAPPER = "vlora_hf.serving.fused_lora.FusedPunicaWrapperCPU"

logger = logging.getLogger(__name__)
_said: set[str] = set()  # vLLM calls a platform plugin twice per process: say each thing once


def request_fused_lora() -> None:
    """Ask for the fused wrapper in this process and the ones vLLM starts (before vLLM resolves its platform)."""
    os.environ.setdefault(ENV, "1")


def refusal(vllm_version: str, builtin_platform: str | None) -> str | None:
    """Why the fused platform must not activate here (None: it may)."""
    if builtin_platform != VLLM_CPU_PLATFORM:
        return f"vLLM's platform here is {builtin_platform or 'not a CPU one'}, not {VLLM_CPU_PLATFORM}"
    if vllm_version != TESTED_VLLM:
        return f"vLLM {vllm_version} is installed, the fused wrapper is tested on {TESTED_VLLM} only"
    return None


def _say(message: str, level=logging.WARNING) -> None:
    if message not in _said:
        _said.add(message)
        logger.log(level, message)


def activate() -> str | None:
    """The platform plugin: our platform's qualified name, or None (vLLM's own platform)."""
    if os.environ.get(ENV, "0") != "1":
        return None
    from vllm.platforms import cpu_platform_plugin
    from vllm.version import __version__

    reason = refusal(__version__, cpu_platform_plugin())
    if reason is not None:
        _say(f"VLoRA fused CPU LoRA not activated ({reason}): vLLM's own platform and LoRA wrapper are used")
        return None
    _say(f"VLoRA fused CPU LoRA activated: {PLATFORM} ({WRAPPER})", logging.INFO)
    return PLATFORM


def _cpu_platform():
    from vllm.platforms.cpu import CpuPlatform

    class VLoRACpuPlatform(CpuPlatform):
        """vLLM's CPU platform; LoRA runs through the fused wrapper."""

        @classmethod
        def get_punica_wrapper(cls) -> str:
            return WRAPPER

    VLoRACpuPlatform.__module__ = __name__
    VLoRACpuPlatform.__qualname__ = "VLoRACpuPlatform"
    return VLoRACpuPlatform


def __getattr__(name):  # the class is built on first use: importing this module does not import vLLM
    if name == "VLoRACpuPlatform":
        cls = _cpu_platform()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
