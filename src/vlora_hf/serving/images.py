"""Images from OpenAI `image_url` parts: base64 data URLs, and http(s) URLs only when the server allows fetching."""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..processing.image_processing_vlora import open_image_file


class ImageInputError(ValueError):
    """An image the server refuses; the message names the problem (it becomes a 400 answer)."""


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


def fetch_url(url: str, policy: ImagePolicy) -> bytes:
    """GET an http(s) image with the policy's timeout, reading at most `max_bytes` (more is refused)."""
    try:
        with urllib.request.urlopen(url, timeout=policy.fetch_timeout_s) as response:  # noqa: S310 - http(s) only
            data = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ImageInputError(f"could not fetch the image at {url!r}: {err}") from None
    if len(data) > policy.max_bytes:
        raise ImageInputError(f"the image at {url!r} is larger than the server's cap of {policy.max_bytes} bytes")
    return data


def load_image_url(url, policy: ImagePolicy):
    """An `image_url` value -> an RGB PIL image, or ImageInputError."""
    if not isinstance(url, str) or not url:
        raise ImageInputError("image_url.url must be a non-empty string")
    if url.startswith("data:"):
        data = decode_data_url(url, policy)
    elif url.startswith(("http://", "https://")):
        if not policy.allow_url_fetch:
            raise ImageInputError("remote image URLs are refused by this server: send the image as a base64 data URL "
                                  "(or start the server with --allow-url-fetch)")
        data = fetch_url(url, policy)
    else:
        raise ImageInputError(f"unsupported image URL {url[:40]!r}: expected a base64 data URL (or http(s) with "
                              "--allow-url-fetch)")
    try:
        return open_image_file(data, what="image_url").convert("RGB")
    except ValueError as err:
        raise ImageInputError(str(err)) from None
