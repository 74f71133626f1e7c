"""Tests of vision/intake.py: decoding, the three source forms, limits and typed errors (real Pillow, no mocks)."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image, PngImagePlugin

from vision.intake import (BadImageEncoding, CorruptImage, EmptyImage, ImageError, ImageTooLarge, IntakeLimits,
                           UnsupportedImageFormat, load_image)

LIMITS = IntakeLimits()


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def gradient(w: int = 40, h: int = 30) -> Image.Image:
    return Image.frombytes("RGB", (w, h), bytes((x * 6 % 256, y * 8 % 256, (x + y) % 256)[c]
                                                for y in range(h) for x in range(w) for c in range(3)))


# --- formats -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_still_formats_decode_to_rgb_of_the_right_size(fmt):
    out = load_image(encode(Image.new("RGB", (37, 21), (200, 40, 40)), fmt), LIMITS)
    assert out.mode == "RGB" and out.size == (37, 21)
    assert all(abs(a - b) <= 8 for a, b in zip(out.getpixel((18, 10)), (200, 40, 40)))  # JPEG/WEBP are lossy


def test_animated_gif_gives_its_first_frame_as_rgb():
    frames = [Image.new("RGB", (12, 9), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3  # the fixture really is animated
    out = load_image(data, LIMITS)
    assert out.mode == "RGB" and out.size == (12, 9)
    assert out.getpixel((6, 4)) == (255, 0, 0)


# --- source forms ------------------------------------------------------------------------------------------------

def test_raw_bytes_bare_base64_and_data_url_give_identical_pixels():
    data = encode(gradient(), "PNG")
    images = [load_image(data, LIMITS), load_image(b64(data), LIMITS),
              load_image("data:image/png;base64," + b64(data), LIMITS)]
    assert images[0].size == (40, 30)
    assert images[0].tobytes() == gradient().tobytes()
    assert all(im.tobytes() == images[0].tobytes() for im in images[1:])


@pytest.mark.parametrize("pad", [0, 1, 2])  # text padding makes the PNG length hit every residue mod 3
def test_an_image_exactly_at_max_bytes_is_accepted_in_every_source_form(pad):
    info = PngImagePlugin.PngInfo()
    info.add_text("k", "x" * pad)
    data = encode(gradient(8, 8), "PNG", pnginfo=info)
    at_cap = IntakeLimits(max_bytes=len(data))
    for source in (data, b64(data), "data:image/png;base64," + b64(data)):
        assert load_image(source, at_cap).size == (8, 8)
    with pytest.raises(ImageTooLarge):
        load_image(b64(data), IntakeLimits(max_bytes=len(data) - 1))


# --- alpha and EXIF ----------------------------------------------------------------------------------------------

def test_transparent_area_is_composited_onto_the_configured_background():
    image = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (2, 0, 4, 2))  # right half opaque red, left half fully transparent
    out = load_image(encode(image, "PNG"), IntakeLimits(background=(10, 20, 30)))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (10, 20, 30)
    assert out.getpixel((3, 1)) == (255, 0, 0)


def test_exif_orientation_is_applied_to_a_non_square_jpeg():
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    out = load_image(encode(image, "JPEG", exif=exif, quality=95), LIMITS)
    assert out.size == (20, 60)
    assert min(out.getpixel((10, 3))) > 200  # the stored left edge is now the top
    assert out.getpixel((10, 55))[2] > 200 and out.getpixel((10, 55))[0] < 60


# --- refusals ----------------------------------------------------------------------------------------------------

def test_empty_bytes_raise_empty_image():
    with pytest.raises(EmptyImage) as e:
        load_image(b"", LIMITS)
    assert e.value.code == "empty_image"


def test_truncated_png_raises_corrupt_image():
    data = encode(gradient(64, 64), "PNG")
    with pytest.raises(CorruptImage) as e:  # the header parses; decoding the cut IDAT fails
        load_image(data[: len(data) // 2], LIMITS)
    assert str(e.value) and e.value.code == "corrupt_image"


def test_text_bytes_raise_unsupported_format():
    with pytest.raises(UnsupportedImageFormat) as e:
        load_image(b"hello, this is plainly not an image at all\n" * 3, LIMITS)
    assert e.value.code == "unsupported_image_format"


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_valid_image_outside_the_allow_list_is_unsupported(fmt):
    data = encode(gradient(8, 8), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself can read it
    with pytest.raises(UnsupportedImageFormat):
        load_image(data, LIMITS)


def test_format_allow_list_in_limits_is_honoured():
    with pytest.raises(UnsupportedImageFormat):
        load_image(encode(gradient(8, 8), "JPEG"), IntakeLimits(formats=("PNG",)))


def test_bytes_over_max_bytes_raise_too_large_naming_both_numbers():
    data = encode(gradient(), "PNG")
    with pytest.raises(ImageTooLarge) as e:
        load_image(data, IntakeLimits(max_bytes=100))
    assert str(len(data)) in str(e.value) and "100" in str(e.value)
    assert e.value.code == "image_too_large"


def test_invalid_base64_raises_bad_encoding():
    with pytest.raises(BadImageEncoding) as e:
        load_image("this is *not* base64!!", LIMITS)
    assert e.value.code == "bad_image_encoding"


def test_data_url_with_non_image_mime_is_unsupported():
    with pytest.raises(UnsupportedImageFormat):
        load_image("data:text/plain;base64," + b64(b"hello"), LIMITS)


def test_data_url_without_base64_marker_is_bad_encoding():
    with pytest.raises(BadImageEncoding):
        load_image("data:image/png," + b64(encode(gradient(8, 8), "PNG")), LIMITS)


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://example.com/cat.png", "file:///etc/passwd"])
def test_remote_and_file_urls_are_refused(url):
    with pytest.raises(ImageError) as e:
        load_image(url, LIMITS)
    assert type(e.value) is not ImageError and str(e.value)


def test_pixel_cap_names_both_numbers():
    with pytest.raises(ImageTooLarge) as e:
        load_image(encode(gradient(100, 100), "PNG"), IntakeLimits(max_pixels=5000))
    assert "10000" in str(e.value) and "5000" in str(e.value)


# --- decompression bomb ------------------------------------------------------------------------------------------

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    """A valid 20000x20000 8-bit grayscale PNG, all zero, built without ever holding the 400 MB of scanlines."""
    side = 20_000
    comp = zlib.compressobj(9)
    rows = bytes(side + 1) * 100  # 100 scanlines (filter byte 0 + pixels) at a time
    idat = b"".join(comp.compress(rows) for _ in range(side // 100)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    assert len(data) < 1_000_000
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(data)
    return path


def test_pixel_bomb_is_refused_as_too_large(bomb_png):
    with pytest.raises(ImageTooLarge):
        load_image(bomb_png.read_bytes(), LIMITS)


_RSS = "import resource, sys\nfrom vision.intake import IntakeLimits, ImageTooLarge, load_image\n{body}\n" \
       "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
_OPEN_BOMB = ("try:\n    load_image(open(sys.argv[1], 'rb').read(), IntakeLimits())\n"
              "except ImageTooLarge:\n    print('refused')\nelse:\n    print('decoded')")


def _peak_rss_kb(body: str, *args: str) -> tuple[int, list[str]]:
    out = subprocess.run([sys.executable, "-c", _RSS.format(body=body), *args],
                         capture_output=True, text=True, check=True, timeout=120).stdout.split()
    return int(out[-1]), out[:-1]


def test_pixel_bomb_is_refused_before_decoding_in_bounded_memory(bomb_png):
    baseline_kb, _ = _peak_rss_kb("pass")
    bomb_kb, printed = _peak_rss_kb(_OPEN_BOMB, str(bomb_png))
    assert printed == ["refused"]
    assert bomb_kb - baseline_kb < 150 * 1024, f"peak RSS grew by {(bomb_kb - baseline_kb) // 1024} MB"


# --- settings ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{"max_bytes": 0}, {"max_bytes": -1}, {"max_pixels": 0}, {"max_pixels": -5}])
def test_limits_reject_non_positive_values(kw):
    with pytest.raises(ValueError):
        IntakeLimits(**kw)


def test_limits_reject_unknown_formats():
    with pytest.raises(ValueError, match="BMP"):
        IntakeLimits(formats=("PNG", "BMP"))
