"""Images from OpenAI `image_url` parts: base64 data URLs, and http(s) URLs only when the server allows fetching."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from ..processing.image_loading_vlora import ImageInputError, fetch_url, load_image


@dataclass
class ImagePolicy:
    max_bytes: int = 20 << 20  # encoded size, before decoding
    allow_url_fetch: bool = False
    fetch_timeout_s: float = 10.0


def decode_data_url(url: str, policy: ImagePolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or ";base64" not in header:
        raise ImageInputError("an image data URL must look like 'data:image/png;base64,<base64 bytes>'")
    media_type = header[len("data:"):].split(";", 1)[0]
    if not media_type.startswith("image/"):
        raise ImageInputError(f"the data URL holds {media_type or 'no media type'!r}, not an image (image/png, "
                              "image/jpeg, ...)")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise ImageInputError(f"the image is larger than the server's cap of {policy.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageInputError(f"the image data URL is not valid base64: {err}") from None


def load_image_url(url, policy: ImagePolicy):
    """An `image_url` value -> a PIL image (upright, in its own mode: the image processor composites
    transparency as it does for every source), or ImageInputError. Decoding is the processor's `load_image`."""
    if not isinstance(url, str) or not url:
        raise ImageInputError("image_url.url must be a non-empty string")
    if url.startswith("data:"):
        data = decode_data_url(url, policy)
    elif url.startswith(("http://", "https://")):
        if not policy.allow_url_fetch:
            raise ImageInputError("remote image URLs are refused by this server: send the image as a base64 data URL "
                                  "(or start the server with --allow-url-fetch)")
        data = fetch_url(url, timeout=policy.fetch_timeout_s, max_bytes=policy.max_bytes, allow_remote=True)
    else:
        raise ImageInputError(f"unsupported image URL {url[:40]!r}: expected a base64 data URL (or http(s) with "
                              "--allow-url-fetch)")
    try:
        return load_image(data)
    except ValueError as err:
        raise ImageInputError(str(err)) from None
