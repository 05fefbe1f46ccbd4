"""Image processor for VLoRA: transformers' LLaVA image processor (PIL backend), whose square padding is the
release's, in front of the vision tower's own preprocessing.

``image_aspect_ratio="pad"`` (the release's default for VLoRA, ``do_pad=True``) pads every image to a square with
the mean colour (``tuple(int(x * 255) for x in image_mean)``), the image centred at ``((max - w) // 2,
(max - h) // 2)``: ``LlavaImageProcessorPil.pad_to_square``, pixel for pixel the release's ``expand2square``.
Then resize / centre crop / rescale / normalise run as for CLIP towers (the defaults) or SigLIP towers (pass
``size={"height": S, "width": S}``, ``do_center_crop=False``, mean/std 0.5). ``"square"`` (``do_pad=False``)
skips the padding.

Before that, every source is decoded by the sibling module ``image_loading_vlora`` (file path, URL, ``data:``
URL, bytes, file object, PIL image, NumPy array, torch tensor; EXIF orientation, transparency over the mean
colour, array ranges, the remote-URL policy), and a very large or very elongated image is shrunk so that no canvas
(padding, resizing) is larger than :data:`MAX_CANVAS_SIDE` squared pixels.

This file imports only its sibling and third-party libraries, so it ships flat as remote code.
"""

import json
import os

import numpy as np
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.processing_utils import ImagesKwargs

from .image_loading_vlora import ImageInputError, flatten_images, to_rgb_pil

IMAGE_ASPECT_RATIOS = ("pad", "square")
MAX_CANVAS_SIDE = 4096  # 4096 x 4096 RGB = 48 MiB: the largest canvas padding or resizing may allocate
PREPROCESSOR_CONFIG = "preprocessor_config.json"


class VLoRAImageProcessorKwargs(ImagesKwargs, total=False):
    """``image_aspect_ratio``: ``"pad"`` (square padding with the mean colour, the release's VLoRA setting; the
    same as ``do_pad=True``) or ``"square"`` (no padding: the tower's resize/centre crop only). ``array_range``:
    the (low, high) values of array/tensor images (default: by dtype). ``allow_remote_images``: False refuses
    http(s) URLs. ``image_fetch_timeout``: seconds for fetching one URL (default ``FETCH_TIMEOUT``)."""

    # transformers checks these types at run time; `array_range`'s values are checked by the decoder, with its errors
    image_aspect_ratio: str | None
    array_range: tuple | list | None
    allow_remote_images: bool | None
    image_fetch_timeout: float | int | None


def pad_mode(image_aspect_ratio: str | None = None, do_pad: bool | None = None) -> dict:
    """The two spellings of the padding switch made to agree: ``image_aspect_ratio`` (what saved configs carry)
    and ``do_pad`` (transformers' LLaVA name). Neither given -> ``{}``; both given and different -> an error."""
    if image_aspect_ratio is None:
        return {} if do_pad is None else {"image_aspect_ratio": "pad" if do_pad else "square", "do_pad": bool(do_pad)}
    if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {image_aspect_ratio!r}")
    padded = image_aspect_ratio == "pad"
    if do_pad is not None and bool(do_pad) != padded:
        raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r} and do_pad={do_pad} disagree: give one of them")
    return {"image_aspect_ratio": image_aspect_ratio, "do_pad": padded}


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """The release's ``expand2square`` (LLaVA ``mm_utils``), unchanged: the reference the processor's padding
    (``LlavaImageProcessorPil.pad_to_square``) is tested against, and a helper for callers padding PIL images."""
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


def fit_canvas(image: Image.Image, image_aspect_ratio: str, size) -> Image.Image:
    """Shrink (or, for a shortest-edge resize without padding, centre-crop) an image so that neither the square
    padding nor the tower's resize allocates more than ``MAX_CANVAS_SIDE`` squared pixels. Images within the
    bound are returned untouched, so their pixels stay exactly the release's."""
    shortest = size.get("shortest_edge") if size is not None else None
    width, height = image.size
    if image_aspect_ratio == "square" and shortest:
        max_ratio = MAX_CANVAS_SIDE / shortest  # the resize makes the long side `shortest * ratio`
        if max(width, height) > max_ratio * min(width, height):
            keep = max(1, int(min(width, height) * max_ratio))  # the centre crop keeps the middle anyway
            left, top = (width - keep) // 2 if width > height else 0, (height - keep) // 2 if height > width else 0
            image = image.crop((left, top, left + min(keep, width), top + min(keep, height)))
            width, height = image.size
    if max(width, height) > MAX_CANVAS_SIDE:
        scale = MAX_CANVAS_SIDE / max(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
    return image


class VLoRAImageProcessor(LlavaImageProcessorPil):
    r"""LLaVA image processor (PIL backend) with the VLoRA release's defaults and one decode path for every source.

    Defaults are CLIP ViT-L/14-336's (``size={"shortest_edge": 336}``, ``crop_size=336``, OpenAI mean/std,
    bicubic) with ``image_aspect_ratio="pad"``; build one for a tower with :meth:`from_vision_config`.
    ``allow_remote_images=False`` (here or per call) refuses http(s) image URLs; ``array_range`` and
    ``image_fetch_timeout`` are described in :class:`VLoRAImageProcessorKwargs`.
    """

    valid_kwargs = VLoRAImageProcessorKwargs
    model_input_names = ["pixel_values"]
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}
    do_pad = True
    image_aspect_ratio = "pad"
    array_range = None
    allow_remote_images = None
    image_fetch_timeout = None

    def __init__(self, **kwargs):
        kwargs.update(pad_mode(kwargs.pop("image_aspect_ratio", None), kwargs.pop("do_pad", None)))
        super().__init__(**kwargs)

    @classmethod
    def from_vision_config(cls, vision_config, tower=None, **overrides):
        """The image processor for a vision tower: the tower's own ``preprocessor_config.json`` when the folder
        ``tower`` holds one, else square inputs of ``vision_config.image_size`` (shortest-edge resize, centre
        crop). ``overrides`` (``image_aspect_ratio``, ``image_mean``, ...) win over either."""
        if tower is not None and os.path.isfile(os.path.join(os.fspath(tower), PREPROCESSOR_CONFIG)):
            return cls.from_tower_preprocessor(tower, **overrides)
        side = vision_config.image_size
        return cls(**{"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}, **overrides})

    @classmethod
    def from_tower_preprocessor(cls, config_or_path, image_aspect_ratio: str | None = None, **overrides):
        """Build from a vision tower's ``preprocessor_config.json`` (a dict, the file, or its folder); the padding
        is ``image_aspect_ratio`` (or ``do_pad``), default ``"pad"``, whatever the file says."""
        cfg = config_or_path
        if isinstance(cfg, (str, os.PathLike)):
            path = os.fspath(cfg)
            if os.path.isdir(path):
                path = os.path.join(path, PREPROCESSOR_CONFIG)
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        keep = (set(cls.valid_kwargs.__annotations__) | {"size", "crop_size"}) - {"image_aspect_ratio", "do_pad"}
        kwargs = {k: v for k, v in dict(cfg).items() if k in keep}
        if "siglip" in str(cfg.get("image_processor_type", "")).lower():
            kwargs.setdefault("do_center_crop", False)
            kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
            kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        return cls(**{**kwargs, "image_aspect_ratio": image_aspect_ratio, **overrides})

    @classmethod
    def from_dict(cls, image_processor_dict, **kwargs):
        # A load-time `image_aspect_ratio` or `do_pad` replaces the saved padding switch (both spellings of it).
        if kwargs.get("image_aspect_ratio") is not None or kwargs.get("do_pad") is not None:
            image_processor_dict = {k: v for k, v in image_processor_dict.items()
                                    if k not in ("image_aspect_ratio", "do_pad")}
        return super().from_dict(image_processor_dict, **kwargs)

    def _standardize_kwargs(self, image_mean=None, **kwargs) -> dict:
        # One mean per RGB channel: the padding colour needs three (a scalar or a one-item mean is the same for each).
        if image_mean is not None and np.size(image_mean) == 1:
            image_mean = (float(np.ravel(image_mean)[0]),) * 3
        return super()._standardize_kwargs(image_mean=image_mean, **kwargs)

    def fetch_images(self, image_url_or_urls):
        # Paths/URLs/bytes are decoded in `_prepare_image_like_inputs`, through `load_image`: leave them as they are.
        return image_url_or_urls

    def preprocess(self, images, *args, **kwargs):
        kwargs.update(pad_mode(kwargs.pop("image_aspect_ratio", None), kwargs.pop("do_pad", None)))
        return super().preprocess(images, *args, **kwargs)

    def _prepare_image_like_inputs(self, images, *args, expected_ndims: int = 3, **kwargs):
        """Decode every image to RGB PIL (transparency over the mean colour), bound its canvas, then let the backend
        turn it into a CHW array; the padding, resize and the rest follow in ``_preprocess``."""
        mean = kwargs["image_mean"]
        background = tuple(int(x * 255) for x in mean) if mean else (0, 0, 0)  # the padding colour (see `_preprocess`)
        flat = flatten_images(images)
        if len(flat) == 0:
            raise ImageInputError("No images were given to the image processor.")
        decoded = []
        for index, image in enumerate(flat):
            if image is None:
                raise ImageInputError(f"Image {index} is None.")
            rgb = to_rgb_pil(image, background=background, array_range=kwargs["array_range"],
                             allow_remote=kwargs["allow_remote_images"], timeout=kwargs["image_fetch_timeout"])
            decoded.append(fit_canvas(rgb, kwargs["image_aspect_ratio"], kwargs["size"]))
        kwargs["do_convert_rgb"] = False  # already RGB
        return super()._prepare_image_like_inputs(decoded, *args, expected_ndims=expected_ndims, **kwargs)


__all__ = [
    "VLoRAImageProcessor", "VLoRAImageProcessorKwargs", "IMAGE_ASPECT_RATIOS", "MAX_CANVAS_SIDE", "expand2square",
    "fit_canvas", "pad_mode",
]

# Saving writes an auto_map entry and copies this file and its sibling, so AutoImageProcessor can load it as
# remote code.
VLoRAImageProcessor.register_for_auto_class("AutoImageProcessor")
