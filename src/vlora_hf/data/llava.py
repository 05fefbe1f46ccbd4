"""LLaVA-format conversations -> training tensors (dataset + collator).

Records (a json list, a ``.jsonl`` file, or a Python list)::

    {"id": "...", "image": "relative/path.png",            # "image" optional: text-only sample when absent
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}

Modes (the release's two training formats):

- ``"vicuna_v1"`` (instruction tuning): the conversation is rendered with the ``VICUNA_V1_TEMPLATE`` chat
  template; labels are the tokens of every assistant turn including its closing ``</s>``, ``-100`` elsewhere.
  As in the release, the ``<image>`` placeholder is moved to the front of its turn: ``"<image>\\n" + text``.
- ``"plain"`` (caption pre-training): exactly one human + one gpt turn; as in the release the human turn is
  replaced by the bare placeholder, and the text is rendered with ``PLAIN_TEMPLATE``:
  ``"<image>\\n" + caption + "\\n"`` (bos first); labels are the caption tokens and the final ``"\\n"``.
  (The release's ``preprocess_plain`` concatenates ``"<image>" + caption + "\\n"`` without the template's
  newline after the placeholder; we keep the template single-sourced, which adds that one ``"\\n"`` token.)

Assistant spans are found without re-implementing the template: for each assistant turn ``j`` the template
renders ``messages[:j]`` with the generation prompt (``P``) and ``messages[:j+1]`` (``S``); the characters
``[len(P), len(S))`` of the full rendering are the turn, and every token whose offset (fast tokenizer offset
mapping) starts inside it is learned.

Every error in a record raises one ``ValueError`` naming the record's id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..processing.chat_templates import PLAIN_TEMPLATE, VICUNA_V1_TEMPLATE

IGNORE_INDEX = -100
_ENCODE_CACHE_SIZE = 100_000  # distinct conversations kept tokenised (a real dataset's are mostly distinct)
IMAGE_TOKEN = "<image>"
MODES = {"vicuna_v1": VICUNA_V1_TEMPLATE, "plain": PLAIN_TEMPLATE}
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ------------------------------------------------------------------------------------------------------------
# records


def load_records(data) -> list[dict]:
    """A json file (list of records), a ``.jsonl`` file (one record per line) or an in-memory list."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"LLaVA data file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"LLaVA data file {path} is not valid json: {e}") from None
    else:
        records = data
    if not isinstance(records, list):
        raise ValueError(f"LLaVA data must be a list of records, got {type(records).__name__}")
    return records


def record_id(record, index: int) -> str:
    rid = record.get("id") if isinstance(record, Mapping) else None
    return f"{rid!r} (index {index})" if rid is not None else f"at index {index} (no id)"


def to_messages(record, index: int, mode: str = "vicuna_v1") -> tuple[list[dict], str | None]:
    """Validate one record -> (chat messages for the template, image file or None). ValueError names the id."""
    if mode not in MODES:
        raise ValueError(f"unknown data mode {mode!r}; expected one of {sorted(MODES)}")
    rid = None

    def bad(problem: str) -> ValueError:
        return ValueError(f"LLaVA record {rid}: {problem}")

    rid = record_id(record, index)
    if not isinstance(record, Mapping):
        raise bad(f"a record must be a json object, got {type(record).__name__}")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise bad(f"'image' must be one relative file path (a non-empty string), got {image!r}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise bad("'conversations' must be a non-empty list of {'from', 'value'} turns")
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise bad(f"turn {t} must be an object with 'from' and 'value'")
        role = _ROLES.get(turn["from"])
        if role is None:
            raise bad(f"turn {t} has unknown speaker {turn['from']!r} (expected human or gpt)")
        if not isinstance(turn["value"], str):
            raise bad(f"turn {t} 'value' must be a string, got {type(turn['value']).__name__}")
        if role == "system" and t != 0:
            raise bad(f"turn {t}: a system turn may only come first")
        messages.append({"role": role, "content": turn["value"]})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for t, m in enumerate(body):
        expected = "user" if t % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise bad(f"turns must alternate human, gpt, human, ...; turn {t + len(messages) - len(body)} is "
                      f"{m['role']!r} where {expected!r} was expected")
    if not body or body[-1]["role"] != "assistant":
        raise bad("the conversation must end with a gpt turn (there is nothing to learn otherwise)")
    n_placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if image is None and n_placeholders:
        raise bad(f"text-only record (no 'image') contains {n_placeholders} {IMAGE_TOKEN} placeholder(s)")
    if image is not None:
        if n_placeholders != 1:
            raise bad(f"an image record needs exactly one {IMAGE_TOKEN} placeholder, found {n_placeholders}")
        if any(m["role"] != "user" and IMAGE_TOKEN in m["content"] for m in messages):
            raise bad(f"the {IMAGE_TOKEN} placeholder must be in a human turn")
        for m in messages:  # the release's preprocess_multimodal: move the placeholder to the front
            if IMAGE_TOKEN in m["content"]:
                m["content"] = IMAGE_TOKEN + "\n" + m["content"].replace(IMAGE_TOKEN, "").strip()
    if mode == "plain":
        if image is None:
            raise bad("plain (caption pre-training) records need an image")
        if len(messages) != 2:
            raise bad(f"plain mode needs exactly one human and one gpt turn, got {len(messages)} turns")
        if IMAGE_TOKEN not in messages[0]["content"]:
            raise bad(f"plain mode needs the {IMAGE_TOKEN} placeholder in the human turn")
        messages[0]["content"] = IMAGE_TOKEN  # the release drops the question: "<image>" + caption
    return messages, image


# ------------------------------------------------------------------------------------------------------------
# tokenisation


def image_token_id_of(tokenizer) -> int:
    """The tokenizer's single-token id for ``<image>``; ValueError when it has none."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
    if tid is None or tid == tokenizer.unk_token_id or ids != [tid]:
        raise ValueError(
            f"the tokenizer has no single {IMAGE_TOKEN} token (got {ids}); add it first: "
            f"tokenizer.add_special_tokens({{'additional_special_tokens': ['{IMAGE_TOKEN}']}})"
        )
    return tid


def _render(tokenizer, messages, template: str, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode_messages(tokenizer, messages: list[dict], mode: str = "vicuna_v1",
                    chat_template: str | None = None) -> tuple[list[int], list[int], str]:
    """Render + tokenise a validated conversation -> (input_ids, labels, text). Labels: assistant turns only."""
    template = chat_template or MODES[mode]
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("LLaVA data needs a fast tokenizer (PreTrainedTokenizerFast) for offset mapping")
    text = _render(tokenizer, messages, template, False)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:j], template, True) if j else ""
        upto = _render(tokenizer, messages[: j + 1], template, False)
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise ValueError("the chat template does not render conversations prefix by prefix; cannot locate "
                             "the assistant turns")
        spans.append((len(prefix), len(upto)))
    bos = getattr(tokenizer, "bos_token", None)  # a template that writes bos itself (Llama-3) gets it once
    enc = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)), return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(s <= start < e for s, e in spans):
            labels[k] = ids[k]
    return ids, labels, text


# ------------------------------------------------------------------------------------------------------------
# images


def _pixels(image_processor, image) -> torch.Tensor:
    out = image_processor(image, return_tensors="pt") if not _is_plain_callable(image_processor) else image_processor(image)
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["pixel_values"]
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out)
    if out.dim() == 4:
        if out.shape[0] != 1:
            raise ValueError(f"the image processor returned {out.shape[0]} images for one image")
        out = out[0]
    return out


def _is_plain_callable(fn) -> bool:
    """A bare function / lambda (called as fn(image)) rather than a transformers image processor."""
    import inspect

    if inspect.isfunction(fn) or inspect.ismethod(fn):
        try:
            inspect.signature(fn).bind(None, return_tensors="pt")
            return False
        except TypeError:
            return True
    return False


def vision_feature_encoder(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """pixel_values [n, 3, H, W] -> frozen-tower features [n, P, Dv] (on CPU) through ``model.model``'s vision path."""
    inner = model.model

    @torch.no_grad()
    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(inner.vision_tower.parameters())
        feats = inner.get_vision_features(pixel_values.to(param.device, param.dtype))
        return feats.detach().cpu()

    return encode


# ------------------------------------------------------------------------------------------------------------
# dataset + collator


class LLaVADataset(torch.utils.data.Dataset):
    """LLaVA-format records -> {"input_ids", "labels", and "pixel_values" [3,H,W] or "image_features" [P,Dv]}.

    Args:
        data: json / jsonl path or a list of records.
        tokenizer: a fast tokenizer with a single ``<image>`` token (e.g. ``vlora_hf.tokenization.build_tokenizer``).
        image_folder: image paths are relative to it (default: the json's folder, else the working directory).
        image_processor: any callable: a transformers image processor (called ``(image, return_tensors="pt")``,
            ``["pixel_values"][0]`` used) or a function ``image -> tensor [3, H, W]``.
        mode: ``"vicuna_v1"`` or ``"plain"``.
        model_max_length: truncate longer samples (default: ``tokenizer.model_max_length`` when finite).
        image_token_id: id written for the placeholder (default: the tokenizer's ``<image>`` id); set it to the
            model's ``config.image_token_id``.
        check_images: verify at construction that every image exists (ValueError naming the record).
        chat_template: the template for ``vicuna_v1`` mode (default ``VICUNA_V1_TEMPLATE``), e.g. the processor's.
        images: in-memory images by the records' ``"image"`` value instead of files: PIL images (through
            ``image_processor``) or tensors taken as preprocessed pixel values [3, H, W] (a synthetic set such as
            shapes-vqa, drawn in memory, preprocessed once).
    All records are validated at construction; tokenisation and image loading are lazy, and identical
    conversations are tokenised once (a synthetic set repeats a few hundred of them).
    """

    def __init__(self, data, tokenizer, image_folder=None, image_processor=None, mode: str = "vicuna_v1",
                 model_max_length: int | None = None, image_token_id: int | None = None,
                 check_images: bool = True, chat_template: str | None = None, images: Mapping | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown data mode {mode!r}; expected one of {sorted(MODES)}")
        self.records = load_records(data)
        self.tokenizer = tokenizer
        self.mode = mode
        self.chat_template = chat_template
        self.image_processor = image_processor
        if image_folder is None:
            image_folder = Path(data).parent if isinstance(data, (str, os.PathLike)) else Path.cwd()
        self.image_folder = Path(image_folder)
        if model_max_length is None:
            limit = getattr(tokenizer, "model_max_length", None)
            model_max_length = limit if isinstance(limit, int) and limit < 10**8 else None
        self.model_max_length = model_max_length
        self.tokenizer_image_id = image_token_id_of(tokenizer)
        self.image_token_id = self.tokenizer_image_id if image_token_id is None else int(image_token_id)
        self.images = images
        self.samples = [to_messages(r, i, mode) for i, r in enumerate(self.records)]
        if check_images:
            for i, (_, image) in enumerate(self.samples):
                if image is None:
                    continue
                if images is not None and image not in images:
                    raise ValueError(f"LLaVA record {record_id(self.records[i], i)}: image {image!r} is not among "
                                     f"the {len(images)} in-memory images")
                if images is None and not (self.image_folder / image).is_file():
                    raise ValueError(f"LLaVA record {record_id(self.records[i], i)}: image file "
                                     f"{self.image_folder / image} does not exist")
        self.features: dict[str, torch.Tensor] | None = None  # image path -> [P, Dv] once precomputed
        self._encoded: dict[tuple, tuple[list[int], list[int]]] = {}  # conversation -> (ids, labels)

    def __len__(self) -> int:
        return len(self.records)

    def has_image(self, i: int) -> bool:
        return self.samples[i][1] is not None

    @property
    def lengths(self) -> list[int]:
        """Rough lengths (words + 128 per image), as the release's length-grouped sampler uses them."""
        return [sum(len(m["content"].split()) for m in msgs) + (128 if img else 0) for msgs, img in self.samples]

    @property
    def modality_lengths(self) -> list[int]:
        """Word counts, negative for text-only samples (the release's `group_by_modality_length`)."""
        return [(1 if img else -1) * sum(len(m["content"].split()) for m in msgs) for msgs, img in self.samples]

    def encode(self, i: int) -> tuple[list[int], list[int]]:
        key = tuple((m["role"], m["content"]) for m in self.samples[i][0])
        encoded = self._encoded.get(key)
        if encoded is None:
            encoded = self._encode(i)
            if len(self._encoded) < _ENCODE_CACHE_SIZE:
                self._encoded[key] = encoded
        return encoded

    def _encode(self, i: int) -> tuple[list[int], list[int]]:
        messages, image = self.samples[i]
        ids, labels, _ = encode_messages(self.tokenizer, messages, self.mode, self.chat_template)
        n = ids.count(self.tokenizer_image_id)
        if n != (1 if image else 0):  # e.g. the tokenizer split "<image>" differently inside text
            raise ValueError(f"LLaVA record {record_id(self.records[i], i)}: tokenised to {n} {IMAGE_TOKEN} "
                             f"tokens, expected {1 if image else 0}")
        if self.model_max_length is not None and len(ids) > self.model_max_length:
            ids, labels = ids[: self.model_max_length], labels[: self.model_max_length]
            if image and self.tokenizer_image_id not in ids:
                raise ValueError(f"LLaVA record {record_id(self.records[i], i)}: truncation at model_max_length "
                                 f"{self.model_max_length} removes the {IMAGE_TOKEN} placeholder")
        if self.image_token_id != self.tokenizer_image_id:
            ids = [self.image_token_id if t == self.tokenizer_image_id else t for t in ids]
        return ids, labels

    def image_path(self, i: int) -> Path | None:
        image = self.samples[i][1]
        return None if image is None else self.image_folder / image

    def load_image(self, i: int):
        from PIL import Image

        if self.images is not None:
            if not self.has_image(i):
                raise ValueError(f"LLaVA record {record_id(self.records[i], i)} has no image")
            return self.images[self.samples[i][1]]
        path = self.image_path(i)
        if path is None:
            raise ValueError(f"LLaVA record {record_id(self.records[i], i)} has no image")
        if not path.is_file():
            raise ValueError(f"LLaVA record {record_id(self.records[i], i)}: image file {path} does not exist")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises several types
            raise ValueError(f"LLaVA record {record_id(self.records[i], i)}: cannot read image {path}: {e}") from None

    def pixel_values(self, i: int) -> torch.Tensor:
        image = self.load_image(i)
        if isinstance(image, torch.Tensor):  # preprocessed in memory
            return image
        if self.image_processor is None:
            raise ValueError(f"LLaVA record {record_id(self.records[i], i)} has an image but the dataset was "
                             "given no image_processor")
        return _pixels(self.image_processor, image)

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.encode(i)
        item = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
        if self.has_image(i):
            if self.features is not None:
                item["image_features"] = self.features[self.samples[i][1]]
            else:
                item["pixel_values"] = self.pixel_values(i)
        return item

    def precompute_image_features(self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 32,
                                  cache_file: str | os.PathLike | None = None) -> int:
        """Encode every distinct image once with a frozen tower (``encode``: pixels [n,3,H,W] -> [n,P,Dv], e.g.
        ``vision_feature_encoder(model)``) and serve ``image_features`` from then on (every epoch).

        With ``cache_file``, features are loaded from it when it exists and covers every image, else computed
        and saved there (written to a temporary name, then renamed). Returns the number of images encoded."""
        paths = sorted({img for _, img in self.samples if img is not None})
        if cache_file is not None and Path(cache_file).is_file():
            cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            if all(p in cached for p in paths):
                self.features = {p: cached[p] for p in paths}
                return 0
        index = {img: i for i, (_, img) in reversed(list(enumerate(self.samples))) if img is not None}
        features: dict[str, torch.Tensor] = {}
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            px = torch.stack([self.pixel_values(index[p]) for p in chunk])
            out = encode(px)
            if out.shape[0] != len(chunk):
                raise ValueError(f"the feature encoder returned {out.shape[0]} rows for {len(chunk)} images")
            for p, f in zip(chunk, out):
                features[p] = f.detach().cpu().clone()
        self.features = features
        if cache_file is not None:
            cache_file = Path(cache_file)
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(cache_file.name + ".tmp")
            torch.save(features, tmp)
            os.replace(tmp, cache_file)
        return len(paths)


class LLaVACollator:
    """Pads rows from `LLaVADataset` into a batch.

    Returns ``input_ids`` [b, T] (padded with ``pad_token_id``), ``attention_mask`` (1 on real tokens), ``labels``
    (``-100`` on padding), and, when any row has an image, ``pixel_values`` [n, 3, H, W] or ``image_features``
    [n, P, Dv] for the n rows that have one, in row order (one image per placeholder, as the model expects).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", max_length: int | None = None,
                 pad_to_multiple_of: int | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_token_id is None:
            raise ValueError("LLaVACollator needs a pad_token_id (the tokenizer has no pad token)")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("LLaVACollator got an empty batch")
        seqs = []
        for r in rows:
            ids, labels = torch.as_tensor(r["input_ids"]), torch.as_tensor(r["labels"])
            if ids.shape != labels.shape:
                raise ValueError(f"row input_ids {tuple(ids.shape)} and labels {tuple(labels.shape)} differ in shape")
            if self.max_length is not None:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            seqs.append((ids, labels))
        length = max(len(ids) for ids, _ in seqs)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(rows)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, length), dtype=torch.long)
        for i, (ids, lab) in enumerate(seqs):
            n = len(ids)
            sl = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[i, sl], labels[i, sl], mask[i, sl] = ids, lab, 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        keys = {k for r in rows for k in ("pixel_values", "image_features") if r.get(k) is not None}
        if len(keys) > 1:
            raise ValueError("a batch mixes rows with pixel_values and rows with image_features")
        if keys:
            key = keys.pop()
            batch[key] = torch.stack([torch.as_tensor(r[key]) for r in rows if r.get(key) is not None])
        return batch


__all__ = [
    "IGNORE_INDEX", "IMAGE_TOKEN", "MODES", "load_records", "to_messages", "encode_messages", "image_token_id_of",
    "vision_feature_encoder", "LLaVADataset", "LLaVACollator",
]
