"""Image processor for VLoRA: the release's square padding, then the vision tower's own preprocessing.

``image_aspect_ratio="pad"`` (the release's default for VLoRA) pads every image to a square with the mean
colour (``tuple(int(x * 255) for x in image_mean)``), the image centred at ``((max - w) // 2, (max - h) // 2)``
exactly like the release's ``expand2square``; then the tower's resize / centre crop / rescale / normalise
run as in transformers' ``CLIPImageProcessorPil`` (CLIP towers) or ``SiglipImageProcessorPil`` (SigLIP towers:
pass ``size={"height": S, "width": S}``, ``do_center_crop=False``, mean/std 0.5), on the PIL backend.

Inputs: PIL images of any mode (transparency is composited over the mean colour; L/LA/P/CMYK/I;16/I/F
are converted to 8-bit RGB), NumPy arrays and torch tensors (HW, HWC or CHW; uint8, other integer types or
float in [0, 1] / [0, 255]), file paths, raw bytes and URLs (through ``transformers.image_utils.load_image``).
Corrupt or truncated files and decompression bombs (Pillow's ``Image.MAX_IMAGE_PIXELS`` guard) raise a
``ValueError`` naming the problem.

This file imports only third-party libraries, so it can ship flat as remote code.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers import CLIPImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import ImagesKwargs

IMAGE_ASPECT_RATIOS = ("pad", "square")


class VLoRAImageProcessorKwargs(ImagesKwargs, total=False):
    """``image_aspect_ratio``: ``"pad"`` (square padding with the mean colour, the release's VLoRA setting)
    or ``"square"`` (no padding: the tower's resize/centre crop only)."""

    image_aspect_ratio: str


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """The release's ``expand2square`` (LLaVA ``mm_utils``), unchanged."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def _mean_color(image_mean) -> tuple[int, int, int]:
    if isinstance(image_mean, (int, float)):
        image_mean = [image_mean] * 3
    mean = list(image_mean)
    if len(mean) == 1:
        mean = mean * 3
    return tuple(int(x * 255) for x in mean[:3])


def open_image_file(source, *, what: str | None = None) -> Image.Image:
    """Open and fully decode an image from a path, bytes or a file object, with clear errors."""
    name = what or (str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ValueError(f"Image file not found: {name!r}")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both as the same guard.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(
            f"Image {name!r} is too large to decode safely (Pillow's decompression-bomb guard, "
            f"Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {err}. Raise PIL.Image.MAX_IMAGE_PIXELS if the "
            "image is trusted."
        ) from None
    except UnidentifiedImageError as err:
        raise ValueError(f"Could not read image {name!r}: not a recognised image format ({err}).") from None
    except (OSError, SyntaxError, EOFError, ValueError) as err:
        raise ValueError(f"Could not decode image {name!r}: the file is truncated or corrupt ({err}).") from None
    return image


def _array_to_pil(array: np.ndarray, channels_first_hint: bool) -> Image.Image:
    """HW / HWC / CHW array (any numeric dtype) -> PIL image (L, LA, RGB or RGBA, 8 bit)."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[-1] not in (1, 2, 3, 4):
        arr = arr[0]
    if arr.ndim == 3:
        first_ok, last_ok = arr.shape[0] in (1, 2, 3, 4), arr.shape[-1] in (1, 2, 3, 4)
        if first_ok and last_ok:
            # ambiguous (e.g. a 3x3 RGB image): torch tensors are channels-first, arrays channels-last, except
            # a trailing 1 with 3/4 leading channels (e.g. [3, 1, 1]: one RGB pixel).
            chw = channels_first_hint or (arr.shape[-1] == 1 and arr.shape[0] in (3, 4))
        else:
            chw = first_ok
        if not (first_ok or last_ok):
            raise ValueError(
                f"Cannot interpret an image array of shape {tuple(arr.shape)}: expected HW, HWC or CHW with 1-4 channels."
            )
        if chw:
            arr = np.moveaxis(arr, 0, -1)
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    elif arr.ndim != 2:
        raise ValueError(
            f"Cannot interpret an image array of shape {tuple(arr.shape)}: expected HW, HWC or CHW (one image)."
        )
    if arr.size == 0 or min(arr.shape[:2]) == 0:
        raise ValueError(f"Empty image (shape {tuple(np.asarray(array).shape)}).")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("Image array contains NaN or infinite values.")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 and arr.min(initial=0.0) >= 0.0 else 1.0
        arr = np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = arr.astype(np.int64)
        if arr.max(initial=0) > 255:  # 16-bit data
            arr = np.rint(np.clip(arr, 0, 65535) / 257.0)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    mode = {2: "L", 3: None}.get(arr.ndim)
    if arr.ndim == 3:
        mode = {2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def to_rgb_pil(image: Any, background=(0, 0, 0)) -> Image.Image:
    """Any supported image input -> 8-bit RGB PIL image; transparency composited over ``background``."""
    if isinstance(image, (str, os.PathLike)):
        s = str(image)
        if s.startswith("http://") or s.startswith("https://") or s.startswith("data:image/"):
            from transformers.image_utils import load_image

            image = load_image(s)
        else:
            image = open_image_file(image)
    elif isinstance(image, (bytes, bytearray, memoryview)) or (hasattr(image, "read") and not isinstance(image, Image.Image)):
        image = open_image_file(image, what="<bytes>")
    elif not isinstance(image, Image.Image):
        channels_first = False
        if type(image).__module__.startswith("torch"):
            channels_first = True
            image = image.detach().cpu()
            if str(image.dtype) in ("torch.bfloat16", "torch.float16"):
                image = image.float()
            image = image.numpy()
        if isinstance(image, np.ndarray):
            image = _array_to_pil(image, channels_first)
        else:
            raise ValueError(
                f"Unsupported image type {type(image).__name__}: expected a PIL image, a NumPy array, a torch tensor, "
                "a file path, a URL or bytes."
            )

    if image.width == 0 or image.height == 0:
        raise ValueError(f"Empty image (size {image.size}).")
    mode = image.mode
    bg = tuple(int(c) for c in background)
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(image)
        if mode == "F":
            return _array_to_pil(arr.astype(np.float32), False).convert("RGB")
        arr = arr.astype(np.int64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = np.rint(np.clip(arr, 0, 65535) / 257.0)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, bg + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"Cannot convert a PIL image of mode {mode!r} to RGB: {err}") from None


def _flatten_images(images) -> list:
    """Single image, list, or nested list (one list per text row) -> flat list."""
    if isinstance(images, (list, tuple)):
        out = []
        for item in images:
            out.extend(_flatten_images(item))
        return out
    if type(images).__module__.startswith("torch") or isinstance(images, np.ndarray):
        if images.ndim == 4:
            return [images[i] for i in range(images.shape[0])]
    return [images]


class VLoRAImageProcessor(CLIPImageProcessorPil):
    r"""CLIP/SigLIP image processor (PIL backend) with the VLoRA release's ``pad`` mode.

    Defaults are CLIP ViT-L/14-336's (``size={"shortest_edge": 336}``, ``crop_size=336``, OpenAI mean/std,
    bicubic); build one from a tower's ``preprocessor_config.json`` with :meth:`from_tower_preprocessor`.
    """

    valid_kwargs = VLoRAImageProcessorKwargs
    model_input_names = ["pixel_values"]
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}
    image_aspect_ratio = "pad"

    def __init__(self, **kwargs):
        aspect = kwargs.get("image_aspect_ratio")
        if aspect is not None and aspect not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {aspect!r}")
        super().__init__(**kwargs)

    @classmethod
    def from_tower_preprocessor(cls, config_or_path, image_aspect_ratio: str = "pad", **overrides):
        """Build from a vision tower's ``preprocessor_config.json`` (a dict, the file, or its folder)."""
        import json

        cfg = config_or_path
        if isinstance(cfg, (str, os.PathLike)):
            path = os.fspath(cfg)
            if os.path.isdir(path):
                path = os.path.join(path, "preprocessor_config.json")
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        cfg = dict(cfg)
        proc_type = str(cfg.get("image_processor_type", ""))
        keep = set(cls.valid_kwargs.__annotations__) | {"size", "crop_size"}
        kwargs = {k: v for k, v in cfg.items() if k in keep}
        if "siglip" in proc_type.lower():
            kwargs.setdefault("do_center_crop", False)
            kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
            kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        kwargs["image_aspect_ratio"] = image_aspect_ratio
        kwargs.update(overrides)
        return cls(**kwargs)

    def load_image(self, source):
        """Decode a path, URL or bytes into a PIL image (clear ``ValueError`` on corrupt files and
        decompression bombs); PIL images, arrays and tensors are returned unchanged."""
        if isinstance(source, (str, os.PathLike)):
            s = str(source)
            if s.startswith(("http://", "https://", "data:image/")):
                from transformers.image_utils import load_image

                return load_image(s)
            return open_image_file(source)
        if isinstance(source, (bytes, bytearray, memoryview)):
            return open_image_file(source, what="<bytes>")
        return source

    def fetch_images(self, image_url_or_urls):
        # Paths/URLs/bytes are decoded in `preprocess` with clear errors; leave everything as is here.
        return image_url_or_urls

    def prepare_images(self, images, image_mean=None, image_aspect_ratio=None) -> list[Image.Image]:
        """Decode/convert every image to RGB PIL and apply the aspect-ratio mode (no resizing yet)."""
        image_mean = self.image_mean if image_mean is None else image_mean
        image_aspect_ratio = self.image_aspect_ratio if image_aspect_ratio is None else image_aspect_ratio
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {image_aspect_ratio!r}")
        background = _mean_color(image_mean)
        flat = _flatten_images(images)
        if len(flat) == 0:
            raise ValueError("No images were given to the image processor.")
        out = []
        for index, image in enumerate(flat):
            if image is None:
                raise ValueError(f"Image {index} is None.")
            pil = to_rgb_pil(image, background=background)
            if image_aspect_ratio == "pad":
                pil = expand2square(pil, background)
            out.append(pil)
        return out

    def preprocess(self, images, *args, **kwargs):
        image_mean = kwargs.get("image_mean")
        aspect = kwargs.pop("image_aspect_ratio", None)
        pil_images = self.prepare_images(images, image_mean=image_mean, image_aspect_ratio=aspect)
        kwargs["image_aspect_ratio"] = aspect if aspect is not None else self.image_aspect_ratio
        kwargs.pop("input_data_format", None)
        kwargs["do_convert_rgb"] = False  # already RGB
        return super().preprocess(pil_images, *args, **kwargs)

    def process_image(self, image, *args, image_aspect_ratio=None, **kwargs):
        # Images arrive here already converted (see `preprocess`); the base class turns them into CHW arrays.
        return super().process_image(image, *args, **kwargs)


__all__ = ["VLoRAImageProcessor", "expand2square", "to_rgb_pil", "open_image_file", "IMAGE_ASPECT_RATIOS"]

# Saving writes an auto_map entry and copies this file, so AutoImageProcessor can load it as remote code.
VLoRAImageProcessor.register_for_auto_class("AutoImageProcessor")
