"""Question/answer rows over a bank of preprocessed images, their collator, and the chat-format encoding.

Images are preprocessed once (a tensor bank); rows refer to them by index, so several questions about one
image share its pixels, and a frozen tower can be run once per image (`precompute_features`).
"""

from __future__ import annotations

import torch

from ..processing.chat_templates import CHAT_TEMPLATES, VICUNA_V1_SYSTEM, VICUNA_V1_TEMPLATE

IGNORE_INDEX = -100


def _no_system_template() -> str:
    """vicuna_v1 without the default system prompt: `USER: <image>\\nQ ASSISTANT: A</s>` (short prompts)."""
    default = "{%- set system_text = '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' -%}"
    emit = "{{- system_text + ' ' -}}"
    if default not in VICUNA_V1_TEMPLATE or emit not in VICUNA_V1_TEMPLATE:  # pragma: no cover - template changed
        raise RuntimeError("the vicuna_v1 template changed; update _no_system_template")
    return VICUNA_V1_TEMPLATE.replace(default, "{%- set system_text = '' -%}").replace(
        emit, "{%- if system_text -%}{{- system_text + ' ' -}}{%- endif -%}"
    )


VICUNA_V1_NO_SYSTEM_TEMPLATE = _no_system_template()
TEMPLATES = {**CHAT_TEMPLATES, "vicuna_v1_no_system": VICUNA_V1_NO_SYSTEM_TEMPLATE}


def resolve_chat_template(name_or_template):
    if name_or_template is None:
        return None
    if name_or_template in TEMPLATES:
        return TEMPLATES[name_or_template]
    if "{" not in name_or_template:
        raise ValueError(f"chat_template {name_or_template!r} is neither a known name {sorted(TEMPLATES)} nor jinja")
    return name_or_template


def user_message(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


class PromptEncoder:
    """question, answer -> (input_ids, labels): the chat prompt (labels ignored) + " answer" + eos (learned)."""

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self._prompts: dict[str, list[int]] = {}
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos token: the model must learn where answers end")

    def prompt_ids(self, question: str) -> list[int]:
        ids = self._prompts.get(question)
        if ids is None:
            text = self.processor.apply_chat_template(user_message(question), add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text)["input_ids"]
            if len(self._prompts) < 10_000:
                self._prompts[question] = ids
        return ids

    def __call__(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        prompt = self.prompt_ids(question)
        answer_ids = self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids + [self.tokenizer.eos_token_id]
        ids, labels = prompt + answer_ids, [IGNORE_INDEX] * len(prompt) + answer_ids
        if self.max_length is not None and len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels


class ImageQADataset(torch.utils.data.Dataset):
    """Rows (image index, question, answer), tokenised up front; images live in a separate bank."""

    def __init__(self, rows: list[tuple[int, str, str]], encoder: PromptEncoder):
        self.rows = rows
        self.items = []
        for image_index, question, answer in rows:
            ids, labels = encoder(question, answer)
            self.items.append({"input_ids": ids, "labels": labels, "image_index": image_index})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class BankCollator:
    """Pads a list of rows (right padding) and gathers their images from `bank` under `key`.

    `key` is "pixel_values" (bank [N, 3, H, W]) or "image_features" (bank [N, P, Dv], a frozen tower's output).
    """

    def __init__(self, bank: torch.Tensor, pad_token_id: int, key: str = "pixel_values"):
        self.bank = bank
        self.pad_token_id = pad_token_id
        self.key = key

    def __call__(self, rows):
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        index = torch.tensor([r["image_index"] for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, self.key: self.bank[index]}


def preprocess_bank(images, image_processor, chunk: int = 256) -> torch.Tensor:
    """A list of images -> pixel tensor [N, 3, H, W] (in chunks, to bound memory)."""
    parts = []
    for start in range(0, len(images), chunk):
        out = image_processor(images[start : start + chunk], return_tensors="pt")
        parts.append(out["pixel_values"])
    return torch.cat(parts) if parts else torch.empty(0)


@torch.no_grad()
def precompute_features(model, pixel_bank: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Run the (frozen) vision tower once per image: pixel bank -> feature bank [N, P, Dv]."""
    tower = model.model
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(pixel_bank), batch_size):
        parts.append(tower.get_vision_features(pixel_bank[start : start + batch_size].to(device)).cpu())
    return torch.cat(parts)


__all__ = [
    "IGNORE_INDEX",
    "VICUNA_V1_NO_SYSTEM_TEMPLATE",
    "TEMPLATES",
    "resolve_chat_template",
    "user_message",
    "PromptEncoder",
    "ImageQADataset",
    "BankCollator",
    "preprocess_bank",
    "precompute_features",
]
