"""Every image mode is read as the 8-bit RGB it shows: high bit depths scaled, transparency on white.

The expected pixels are written out from each mode's definition (16-bit v -> v / 257, float
0..1 -> x 255, a transparent pixel -> white, alpha a over white -> c a / 255 + 255 (1 - a / 255)),
not from the function under test. Training (`mlx_sd.data.preprocess`, `scan`) and evaluation
(`mlx_sd.metrics.images.read_rgb`) read through the same `mlx_sd.io.to_rgb`.
"""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mlx_sd.data import preprocess, scan
from mlx_sd.io import ImageModeError, read_rgb
from mlx_sd.metrics.images import read_rgb as eval_read_rgb

WHITE = [255, 255, 255]
LEVELS16 = np.array([[0, 128, 257, 4000], [30000, 32896, 65280, 65535]], np.uint16)


def exact8(v) -> np.ndarray:
    """16-bit -> 8-bit, the exact scale (no ties: v / 257 is never k + 1/2)."""
    return np.round(np.asarray(v, np.float64) * 255 / 65535).astype(np.uint8)


def gray(levels) -> np.ndarray:
    return np.repeat(np.asarray(levels, np.uint8)[..., None], 3, -1)


def write_png(path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): pixels [h, w, c] uint16."""
    h, w = pixels.shape[:2]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_grayscale_png_is_scaled_not_white(tmp_path):
    Image.fromarray(LEVELS16).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "I;16"
        assert (np.asarray(im.convert("RGB")) == 255).sum() > 12  # PIL's own conversion clips to white
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "g.png")), gray(exact8(LEVELS16)))


def test_32_bit_integer_tiff_with_16_bit_samples(tmp_path):
    Image.fromarray(LEVELS16.astype(np.int32)).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as im:
        assert im.mode == "I"
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "i.tif")), gray(exact8(LEVELS16)))


def test_integer_pixels_beyond_16_bits_are_refused_and_named(tmp_path):
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(ImageModeError, match=r"32-bit integer pixels in \[0, 70000\]"):
        read_rgb(tmp_path / "i.tif")


def test_float_tiff_0_to_1_is_scaled_not_black(tmp_path):
    v = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    Image.fromarray(v).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as im:
        assert im.mode == "F" and np.asarray(im.convert("RGB")).max() <= 1  # PIL's own conversion: black
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "f.tif")), gray([[0, 64, 128, 255]]))


def test_float_pixels_outside_0_1_are_refused(tmp_path):
    Image.fromarray(np.array([[0.0, 200.0]], np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageModeError, match=r"floating-point pixels in \[0, 200\]; expected 0..1"):
        read_rgb(tmp_path / "f.tif")


def test_palette_with_trns_is_on_white(tmp_path):
    im = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    im.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(read_rgb(tmp_path / "p.png")).tolist() == [[WHITE, [255, 0, 0], [0, 0, 255]]]


def test_grayscale_with_trns_is_on_white(tmp_path):
    Image.fromarray(np.array([[0, 128, 255, 0]], np.uint8)).save(tmp_path / "l.png", transparency=0)
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "L" and im.info["transparency"] == 0
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "l.png")), gray([[255, 128, 255, 255]]))


def test_rgb_with_trns_is_on_white(tmp_path):
    px = np.array([[[0, 0, 0], [10, 20, 30]]], np.uint8)
    Image.fromarray(px).save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    assert np.asarray(read_rgb(tmp_path / "rgb.png")).tolist() == [[WHITE, [10, 20, 30]]]


def test_16_bit_grayscale_with_trns_is_on_white(tmp_path):
    Image.fromarray(LEVELS16).save(tmp_path / "g.png", transparency=4000)
    want = gray(exact8(LEVELS16))
    want[0, 3] = WHITE  # the 16-bit level 4000 is the transparent one
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "g.png")), want)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_channels_are_composited_on_white(tmp_path, mode):
    c, a = np.array([200, 200, 10, 90]), np.array([0, 255, 128, 51])
    px = np.stack([c, a], -1) if mode == "LA" else np.stack([c, c, c, a], -1)
    Image.fromarray(px[None].astype(np.uint8), mode).save(tmp_path / "a.png")
    want = c * a / 255 + 255 * (1 - a / 255)
    got = np.asarray(read_rgb(tmp_path / "a.png")).astype(int)
    assert np.abs(got - gray(want[None].round())).max() <= 1, got  # PIL's integer compositing rounds
    assert got[0, 0].tolist() == WHITE and got[0, 1].tolist() == [200] * 3


def test_cmyk(tmp_path):
    px = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 255, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(px, "CMYK").save(tmp_path / "c.tif")
    assert np.asarray(read_rgb(tmp_path / "c.tif")).tolist() == [[WHITE, [0, 255, 255], [255, 0, 0], [0, 0, 0]]]


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path):
    """PIL decodes 16-bit RGB(A) PNGs to 8 bits itself, keeping each sample's high byte (v >> 8): within
    one level of the exact scale (1000 -> 3 for 3.89, 65280 -> 255 for 254.0), never clipped. The alpha
    of 16-bit RGBA is still on white."""
    v = np.array([[[0, 32896, 65535], [1000, 30000, 65280]]], np.uint16)
    write_png(tmp_path / "rgb16.png", v, color_type=2)
    got = np.asarray(read_rgb(tmp_path / "rgb16.png")).astype(int)
    assert np.array_equal(got, v >> 8)
    assert np.abs(got - exact8(v)).max() == 1
    rgba = np.concatenate([v, np.array([[[0], [65535]]], np.uint16)], -1)
    write_png(tmp_path / "rgba16.png", rgba, color_type=6)
    assert np.asarray(read_rgb(tmp_path / "rgba16.png")).tolist() == [[WHITE, (v[0, 1] >> 8).tolist()]]


def test_training_and_evaluation_read_the_same_pixels(tmp_path):
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "g.png")
    level = int(exact8(30000))  # 117; PIL's own conversion gives 255
    assert np.array_equal(eval_read_rgb(tmp_path / "g.png"), np.full((8, 8, 3), level, np.uint8))
    x = preprocess(tmp_path / "g.png", 8)
    assert np.allclose(x, level / 127.5 - 1.0)


def test_scan_names_an_image_it_cannot_read_as_rgb(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "ok.tif")
    Image.fromarray(np.full((8, 8), 3.0, np.float32)).save(tmp_path / "hdr.tif")
    (tmp_path / "ok.txt").write_text("a photo")
    (tmp_path / "hdr.txt").write_text("a photo")
    good, problems = scan(tmp_path)
    assert [s.path.name for s in good] == ["ok.tif"]
    assert problems == ["hdr.tif: floating-point pixels in [3, 3]; expected 0..1 (save the image as 8- or 16-bit, "
                        "or scaled to 0..1)"]
