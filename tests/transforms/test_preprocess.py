import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from bonetumor.config import PreprocessConfig
from bonetumor.errors import InvalidImageError
from bonetumor.transforms.decode import decode_image, inspect_image
from bonetumor.transforms.preprocess import build_eval_transform


def encoded(mode: str, fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format=fmt)
    return buffer.getvalue()


def noisy_jpeg() -> bytes:
    # Noise does not compress, so cutting the file keeps the header but loses most of the pixel data.
    buffer = io.BytesIO()
    Image.effect_noise((300, 300), 60).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"), [("RGB", "JPEG"), ("RGB", "PNG"), ("RGB", "TIFF"), ("RGBA", "PNG"), ("L", "PNG"), ("CMYK", "JPEG")]
)
def test_supported_inputs_decode_to_rgb(mode: str, fmt: str) -> None:
    image = decode_image(encoded(mode, fmt))
    assert image.mode == "RGB"
    assert image.size == (40, 30)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"%PDF-1.4 not an image", "not a recognised image"),
        (encoded("RGB", "GIF"), "GIF images are not accepted"),
        (encoded("RGB", "JPEG", (300, 300))[:600], "corrupt or truncated image"),
        (noisy_jpeg()[:3000], "corrupt or truncated JPEG image"),
        (encoded("I;16", "PNG"), "pixel mode I;16 is not supported"),
    ],
)
def test_bad_inputs_raise_a_message_that_says_why(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message):
        decode_image(data, source="upload.bin")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match=r"gone\.jpg: cannot read file"):
        decode_image(tmp_path / "gone.jpg")


def test_eval_transform_resizes_and_normalises_exactly() -> None:
    config = PreprocessConfig(tile_size=40, input_size=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    # Pixel values chosen so that (value/255 - mean) / std is exactly 1, 1 and 0.2.
    image = Image.new("RGB", (100, 60), (255, 128, 51))
    tensor = build_eval_transform(config)(image)
    assert tensor.shape == (3, 40, 40)
    assert tensor.dtype == torch.float32
    expected = torch.tensor([1.0, (128 / 255 - 0.25) / 0.25, 0.2])
    assert torch.allclose(tensor.mean(dim=(1, 2)), expected, atol=1e-4)


def test_inspect_reports_mode_without_converting(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    path.write_bytes(encoded("L", "PNG"))
    info = inspect_image(path)
    assert (info.decodes, info.format, info.mode, info.width, info.height) == (True, "PNG", "L", 40, 30)
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(encoded("RGB", "JPEG", (300, 300))[:600])
    assert inspect_image(truncated).decodes is False
    assert "truncated" in str(inspect_image(truncated).error)


def test_a_non_square_tile_is_centre_cropped_not_squashed() -> None:
    config = PreprocessConfig(tile_size=32, input_size=32)
    wide = Image.effect_noise((128, 64), 50).convert("RGB")
    centre = wide.crop((32, 0, 96, 64))
    transform = build_eval_transform(config)
    assert torch.allclose(transform(wide), transform(centre))
