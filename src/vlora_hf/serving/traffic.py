"""Per-image adapter traffic at the release's 7B size, on this machine: write, load, activate one adapter.

The adapter of one image at 7B (8 receiving layers × q/k/v/o/m × rank 64 × width 4096, bf16) is
8 × 5 × (64 × 4096 + 4096 × 64) × 2 B = 42 MB. What each image costs before its first token:

- write: our `write_adapter` (safetensors) into the RAM-backed store (/dev/shm), once per distinct image;
- load: vLLM's own `LoRAModel.from_local_checkpoint` (what its worker runs on a new adapter: read the file into
  CPU tensors of the LoRA dtype) and `PEFTHelper.from_local_dir`;
- activate: vLLM's `set_lora` copies each factor into its slot of the stacked tensors; the fused wrapper
  (fused_lora.py) then copies the changed slot once more into its fused factors. Both are copies of the same
  42 MB; measured as those copies.

Measured with one torch thread: these are memory copies, and on a shared 2-core machine each two-thread copy
waits for the busy second core (measured: 8 ms per 0.5 MB copy with two threads under load, 0.03 ms with one).

  python -m vlora_hf.serving.traffic [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYERS, WIDTH, RANK = 8, 4096, 64
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp_delta")


def adapter_tensors(dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(0, 4 * LAYERS, 4):
        for target in TARGETS:
            name = f"base_model.model.model.layers.{layer}.{target}"
            out[f"{name}.lora_A.weight"] = torch.randn(RANK, WIDTH, generator=g).to(dtype)
            out[f"{name}.lora_B.weight"] = torch.randn(WIDTH, RANK, generator=g).to(dtype)
    return out


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 2)


def adapter_traffic(repeats: int = 3) -> dict:
    """Median milliseconds per image for each step (one torch thread), and the adapter's size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _traffic(repeats)
    finally:
        torch.set_num_threads(threads)


def _traffic(repeats: int) -> dict:
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    from .adapters import write_adapter
    from .store import ram_folder

    tensors = adapter_tensors()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": RANK,
              "target_modules": sorted({t.rsplit(".", 1)[-1] for t in TARGETS}), "bias": "none"}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    with tempfile.TemporaryDirectory(prefix="vlora-traffic-", dir=ram_folder()) as tmp:
        folders = iter(range(10 ** 6))

        def write():
            folder = Path(tmp) / str(next(folders))
            folder.mkdir()
            write_adapter(folder, tensors, config)

        write_ms = _median_ms(write, repeats)
        folder = Path(tmp) / "0"
        expected = {t.rsplit(".", 1)[-1] for t in TARGETS}

        def load():
            helper = PEFTHelper.from_local_dir(str(folder), 4096)
            return LoRAModel.from_local_checkpoint(str(folder), expected, helper, lora_model_id=1, device="cpu",
                                                   dtype=torch.bfloat16)

        load_ms = _median_ms(load, repeats)
        slots = {k: torch.zeros(2, *t.shape, dtype=t.dtype) for k, t in tensors.items()}

        def activate():  # vLLM's set_lora: one copy per factor into slot 1
            for k, t in tensors.items():
                slots[k][1].copy_(t)

        activate_ms = _median_ms(activate, repeats)
        fused = {k: torch.zeros(2, t.shape[1], t.shape[0], dtype=t.dtype) for k, t in tensors.items()}

        def refresh():  # the fused wrapper's copy of the changed slot (transposed, as it keeps them)
            for k, t in slots.items():
                fused[k][1].copy_(t[1].T)

        refresh_ms = _median_ms(refresh, repeats)
    return {"adapter_mb": round(nbytes / 1e6, 1), "write_ms": write_ms, "vllm_load_ms": load_ms,
            "vllm_activate_ms": activate_ms, "fused_refresh_ms": refresh_ms,
            "total_ms": round(write_ms + load_ms + activate_ms + refresh_ms, 2), "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlora_hf.serving.traffic", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(json.dumps(adapter_traffic(args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
