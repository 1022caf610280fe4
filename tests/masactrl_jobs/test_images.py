"""Image intake: content sniffing, size and dimension limits, truncation, EXIF orientation."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import tempfile
import zlib

import pytest
from PIL import Image

from masactrl_jobs.images import (
    InvalidImage,
    decode_data_url,
    payload_sha256,
    payload_size,
    sniff_image_type,
    validate_image,
    validate_mask,
)
from tests.images import jpeg_bytes, png_bytes, webp_bytes

LIMITS = {"max_bytes": 20 * 1024 * 1024, "max_side": 4096}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking PNG that claims ``width``×``height`` but holds almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "ext", "content_type", "size"),
    [
        (png_bytes(32, 16), "png", "image/png", (32, 16)),
        (jpeg_bytes(64, 32), "jpg", "image/jpeg", (64, 32)),
        (webp_bytes(24, 24), "webp", "image/webp", (24, 24)),
    ],
)
def test_accepts_png_jpeg_webp(data: bytes, ext: str, content_type: str, size: tuple) -> None:
    image = validate_image(data, **LIMITS)
    assert (image.ext, image.content_type, (image.width, image.height)) == (ext, content_type, size)
    assert image.data == data  # nothing to fix, so the original bytes are kept
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    assert image.key == f"inputs/{image.sha256}.{ext}"
    assert not image.reoriented


def test_type_comes_from_content_not_name() -> None:
    # A PNG someone saved as photo.jpg and uploaded as image/jpeg is still a PNG.
    image = validate_image(png_bytes(), **LIMITS)
    assert image.ext == "png"
    assert image.key.endswith(".png")
    assert sniff_image_type(png_bytes()) == "png"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello, this is a text file\n", "image is not a PNG, JPEG or WebP image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "image is a SVG file"),
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00", "image is a GIF file"),
        (b"%PDF-1.7\n", "image is a PDF file"),
        (b"BM" + b"\0" * 40, "image is a BMP file"),
        (b"", "image is empty"),
    ],
)
def test_refuses_other_content(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImage, match=message):
        validate_image(data, **LIMITS)


def test_invalid_image_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate_image(b"nope", **LIMITS)


def test_refuses_oversize_bytes_before_looking_inside() -> None:
    with pytest.raises(InvalidImage, match=r"image is 2 MiB; the limit is 1 MiB"):
        validate_image(
            b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * 1024 * 1024 - 8),
            max_bytes=1024 * 1024,
            max_side=4096,
        )


def test_decompression_bomb_is_rejected_from_its_header() -> None:
    bomb = png_header_only(30000, 30000)
    assert len(bomb) < 200
    with pytest.raises(InvalidImage) as caught:
        validate_image(bomb, **LIMITS)
    assert str(caught.value) == "image is 30000×30000 pixels; the limit is 4096×4096"


def test_real_compressed_bomb_is_rejected() -> None:
    # 5000×5000 of one colour compresses to a few kilobytes.
    data = png_bytes(5000, 5000, mode="1")
    assert len(data) < 10_000
    with pytest.raises(InvalidImage, match="5000×5000 pixels; the limit is 4096×4096"):
        validate_image(data, **LIMITS)


def test_side_limit_is_per_side() -> None:
    with pytest.raises(InvalidImage, match="4100×10 pixels"):
        validate_image(png_header_only(4100, 10), **LIMITS)
    with pytest.raises(InvalidImage, match="10×4100 pixels; the limit is 4096×4096"):
        validate_image(png_header_only(10, 4100), **LIMITS)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_jpeg_is_rejected(fraction: float) -> None:
    data = jpeg_bytes(256, 256)
    with pytest.raises(InvalidImage, match="truncated|not a readable"):
        validate_image(data[: int(len(data) * fraction)], **LIMITS)


def test_truncated_jpeg_is_rejected_even_when_pillow_is_lenient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = jpeg_bytes(256, 256)
    with pytest.raises(InvalidImage, match="truncated"):
        validate_image(data[: len(data) - 100], **LIMITS)


def test_truncated_png_is_rejected() -> None:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.effect_noise((256, 256), 64).save(buffer, format="PNG")
    data = buffer.getvalue()
    with pytest.raises(InvalidImage, match="truncated|not a readable"):
        validate_image(data[: len(data) // 2], **LIMITS)


def test_png_with_a_bad_checksum_is_rejected() -> None:
    data = bytearray(png_bytes())
    data[29] ^= 0xFF  # inside the IHDR CRC
    with pytest.raises(InvalidImage):
        validate_image(bytes(data), **LIMITS)


def test_animated_images_are_refused() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidImage, match="animated"):
        validate_image(buffer.getvalue(), **LIMITS)


def test_exif_orientation_is_applied_and_reencoded() -> None:
    data = jpeg_bytes(64, 32, orientation=6)  # "rotate 90° clockwise to display"
    image = validate_image(data, **LIMITS)
    assert image.reoriented
    assert (image.width, image.height) == (32, 64)
    assert image.data != data
    assert image.sha256 == hashlib.sha256(image.data).hexdigest()
    assert image.key == f"inputs/{image.sha256}.jpg"
    stored = Image.open(io.BytesIO(image.data))
    assert stored.format == "JPEG"
    assert stored.size == (32, 64)
    assert stored.getexif().get(0x0112) in (None, 1)
    # The green marker was top-left; after a clockwise turn it is top-right.
    rgb = stored.convert("RGB")
    assert rgb.getpixel((28, 2))[1] > 150
    assert rgb.getpixel((2, 2))[0] > 150


def test_orientation_one_keeps_the_original_bytes() -> None:
    data = jpeg_bytes(16, 8, orientation=1)
    assert validate_image(data, **LIMITS).data == data


def test_same_content_same_key() -> None:
    data = png_bytes(20, 20)
    assert validate_image(data, **LIMITS).key == validate_image(bytes(data), **LIMITS).key


def test_masks_use_the_same_checks_with_their_own_name() -> None:
    assert validate_mask(png_bytes(8, 8, mode="L"), **LIMITS).ext == "png"
    with pytest.raises(InvalidImage, match="mask is 30000×30000 pixels"):
        validate_mask(png_header_only(30000, 30000), **LIMITS)
    with pytest.raises(InvalidImage, match="^mask is not a PNG"):
        validate_mask(b"text", **LIMITS)


def test_data_urls() -> None:
    data = png_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert decode_data_url(url, max_bytes=LIMITS["max_bytes"]) == data
    # The declared type is not trusted, only decoded; sniffing happens afterwards.
    assert decode_data_url(url.replace("image/png", "image/jpeg"), max_bytes=10**6) == data
    with pytest.raises(InvalidImage, match="base64 data URL"):
        decode_data_url("data:image/png,rawbytes", max_bytes=10**6)
    with pytest.raises(InvalidImage, match="not valid base64"):
        decode_data_url("data:image/png;base64,@@@@", max_bytes=10**6)
    with pytest.raises(InvalidImage, match="limit is"):
        decode_data_url("data:image/png;base64," + "A" * 4000, max_bytes=1000)


def test_a_spooled_file_is_validated_in_place_like_its_bytes() -> None:
    data = png_bytes(32, 16)
    with tempfile.SpooledTemporaryFile(max_size=8) as file:  # rolled over to disk at once
        file.write(data)
        image = validate_image(file, **LIMITS)
        from_bytes = validate_image(data, **LIMITS)
        # The file itself is what gets stored: no copy of its bytes was made.
        assert image.data is file
        assert (image.sha256, image.key, image.width, image.height) == (
            from_bytes.sha256,
            from_bytes.key,
            32,
            16,
        )
        # A digest taken on the way in is trusted rather than computed again.
        assert validate_image(file, **LIMITS, sha256="f" * 64).sha256 == "f" * 64
        assert payload_size(file) == len(data) and payload_sha256(file) == from_bytes.sha256


def test_a_truncated_file_is_refused_like_truncated_bytes() -> None:
    data = png_bytes(64, 64)
    with tempfile.TemporaryFile() as file:
        file.write(data[: len(data) // 2])
        with pytest.raises(InvalidImage, match="truncated|corrupt|readable"):
            validate_image(file, **LIMITS)
