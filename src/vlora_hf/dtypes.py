"""Weight precisions by name, and where a model runs: one table for the CLI, conversion and training."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device_and_dtype(device: str | None = None, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """device: None -> cuda when available, else cpu. dtype "auto": bfloat16 on a GPU that supports it, else
    float32; or a name of `DTYPES`."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{name!r} is not a valid device: {err}") from err
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} asked for CUDA but no CUDA device is available")
    if dtype == "auto":
        bf16 = picked.type == "cuda" and torch.cuda.is_bf16_supported()
        return picked, torch.bfloat16 if bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return picked, DTYPES[dtype]


__all__ = ["DTYPES", "pick_device_and_dtype"]
