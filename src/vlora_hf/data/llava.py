"""LLaVA-format conversations -> training tensors: `LLaVADataset` and `LLaVACollator`.

The record format, its validation and the label rules live in `llava_format`; this module loads images (files,
or an in-memory bank), optionally replaces them by precomputed tower features, and pads rows into batches.
"""

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..atomic import atomic_file
from ..processing.processing_vlora import NO_MAX_LENGTH
from .llava_format import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    MODES,
    encode_messages,
    image_token_id_of,
    load_records,
    record_id,
    to_messages,
)

_ENCODE_CACHE_SIZE = 100_000  # distinct conversations kept tokenised (a real dataset's are mostly distinct)


def chat_template_of(processor) -> str | None:
    """The processor's chat template (its default one when it holds several)."""
    template = processor.chat_template
    return template.get("default") if isinstance(template, dict) else template

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
        tokenizer: a fast tokenizer with a single ``<image>`` token (e.g. ``vlora_hf.training.bpe_tokenizer.build_tokenizer``).
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
            model_max_length = limit if isinstance(limit, int) and limit < NO_MAX_LENGTH else None
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
            with atomic_file(cache_file) as tmp:
                torch.save(features, tmp)
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
    "chat_template_of", "vision_feature_encoder", "LLaVADataset", "LLaVACollator",
]
