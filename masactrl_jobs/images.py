"""Image intake: decide whether uploaded or fetched bytes are an image the service will accept.

The order of checks is the point: byte size first, then the type from the file's magic bytes (never
a name or a declared content type), then the dimensions from the header *before* any pixel is
decoded (a 30000×30000 PNG is a few kilobytes on disk and gigabytes in memory), then a full decode
to prove the file is complete. EXIF orientation is applied so that the engine sees what a viewer
shows; only then are the bytes re-encoded, otherwise the original bytes are kept.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import struct
import warnings
from dataclasses import dataclass
from typing import IO, Literal

from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

__all__ = [
    "MIN_IMAGE_SIDE",
    "InvalidImage",
    "Payload",
    "payload_sha256",
    "payload_size",
    "StoredInput",
    "ValidatedImage",
    "too_large_message",
    "decode_data_url",
    "sniff_image_type",
    "validate_image",
    "validate_mask",
]

ImageExt = Literal["png", "jpg", "webp"]
# An input's bytes: in memory, or a seekable binary file (an upload or a fetched body spooled to
# a temporary file), so that a large input is checked and stored without a copy in memory.
Payload = bytes | IO[bytes]
_CHUNK = 1024 * 1024

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}

# Opening a plugin class directly reads the header only and, unlike Image.open, skips Pillow's
# process-wide decompression-bomb check, so we can report the real size against our own limit
# without touching the global Image.MAX_IMAGE_PIXELS.
_PLUGINS: dict[str, type[ImageFile.ImageFile]] = {
    "png": PngImagePlugin.PngImageFile,
    "jpg": JpegImagePlugin.JpegImageFile,
    "webp": WebPImagePlugin.WebPImageFile,
}
_SAVE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WebP"}
# The smallest side accepted: the VAE encodes 8×8 pixels into one latent, so anything smaller has
# no content to edit (it would only be upscaled noise).
MIN_IMAGE_SIDE = 8
_ORIENTATION_TAG = 0x0112

# Magic bytes of formats we refuse, so the error can say what the file is.
_OTHER_FORMATS = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
)


class InvalidImage(ValueError):
    """The bytes are not an acceptable image; the message is a sentence for the API user."""


def payload_size(data: Payload) -> int:
    """The number of bytes of ``data`` (a file: from its start to its end)."""
    if isinstance(data, bytes):
        return len(data)
    return data.seek(0, os.SEEK_END)


def _head(data: Payload, size: int) -> bytes:
    if isinstance(data, bytes):
        return data[:size]
    data.seek(0)
    return data.read(size)


def _tail(data: Payload, size: int) -> bytes:
    if isinstance(data, bytes):
        return data[-size:]
    end = data.seek(0, os.SEEK_END)
    data.seek(max(0, end - size))
    return data.read(size)


def payload_sha256(data: Payload) -> str:
    """The hex SHA-256 of ``data``, read a chunk at a time from a file."""
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    data.seek(0)
    while chunk := data.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ValidatedImage:
    """An image ready to store: ``data`` is what goes to storage (bytes, or the spooled file
    it was checked in), ``sha256`` is its digest."""

    data: Payload
    ext: ImageExt
    content_type: str
    sha256: str
    width: int
    height: int
    reoriented: bool = False

    @property
    def key(self) -> str:
        """The content-addressed storage key, ``inputs/<sha256>.<ext>``."""
        return f"inputs/{self.sha256}.{self.ext}"


@dataclass(frozen=True)
class StoredInput:
    """A checked input that is not an image (a sequence's video), content-addressed like images.

    ``sha256`` is the digest of ``data`` when the caller computed it on the way in (a file is
    then not read again for it).
    """

    data: Payload
    ext: str
    content_type: str = "application/octet-stream"
    sha256: str | None = None

    @property
    def key(self) -> str:
        """``inputs/<sha256>.<ext>``."""
        return f"inputs/{self.sha256 or payload_sha256(self.data)}.{self.ext}"


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f}".rstrip("0").rstrip(".") + " MiB"


def too_large_message(what: str, size: int, limit: int, about: bool = False) -> str:
    """The sentence "<what> is <size>; the limit is <limit>", exact to the byte where needed."""
    shown, most = _megabytes(size), _megabytes(limit)
    if shown == most:
        shown, most = f"{size} bytes", f"{limit} bytes ({most})"
    return f"{what} is {'about ' if about else ''}{shown}; the limit is {most}"


def sniff_image_type(data: bytes) -> ImageExt | None:
    """``"png"``, ``"jpg"`` or ``"webp"`` from the magic bytes, or None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _unsupported(data: bytes, what: str) -> InvalidImage:
    head = data.lstrip()
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            return InvalidImage(f"{what} is a {name} file; only PNG, JPEG and WebP are accepted")
    return InvalidImage(f"{what} is not a PNG, JPEG or WebP image")


def validate_image(
    data: Payload,
    *,
    max_bytes: int,
    max_side: int,
    what: str = "image",
    sha256: str | None = None,
) -> ValidatedImage:
    """Check ``data`` and return it ready to store, or raise :class:`InvalidImage`.

    ``data`` may be a seekable file: it is decoded from the file, never copied into memory, and
    the result keeps the file as its ``data``. ``sha256`` is its digest when the caller hashed it
    on the way in. ``what`` names the input in error messages ("image", "mask", ...).
    """
    size = payload_size(data)
    if not size:
        raise InvalidImage(f"{what} is empty")
    if size > max_bytes:
        raise InvalidImage(too_large_message(what, size, max_bytes))
    head = _head(data, 16)
    ext = sniff_image_type(head)
    if ext is None:
        raise _unsupported(head, what)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd metadata; we judge pixels
            if not isinstance(data, bytes):
                data.seek(0)
            image = _PLUGINS[ext](io.BytesIO(data) if isinstance(data, bytes) else data)
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as exc:
        raise InvalidImage(f"{what} is not a readable {_SAVE_FORMATS[ext]} file ({exc})") from None

    with image:
        width, height = image.size
        if width > max_side or height > max_side:
            raise InvalidImage(
                f"{what} is {width}×{height} pixels; the limit is {max_side}×{max_side}"
            )
        if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
            raise InvalidImage(
                f"{what} is {width}×{height} pixels; the minimum is "
                f"{MIN_IMAGE_SIDE}×{MIN_IMAGE_SIDE}"
            )
        if getattr(image, "is_animated", False):
            raise InvalidImage(f"{what} is animated; send a single still image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image.load()
        except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as exc:
            raise InvalidImage(f"{what} is truncated or corrupt ({exc})") from None
        # Pillow may be configured process-wide to accept truncated files; we never do.
        if ImageFile.LOAD_TRUNCATED_IMAGES and _looks_truncated(ext, _tail(data, 4096)):
            raise InvalidImage(f"{what} is truncated or corrupt")

        orientation = _orientation(image)
        stored: Payload
        if orientation in (None, 1):
            stored = data
            reoriented = False
        else:
            stored, width, height = _reencode_upright(image, ext, what)
            reoriented = True
            sha256 = None  # the digest of other bytes

    return ValidatedImage(
        data=stored,
        ext=ext,
        content_type=CONTENT_TYPES[ext],
        sha256=sha256 or payload_sha256(stored),
        width=width,
        height=height,
        reoriented=reoriented,
    )


def validate_mask(data: Payload, *, max_bytes: int, max_side: int) -> ValidatedImage:
    """Validate a mask image; masks go through exactly the image checks."""
    return validate_image(data, max_bytes=max_bytes, max_side=max_side, what="mask")


def _looks_truncated(ext: str, data: bytes) -> bool:
    tail = data.rstrip(b"\x00")[-12:]
    if ext == "jpg":
        return not tail.endswith(b"\xff\xd9")
    if ext == "png":
        return b"IEND" not in tail
    return False


def _orientation(image: Image.Image) -> int | None:
    try:
        value = image.getexif().get(_ORIENTATION_TAG)
    except Exception:  # broken EXIF blocks are common in the wild; treat as "no orientation"
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def _reencode_upright(image: Image.Image, ext: str, what: str) -> tuple[bytes, int, int]:
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise InvalidImage(f"{what} has EXIF orientation that cannot be applied ({exc})") from None
    assert upright is not None  # not in_place, so a new image is always returned
    buffer = io.BytesIO()
    save_options: dict[str, object] = {}
    if ext == "jpg":
        # High quality and the original chroma subsampling: the rotation should not be visible.
        sampling = JpegImagePlugin.get_sampling(image)
        save_options = {"quality": 95, "subsampling": sampling if sampling >= 0 else 0}
        if upright.mode not in ("RGB", "L", "CMYK"):
            upright = upright.convert("RGB")
    elif ext == "webp":
        save_options = {"quality": 95, "method": 4}
    elif ext == "png":
        save_options = {"optimize": False}
    # EXIF (camera, GPS) is deliberately not carried over: the upright pixels are what we keep.
    try:
        upright.save(buffer, format=_SAVE_FORMATS[ext], **save_options)
    except (OSError, ValueError) as exc:
        raise InvalidImage(f"{what} could not be re-encoded after rotation ({exc})") from None
    return buffer.getvalue(), upright.width, upright.height


_DATA_URL = re.compile(
    r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I
)


def decode_data_url(url: str, *, max_bytes: int, what: str = "image") -> bytes:
    """The bytes of a ``data:[<type>];base64,<payload>`` URL, refusing payloads over ``max_bytes``.

    The declared media type is ignored: :func:`validate_image` sniffs the content anyway.
    """
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise InvalidImage(f"{what} must be a base64 data URL (data:image/png;base64,...)")
    payload = url[match.end() :]
    # Reject by encoded length first so an oversized payload is never decoded into memory.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise InvalidImage(too_large_message(what, len(payload) * 3 // 4, max_bytes, about=True))
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"{what} data URL is not valid base64") from None
    if len(data) > max_bytes:
        raise InvalidImage(too_large_message(what, len(data), max_bytes))
    return data
