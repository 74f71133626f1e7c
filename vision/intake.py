"""Image intake: raw bytes, base64 or a `data:` URL in; a decoded RGB PIL image out, or a typed error.

Every limit is checked before the expensive step it protects: the byte cap before base64 decoding,
the pixel cap from the header before any pixel is decoded (a 20000 x 20000 PNG is a few KB on the
wire and 1.2 GB in memory). Pillow's own bomb guard (89 Mpx warning, 179 Mpx error) is far too high
for a service, so we set ours. Animated images (GIF, APNG, animated WEBP) are served by their first
frame: that is what a user who sends a GIF to an image model expects, and it costs one frame.
A URL (any `scheme:` but `data:`) is refused unless the caller passes a fetcher (vision/fetch.py,
allow-listed remote fetch, off by default), which itself refuses every scheme but http(s).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
_URL_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)
_MIME_TO_FORMAT = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
                   "image/gif": "GIF"}


class ImageError(ValueError):
    """An image the service refuses; `code` is machine-readable, the message is for the user."""

    code = "invalid_image"


class EmptyImage(ImageError):
    code = "empty_image"


class ImageTooLarge(ImageError):
    code = "image_too_large"


class UnsupportedImageFormat(ImageError):
    code = "unsupported_image_format"


class CorruptImage(ImageError):
    code = "corrupt_image"


class BadImageEncoding(ImageError):
    code = "bad_image_encoding"


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000
    formats: tuple[str, ...] = ALLOWED_FORMATS
    background: tuple[int, int, int] = (255, 255, 255)  # what transparent pixels are composited onto

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("image limits must be positive")
        unknown = set(self.formats) - set(ALLOWED_FORMATS)
        if unknown:
            raise ValueError(f"unsupported image formats in settings: {sorted(unknown)}")


def _check_size(n_bytes: int, limits: IntakeLimits) -> None:
    if n_bytes == 0:
        raise EmptyImage("the image is empty (0 bytes)")
    if n_bytes > limits.max_bytes:
        raise ImageTooLarge(f"the image is {n_bytes} bytes; the limit is {limits.max_bytes} bytes")


def decode_base64(text: str, limits: IntakeLimits) -> bytes:
    text = text.strip()
    # base64 is 4/3 of the raw size, less the '=' padding: refuse an oversized payload before decoding it
    _check_size(len(text) * 3 // 4 - text[-2:].count("="), limits)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadImageEncoding(f"the image is not valid base64: {e}") from None


def bytes_from_data_url(url: str, limits: IntakeLimits) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise BadImageEncoding("a data URL must look like 'data:image/png;base64,<data>'")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise UnsupportedImageFormat(f"the data URL's media type is {mime!r}, not an image")
    if mime and mime not in _MIME_TO_FORMAT:
        raise UnsupportedImageFormat(f"media type {mime!r} is not supported; send PNG, JPEG, WEBP or GIF")
    payload = url[match.end():]
    if not match.group("b64"):
        raise BadImageEncoding("only base64 data URLs are supported (';base64,' is missing)")
    return decode_base64(payload, limits)


def open_image(data: bytes, limits: IntakeLimits) -> Image.Image:
    """Decode image bytes within the limits; returns an RGB image."""
    _check_size(len(data), limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except UnidentifiedImageError:
        raise UnsupportedImageFormat(
            f"the bytes are not an image in an accepted format ({', '.join(limits.formats)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own guard fired first (its message names the pixel count)
        raise ImageTooLarge(f"the image has too many pixels: {e}; the limit is {limits.max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImage(f"the image could not be read: {e}") from None
    width, height = image.size
    if width * height > limits.max_pixels:  # from the header, before any pixel is decoded
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; "
                            f"the limit is {limits.max_pixels} pixels")
    if width == 0 or height == 0:
        raise CorruptImage("the image has zero width or height")
    try:
        image.seek(0)  # first frame of an animation
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise CorruptImage(f"the image data is truncated or corrupt: {e}") from None
    return _to_rgb(image, limits.background)


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def source_bytes(source: str | bytes, limits: IntakeLimits,
                 fetch: Callable[[str], bytes] | None = None) -> bytes:
    """bytes, a `data:` URL, bare base64 or (only with `fetch`, see vision/fetch.py) an http(s) URL ->
    the image's raw encoded bytes, size-checked, not decoded: what the feature cache's key hashes."""
    if isinstance(source, (bytes, bytearray)):
        _check_size(len(source), limits)
        return bytes(source)
    if source[:5].lower() == "data:":
        return bytes_from_data_url(source, limits)
    if _URL_SCHEME.match(source):  # a scheme: ':' is not in the base64 alphabet
        if fetch is None:
            raise UnsupportedImageFormat("remote image URLs are disabled; send the image as a data: URL")
        data = fetch(source)  # which refuses every scheme but http(s), file: included
        _check_size(len(data), limits)
        return data
    return decode_base64(source, limits)


def load_image(source: str | bytes, limits: IntakeLimits, fetch: Callable[[str], bytes] | None = None) -> Image.Image:
    """bytes, a `data:` URL, bare base64 or (with `fetch`) an http(s) URL -> RGB image."""
    return open_image(source_bytes(source, limits, fetch), limits)
