import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from dermbatch.errors import ImageError
from dermbatch.imageio import decode_image


def _pattern(h=30, w=40):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, array, fmt=None, **kwargs):
    Image.fromarray(array).save(path, format=fmt, **kwargs)
    return path


def test_png_roundtrip_is_exact_rgb(tmp_path):
    rgb = _pattern()
    decoded = decode_image(_save(tmp_path / "a.png", rgb))
    np.testing.assert_array_equal(decoded.rgb, rgb)
    assert decoded.original_size == (30, 40) and decoded.scale == 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    rgb = _pattern()
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"  # lossless, so pixels can be compared exactly
    image.save(path, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    decoded = decode_image(path)
    np.testing.assert_array_equal(decoded.rgb, expected)
    assert decoded.original_size == expected.shape[:2]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_other_pixel_formats_become_rgb_uint8(tmp_path, mode):
    rgb = _pattern()
    image = Image.fromarray(rgb).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    path = tmp_path / "x.png"
    image.save(path)
    decoded = decode_image(path)
    assert decoded.rgb.shape == (30, 40, 3) and decoded.rgb.dtype == np.uint8
    if mode in ("L", "I;16"):
        gray = np.asarray(Image.fromarray(rgb).convert("L"))
        assert np.abs(decoded.rgb[..., 0].astype(int) - gray).max() <= 1


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    rgb = cv2.resize(_pattern(), (1600, 1200))
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), rgb)
    decoded = decode_image(path, min_side=280)
    assert decoded.scale == 4 and decoded.rgb.shape == (300, 400, 3) and decoded.original_size == (1200, 1600)
    assert decode_image(path, min_side=None).scale == 1
    assert decode_image(path, min_side=700).scale == 1


def test_pixel_limit_refuses_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    _save(path, np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(ImageError, match=r"100x100 = 0 MP, over the 0 MP limit"):
        decode_image(path, max_pixels=5000)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"hello, this is text", "not an image"),
    (b"<html><body>not a png</body></html>", "not an image"),
])
def test_non_images_are_refused_with_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg_is_refused(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(_pattern(200, 200)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        decode_image(path)


def test_gif_content_is_refused_by_format(tmp_path):
    path = tmp_path / "anim.jpg"
    frames = [Image.fromarray(_pattern()), Image.fromarray(255 - _pattern())]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="content is GIF"):
        decode_image(path)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        decode_image(tmp_path)
    with pytest.raises(ImageError, match="disappeared"):
        decode_image(tmp_path / "gone.jpg")
