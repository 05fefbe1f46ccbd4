"""Image decoding for VLoRA: every source (file path, URL, ``data:`` URL, bytes, file object, PIL image, NumPy
array, torch tensor) goes through one decode path, :func:`load_image`, and :func:`to_rgb_pil` makes it 8-bit RGB.

- EXIF orientation is applied for every source (the image is read upright, as a viewer shows it);
- transparency is composited over a background (the processor passes its mean colour); L/LA/P/CMYK/I;16/I/F
  become 8-bit RGB;
- arrays and tensors (HW, HWC or CHW) are read by dtype: ``uint8`` 0-255, ``uint16`` 0-65535, other integers
  0-255, ``bool`` 0-1, floats 0-1; ``array_range=(low, high)`` says otherwise (e.g. ``(-1, 1)``, ``(0, 255)``).
  A value outside the range is an error naming the range found, never a silent rescale or clip;
- remote URLs are fetched with a timeout, a size cap (:data:`MAX_FETCH_BYTES`) and at most
  :data:`MAX_REDIRECTS` checked redirects; ``allow_remote=False`` or the environment variable
  ``VLORA_HF_REMOTE_IMAGES=0`` refuses them (for servers, see :func:`remote_images_allowed`);
- decoding is bounded by Pillow's ``Image.MAX_IMAGE_PIXELS``.

Every problem raises :class:`ImageInputError` (a ``ValueError``) naming the image and the problem.
This file imports only third-party libraries, so it ships flat as remote code beside ``image_processing_vlora.py``.
"""

from __future__ import annotations

import base64
import io
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REMOTE_IMAGES_ENV = "VLORA_HF_REMOTE_IMAGES"
FETCH_TIMEOUT = 10.0  # seconds for a whole URL fetch
MAX_FETCH_BYTES = 32 * 2**20
MAX_REDIRECTS = 3
_EXIF_ORIENTATION = 0x0112


class ImageInputError(ValueError):
    """An image that cannot be read as given (the message names the image and the problem)."""


def remote_images_allowed(allow: bool | None = None) -> bool:
    """Whether http(s) image URLs may be fetched: never when ``allow`` is False or the environment sets
    ``VLORA_HF_REMOTE_IMAGES=0`` (also "false", "no", "off"); the environment wins over ``allow=True``,
    so a server can turn fetching off for every processor it builds."""
    refused = os.environ.get(REMOTE_IMAGES_ENV, "1").strip().lower() in ("0", "false", "no", "off")
    return not refused and allow is not False


# ----- fetching ------------------------------------------------------------------------------------------------
class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 3xx surfaces as an HTTPError: `fetch_url` follows it after checking the target


def _read_capped(response, url: str, max_bytes: int, deadline: float) -> bytes:
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise ImageInputError(f"Image URL {url!r} announces {int(length)} bytes, more than the {max_bytes}-byte limit.")
    chunks, total = [], 0
    while chunk := response.read1(1 << 16):
        total += len(chunk)
        if total > max_bytes:
            raise ImageInputError(f"Image URL {url!r} sent more than the {max_bytes}-byte limit.")
        if time.monotonic() > deadline:
            raise TimeoutError
        chunks.append(chunk)
    return b"".join(chunks)


def fetch_url(url: str, *, timeout: float | None = None, max_bytes: int | None = None,
              allow_remote: bool | None = None) -> bytes:
    """GET an http(s) image URL within ``timeout`` seconds in all and ``max_bytes``, following at most
    :data:`MAX_REDIRECTS` redirects, each to an http(s) URL and never from https down to http. Every failure is an
    :class:`ImageInputError` naming the URL; a refused fetch (see :func:`remote_images_allowed`) sends nothing."""
    if not remote_images_allowed(allow_remote):
        raise ImageInputError(
            f"Refusing to fetch image URL {url!r}: remote images are turned off (allow_remote_images=False or "
            f"{REMOTE_IMAGES_ENV}=0). Pass the image as a file, bytes or an array instead."
        )
    timeout = FETCH_TIMEOUT if timeout is None else float(timeout)
    max_bytes = MAX_FETCH_BYTES if max_bytes is None else int(max_bytes)
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_NoRedirects)
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(current)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageInputError(f"Image URL {url!r} leads to {current!r}, which is not an http(s) URL.")
        try:
            request = urllib.request.Request(current, headers={"User-Agent": "vlora-hf"})
            with opener.open(request, timeout=max(deadline - time.monotonic(), 0.001)) as response:
                return _read_capped(response, url, max_bytes, deadline)
        except urllib.error.HTTPError as err:
            err.close()
            location = err.headers.get("Location") if err.code in (301, 302, 303, 307, 308) else None
            if not location:
                raise ImageInputError(f"Could not fetch image URL {url!r}: HTTP {err.code} {err.reason}.") from None
            target = urllib.parse.urljoin(current, location)
            if parts.scheme == "https" and target.lower().startswith("http:"):
                raise ImageInputError(f"Image URL {url!r} redirects from https down to http ({target!r}).") from None
            current = target
        except (TimeoutError, urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError) or isinstance(err, TimeoutError):
                raise ImageInputError(f"Fetching image URL {url!r} timed out after {timeout:g} s.") from None
            raise ImageInputError(f"Could not fetch image URL {url!r}: {reason}.") from None
    raise ImageInputError(f"Image URL {url!r} redirects more than {MAX_REDIRECTS} times.")


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageInputError(f"Malformed data URL {url[:40]!r}...: no ',' before the data.")
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        return urllib.parse.unquote_to_bytes(payload)
    except ValueError as err:
        raise ImageInputError(f"Malformed data URL {url[:40]!r}...: {err}.") from None


# ----- decoding ------------------------------------------------------------------------------------------------
def open_image_file(source, *, what: str | None = None) -> Image.Image:
    """Open and fully decode an image from a path, bytes or a file object, with clear errors."""
    name = what or (str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ImageInputError(f"Image file not found: {name!r}")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both as the same guard.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageInputError(
            f"Image {name!r} is too large to decode safely (Pillow's decompression-bomb guard, "
            f"Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {err}. Raise PIL.Image.MAX_IMAGE_PIXELS if the "
            "image is trusted."
        ) from None
    except UnidentifiedImageError as err:
        raise ImageInputError(f"Could not read image {name!r}: not a recognised image format ({err}).") from None
    except (OSError, SyntaxError, EOFError, ValueError) as err:
        raise ImageInputError(f"Could not decode image {name!r}: the file is truncated or corrupt ({err}).") from None
    return image


def _default_range(dtype: np.dtype) -> tuple[float, float]:
    if dtype == np.bool_:
        return 0.0, 1.0
    if dtype.kind == "u" and dtype.itemsize == 2:
        return 0.0, 65535.0
    if dtype.kind in "iu":
        return 0.0, 255.0
    if dtype.kind == "f":
        return 0.0, 1.0
    raise ImageInputError(f"Image arrays of dtype {dtype} are not supported: give integers, bool or real floats.")


def _to_uint8(arr: np.ndarray, array_range=None) -> np.ndarray:
    """Map ``array_range`` (default: by dtype) onto 0-255; values outside it are an error naming both ranges."""
    if array_range is None:
        low, high = _default_range(arr.dtype)
        expected = f"{arr.dtype} images"
    else:
        _default_range(arr.dtype)  # the dtype must be a real number type either way
        low, high = (float(x) for x in array_range)
        if not (np.isfinite([low, high]).all() and low < high):
            raise ImageInputError(f"array_range={tuple(array_range)} must be two finite numbers, low < high.")
        expected = f"array_range=({low:g}, {high:g})"
    if arr.dtype == np.uint8 and (low, high) == (0.0, 255.0):
        return arr
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageInputError("Image array contains NaN or infinite values.")
    found_low, found_high = float(values.min()), float(values.max())
    if found_low < low or found_high > high:
        raise ImageInputError(
            f"Image array values span [{found_low:g}, {found_high:g}], outside the range [{low:g}, {high:g}] "
            f"expected for {expected}. Pass array_range=(low, high) to say how to read them, e.g. (0, 255) for "
            "floats in 0-255 or (-1, 1) for normalised values."
        )
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _array_to_pil(array: np.ndarray, channels_first_hint: bool, array_range=None) -> Image.Image:
    """HW / HWC / CHW array (any real dtype) -> PIL image (L, LA, RGB or RGBA, 8 bit)."""
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
            raise ImageInputError(
                f"Cannot interpret an image array of shape {tuple(arr.shape)}: expected HW, HWC or CHW with 1-4 "
                "channels."
            )
        if chw:
            arr = np.moveaxis(arr, 0, -1)
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    elif arr.ndim != 2:
        raise ImageInputError(
            f"Cannot interpret an image array of shape {tuple(arr.shape)}: expected HW, HWC or CHW (one image)."
        )
    if arr.size == 0 or min(arr.shape[:2]) == 0:
        raise ImageInputError(f"Empty image (shape {tuple(np.asarray(array).shape)}).")
    arr = _to_uint8(arr, array_range)
    mode = "L" if arr.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def _tensor_to_numpy(tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) in ("torch.bfloat16", "torch.float16"):
        tensor = tensor.float()
    return tensor.numpy()


def load_image(source: Any, *, allow_remote: bool | None = None, timeout: float | None = None,
               array_range=None) -> Image.Image:
    """The one decode path for every image source -> a PIL image in its own mode, upright.

    ``source``: a PIL image, a file path, an http(s) URL (see :func:`fetch_url`), a ``data:`` URL, bytes, a
    binary file object, a NumPy array or a torch tensor (read as described in the module docstring). EXIF
    orientation is applied whatever the source, so a file, its bytes, its URL and ``Image.open(file)`` give the
    same pixels.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        scheme = text[:8].lower() if isinstance(text, str) else ""
        if scheme.startswith(("http://", "https://")):
            image = open_image_file(fetch_url(text, timeout=timeout, allow_remote=allow_remote), what=text)
        elif scheme.startswith("data:"):
            image = open_image_file(_data_url_bytes(text), what=f"{text[:40]}...")
        else:
            image = open_image_file(source)
    elif isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read"):
        image = open_image_file(source, what="<bytes>")
    elif type(source).__module__.startswith("torch"):
        image = _array_to_pil(_tensor_to_numpy(source), True, array_range)
    elif isinstance(source, np.ndarray):
        image = _array_to_pil(source, False, array_range)
    else:
        raise ImageInputError(
            f"Unsupported image type {type(source).__name__}: expected a PIL image, a NumPy array, a torch tensor, "
            "a file path, a URL or bytes."
        )
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"Empty image (size {image.size}).")
    if image.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):
        image = ImageOps.exif_transpose(image)
    return image


def to_rgb_pil(image: Any, background=(0, 0, 0), array_range=None, **load_kwargs) -> Image.Image:
    """Any supported image input -> 8-bit RGB PIL image; transparency composited over ``background``.

    PIL ``I;16`` and ``I`` images are read as 16-bit (0-65535) and ``F`` images as floats (0-1) unless
    ``array_range`` says otherwise.
    """
    image = load_image(image, array_range=array_range, **load_kwargs)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(image)
        if mode != "F" and array_range is None:
            array_range = (0, 65535)
        return Image.fromarray(_to_uint8(arr, array_range), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(int(c) for c in background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageInputError(f"Cannot convert a PIL image of mode {mode!r} to RGB: {err}") from None


def flatten_images(images) -> list:
    """Single image, list, or nested list (one list per text row) -> flat list."""
    if isinstance(images, (list, tuple)):
        out = []
        for item in images:
            out.extend(flatten_images(item))
        return out
    if type(images).__module__.startswith("torch") or isinstance(images, np.ndarray):
        if images.ndim == 4:
            return [images[i] for i in range(images.shape[0])]
    return [images]


__all__ = [
    "ImageInputError", "load_image", "to_rgb_pil", "open_image_file", "fetch_url", "remote_images_allowed",
    "flatten_images", "REMOTE_IMAGES_ENV", "FETCH_TIMEOUT", "MAX_FETCH_BYTES", "MAX_REDIRECTS",
]
