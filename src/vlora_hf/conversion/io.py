"""Reading checkpoints (safetensors / PyTorch .bin, single or sharded) and writing their shards."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..atomic import recover
from ..dtypes import DTYPES  # noqa: F401 - the conversion modules take it from here

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as asked (the message names the problem)."""


# ----- reading -----------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """A JSON object from `path`; ConversionError naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path} is not a readable JSON file: {err}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder, in index order: safetensors first, then PyTorch .bin."""
    folder = Path(folder)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index} has no 'weight_map'")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ConversionError(f"{index} names shards that are not in {folder}: {missing}")
            return [folder / n for n in names]
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "*.bin"):
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("training_args"))
        if found:
            return found
    raise ConversionError(
        f"no weights in {folder}: expected model.safetensors, {SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX}"
    )


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """One weight file -> tensors. Pickled .bin files are read with `weights_only=True` (no code execution)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"cannot read {path}: truncated or not a safetensors file ({err})") from None
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialisation cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - weights_only refuses arbitrary pickles with UnpicklingError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"cannot read {path} safely (torch.load weights_only=True): {reason}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a flat state dict of tensors")
    return state


def iter_checkpoint(folder: str | os.PathLike, desc: str = "reading") -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of a checkpoint folder, shard by shard, with a progress bar over the shards."""
    files = weight_files(folder)
    seen: set[str] = set()
    for path in tqdm(files, desc=f"{desc} {Path(folder).name}", unit="shard"):
        for name, tensor in load_file(path).items():
            if name in seen:
                raise ConversionError(f"tensor {name!r} appears in more than one shard of {folder}")
            seen.add(name)
            yield name, tensor


# ----- writing -----------------------------------------------------------------------------------------------
def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '10KiB' / 1000 -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max shard size {size!r} is not a size like '5GB' or '500MB'")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(number * base**power)


def write_safetensors_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str | int = "5GB") -> list[str]:
    """Write `state` as model.safetensors, or as model-0000i-of-0000n.safetensors + index when it is larger."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=parse_size(max_shard_size))
    for filename, names in tqdm(split.filename_to_tensors.items(), desc="writing", unit="shard"):
        shard = {name: state[name].contiguous() for name in names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_parameters": sum(t.numel() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


def check_output(output: str | os.PathLike, force: bool) -> Path:
    """Recover an interrupted earlier write, then refuse a non-empty output folder unless `force` (a file in the
    way is always refused)."""
    output = Path(output).absolute()
    recover(output)
    if output.exists():
        if not output.is_dir():
            raise ConversionError(f"--output {output} exists and is not a folder")
        if any(output.iterdir()) and not force:
            raise ConversionError(f"--output {output} is not empty: pass --force to replace it")
    return output
