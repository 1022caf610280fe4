"""Small encoded images for the intake tests of the shared library and the gateway."""

from __future__ import annotations

import base64
import io

from PIL import Image


def png_bytes(
    width: int = 64,
    height: int = 48,
    color: tuple[int, int, int] | int = (200, 30, 30),
    mode: str = "RGB",
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(width: int = 64, height: int = 32, orientation: int | None = None) -> bytes:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    # A marker in one corner so a test can tell which way the pixels were turned.
    image.paste((20, 220, 20), (0, 0, width // 4, height // 4))
    options: dict[str, object] = {"quality": 95}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def webp_bytes(width: int = 24, height: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 10, 200)).save(buffer, format="WEBP")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"
