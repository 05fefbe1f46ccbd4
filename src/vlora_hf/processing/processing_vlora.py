"""VLoRAProcessor: tokenizer + VLoRA image processor + the release's chat templates.

``processor(images=..., text=..., return_tensors="pt")`` returns ``input_ids``, ``attention_mask`` and
``pixel_values``. Each image is represented in the text by exactly one ``<image>`` placeholder token
(``processor.image_token`` / ``processor.image_token_id``); VLoRA turns an image into LLM weight deltas
rather than visual tokens, so the placeholder is not expanded and a row may hold at most one image.
Images are matched to placeholders in order of occurrence (row by row); a nested list (one list per row)
is accepted too. Batches are padded on the left by default (generation-friendly).

This file imports only its siblings and third-party libraries, so it can ship flat as remote code.
"""

from typing import Any

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import AudioKwargs, ProcessingKwargs, ProcessorMixin, TextKwargs, VideosKwargs
from transformers.tokenization_utils_base import AddedToken

from .chat_templates import BACKBONE, CHAT_TEMPLATES, PLAIN_TEMPLATE, VICUNA_V1_TEMPLATE, backbone_template
from .image_processing_vlora import VLoRAImageProcessor, VLoRAImageProcessorKwargs

# A tokenizer without a real length limit reports a huge model_max_length (transformers: 1e30); below this
# cut-off the value is a limit.
NO_MAX_LENGTH = int(1e9)


class VLoRAProcessorKwargs(ProcessingKwargs, total=False):
    """What ``ProcessorMixin._merge_kwargs`` routes by (read at run time: no postponed annotations in this file)."""

    images_kwargs: VLoRAImageProcessorKwargs
    _defaults = {}  # transformers < 5.24 reads this attribute (a TypedDict subclass does not inherit it); none here


def _is_image_like(obj) -> bool:
    if obj is None:
        return False
    mod = type(obj).__module__
    return (
        isinstance(obj, (str, bytes, bytearray))
        or mod.startswith("PIL")
        or mod.startswith("numpy")
        or mod.startswith("torch")
        or hasattr(obj, "__fspath__")
    )


class VLoRAProcessor(ProcessorMixin):
    r"""Processor for VLoRA models (tokenizer + :class:`VLoRAImageProcessor` + vicuna_v1 chat template).

    Args:
        image_processor: a :class:`VLoRAImageProcessor`.
        tokenizer: any transformers tokenizer; ``image_token`` is added as a special token if missing.
        chat_template: a jinja string, a dict of named templates, or the name of the default one. Default:
            ``{"default": vicuna_v1, "vicuna_v1": ..., "plain": ..., "backbone": ...}``, so
            ``apply_chat_template(..., chat_template="plain")`` selects the caption pre-training format and
            ``"backbone"`` the tokenizer's own template (Qwen2's ChatML, Llama-3's headers) with ``<image>`` where
            the image goes (present when the tokenizer has a template). ``chat_template="backbone"`` here makes
            that template the default, for training and inference alike.
        image_token: the placeholder string (default ``"<image>"``).
        padding_side: default padding side for batched text (``"left"``).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = "<image>",
        padding_side: str = "left",
        **kwargs,
    ):
        if image_processor is None:
            image_processor = VLoRAImageProcessor()
        if tokenizer is None:
            raise ValueError("VLoRAProcessor needs a tokenizer.")
        own = backbone_template(tokenizer)
        if chat_template == BACKBONE:
            if own is None:
                raise ValueError("chat_template='backbone' needs a tokenizer with its own chat template")
            chat_template = {**CHAT_TEMPLATES, "default": own}
        elif isinstance(chat_template, str) and chat_template in CHAT_TEMPLATES:  # a name
            chat_template = {**CHAT_TEMPLATES, "default": CHAT_TEMPLATES[chat_template]}
        if chat_template is None:
            chat_template = dict(CHAT_TEMPLATES)
        if isinstance(chat_template, dict) and own is not None and tokenizer.chat_template not in CHAT_TEMPLATES.values():
            chat_template.setdefault(BACKBONE, own)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.padding_side = padding_side
        token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if token_id is None or (tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id):
            tokenizer.add_tokens([AddedToken(self.image_token, special=True, normalized=False)], special_tokens=True)
            token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_token_id = int(token_id)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    # ------------------------------------------------------------------ helpers
    @property
    def model_max_length(self) -> int | None:
        n = getattr(self.tokenizer, "model_max_length", None)
        return int(n) if n is not None and n < NO_MAX_LENGTH else None

    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict, Any]:
        """-> (tokenizer kwargs, image processor kwargs, return_tensors), routed by ``ProcessorMixin._merge_kwargs``
        from the keys transformers' typed kwargs declare. A key that no modality declares is an error (transformers
        would only warn); keys of modalities VLoRA does not take (videos, audio) are accepted and dropped. The
        tokenizer's init kwargs are not merged in: the processor's ``padding_side`` stays the default."""
        image_keys = getattr(self.image_processor, "valid_kwargs", VLoRAImageProcessorKwargs).__annotations__
        known = set(VLoRAProcessorKwargs.__annotations__) | {"common_kwargs"} | set(image_keys)
        for typed in (TextKwargs, VideosKwargs, AudioKwargs):
            known |= set(typed.__annotations__)
        for key in kwargs:
            if key not in known:
                raise TypeError(f"VLoRAProcessor got an unexpected keyword argument {key!r}")
        merged = self._merge_kwargs(VLoRAProcessorKwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        for key in VLoRAProcessorKwargs.__annotations__:  # processor-level flags, not the tokenizer's
            text_kwargs.pop(key, None)
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        return text_kwargs, images_kwargs, return_tensors

    @staticmethod
    def _normalize_text(text) -> list[str]:
        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)):
            texts = list(text)
        else:
            raise ValueError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
        if len(texts) == 0:
            raise ValueError("`text` is an empty list: give at least one prompt.")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"`text` must be a string or a list of strings; item {i} is a {type(t).__name__}.")
            if t.strip() == "":
                raise ValueError(f"Prompt {i} is empty: give a non-empty prompt (e.g. '<image>\\nDescribe the image.').")
        return texts

    def _match_images(self, texts: list[str], images) -> list:
        """Return the images in placeholder order, checking counts. ``images`` may be flat or one list per row."""
        counts = [t.count(self.image_token) for t in texts]
        for row, n in enumerate(counts):
            if n > 1:
                raise ValueError(
                    f"Prompt {row} holds {n} {self.image_token} placeholders, but a row may hold at most one image "
                    "(VLoRA applies one image's weights per sequence). Split it into several rows."
                )
        expected = sum(counts)
        rows_with = [r for r, n in enumerate(counts) if n]
        if images is None:
            if expected:
                raise ValueError(
                    f"Expected {expected} image(s), one per {self.image_token} placeholder (prompts {rows_with}), "
                    "but no images were given."
                )
            return []
        nested = (
            isinstance(images, (list, tuple))
            and len(images) == len(texts)
            and len(images) > 0
            and all(isinstance(x, (list, tuple)) or x is None for x in images)
        )
        if nested:
            ordered = []
            for row, (row_images, n) in enumerate(zip(images, counts)):
                row_images = [] if row_images is None else list(row_images)
                if len(row_images) != n:
                    raise ValueError(
                        f"Prompt {row} holds {n} {self.image_token} placeholder(s) but {len(row_images)} image(s) "
                        f"were given for it; expected {n} (at most one image per row)."
                    )
                ordered.extend(row_images)
            return ordered
        if isinstance(images, (list, tuple)):
            flat = []
            for x in images:
                if isinstance(x, (list, tuple)):
                    flat.extend(x)
                else:
                    flat.append(x)
        elif _is_image_like(images) and getattr(images, "ndim", 3) == 4:
            flat = [images[i] for i in range(images.shape[0])]
        else:
            flat = [images]
        if len(flat) != expected:
            raise ValueError(
                f"Expected {expected} image(s), one per {self.image_token} placeholder (prompts with a placeholder: "
                f"{rows_with}), but got {len(flat)} image(s). Put one '{self.image_token}' in the prompt of each "
                "row that has an image."
            )
        return flat

    # ------------------------------------------------------------------ main entry
    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        if videos is not None or audio is not None:
            raise ValueError("VLoRAProcessor handles images and text only (no videos or audio).")
        if images is None and text is None:
            raise ValueError("VLoRAProcessor needs `text`, `images` or both.")
        text_kwargs, images_kwargs, return_tensors = self._split_kwargs(dict(kwargs))

        if text is None:  # image-only call
            return BatchFeature(
                dict(self.image_processor(images, return_tensors=return_tensors, **images_kwargs)),
                tensor_type=return_tensors,
            )

        texts = self._normalize_text(text)
        ordered_images = self._match_images(texts, images)

        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and all(t.startswith(bos) for t in texts):  # the chat template wrote it (Llama-3): not twice
            text_kwargs.setdefault("add_special_tokens", False)
        text_kwargs.setdefault("padding", True if len(texts) > 1 else False)
        text_kwargs.setdefault("padding_side", self.padding_side)
        encoding = self.tokenizer(texts, **text_kwargs)
        input_ids = encoding["input_ids"]

        limit = self.model_max_length
        truncating = bool(text_kwargs.get("truncation"))
        for row, ids in enumerate(input_ids):
            n_img = sum(1 for t in ids if t == self.image_token_id)
            want = texts[row].count(self.image_token)
            if n_img != want:
                raise ValueError(
                    f"Prompt {row}: expected {want} {self.image_token} token(s) (id {self.image_token_id}) after "
                    f"tokenization but found {n_img}; truncation may have cut the placeholder."
                )
            if limit is not None and not truncating and len(ids) > limit:
                n_real = sum(encoding["attention_mask"][row]) if "attention_mask" in encoding else len(ids)
                if n_real > limit:
                    raise ValueError(
                        f"Prompt {row} is {n_real} tokens long, longer than the model's maximum of {limit} "
                        "positions (max_position_embeddings, which saved tokenizers carry as model_max_length). "
                        "Shorten it or pass truncation=True."
                    )

        data = dict(encoding)
        if ordered_images:
            pixel = self.image_processor(ordered_images, return_tensors=return_tensors, **images_kwargs)
            data["pixel_values"] = pixel["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)

    # ------------------------------------------------------------------ chat / decode
    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """As ``ProcessorMixin.apply_chat_template``; ``chat_template`` may also name a template
        (``"vicuna_v1"``, ``"plain"``, ``"backbone"``) even when the processor holds a single template string."""
        if isinstance(chat_template, str) and not (
            isinstance(self.chat_template, dict) and chat_template in self.chat_template
        ):
            if chat_template in CHAT_TEMPLATES:
                chat_template = CHAT_TEMPLATES[chat_template]
            elif chat_template == BACKBONE:
                chat_template = backbone_template(self.tokenizer)
                if chat_template is None:
                    raise ValueError("chat_template='backbone': the tokenizer has no chat template of its own")
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["VLoRAProcessor", "VICUNA_V1_TEMPLATE", "PLAIN_TEMPLATE"]

# Saving writes an auto_map entry and copies this file and its siblings (remote code for AutoProcessor).
VLoRAProcessor.register_for_auto_class("AutoProcessor")
