import json
import shutil
from pathlib import Path

import pytest
from conftest import CLASSES
from PIL import Image

from bonetumor.config import Config
from bonetumor.errors import DataValidationError
from bonetumor.ingest import ingest
from bonetumor.validate import run_validation


def test_sample_passes_and_the_report_counts_everything(sample_images: Path, tmp_path: Path) -> None:
    ingest(sample_images, CLASSES, tmp_path / "ingest" / "manifest.csv")
    report = run_validation(Config(), tmp_path / "ingest" / "manifest.csv", tmp_path / "validate")
    assert report["success"] is True
    assert report["class_counts"] == dict.fromkeys(CLASSES, 10)
    assert (report["n_slides"], report["n_cases"]) == (12, 4)
    assert report["failed"] == []
    on_disk = json.loads((tmp_path / "validate" / "report.json").read_text())
    assert on_disk["success"] is True
    assert len(on_disk["expectations"]) >= 15


def test_every_broken_tile_is_named_with_its_expectation(sample_copy: Path, tmp_path: Path) -> None:
    nt = sample_copy / "Non-Tumor"
    truncated = nt / "Case-3-A15-2939-11262.jpg"
    truncated.write_bytes(truncated.read_bytes()[:2000])
    (sample_copy / "Viable-Tumor" / "Case-48-P5-C22-1-2.jpg").write_text("not an image")
    shutil.copy(nt / "P9-B7-22066-28200.jpg", sample_copy / "Viable-Tumor" / "P9-B7-1-1.jpg")  # same bytes, 2 labels
    Image.new("L", (256, 256), 200).save(nt / "P9-B7-5-5.png")  # grayscale
    Image.new("RGB", (64, 64), (200, 100, 150)).save(nt / "P9-B7-6-6.png")  # too small
    ingest(sample_copy, CLASSES, tmp_path / "ingest" / "manifest.csv")

    with pytest.raises(DataValidationError) as info:
        run_validation(Config(), tmp_path / "ingest" / "manifest.csv", tmp_path / "validate")
    message = str(info.value)
    report = json.loads((tmp_path / "validate" / "report.json").read_text())
    assert report["success"] is False
    failed = {(f["expectation"], f["column"]): f for f in report["failed"]}
    decodes = failed[("expect_column_values_to_be_in_set", "decodes")]
    assert {Path(p).name for p in decodes["failing_files"]} == {"Case-3-A15-2939-11262.jpg", "Case-48-P5-C22-1-2.jpg"}
    assert {Path(p).name for p in failed[("expect_column_values_to_be_unique", "sha256")]["failing_files"]} == {
        "P9-B7-22066-28200.jpg",
        "P9-B7-1-1.jpg",
    }
    assert [Path(p).name for p in failed[("expect_column_values_to_be_in_set", "mode")]["failing_files"]] == [
        "P9-B7-5-5.png"
    ]
    assert [Path(p).name for p in failed[("expect_column_values_to_be_between", "decoded_width")]["failing_files"]] == [
        "P9-B7-6-6.png"
    ]
    # The exception message alone tells the user what to fix.
    for text in (
        "Case-48-P5-C22-1-2.jpg",
        "not a recognised image file",
        "truncated",
        "expect_column_values_to_be_unique",
    ):
        assert text in message


def test_a_file_changed_after_ingest_fails_the_checksum_expectation(sample_copy: Path, tmp_path: Path) -> None:
    ingest(sample_copy, CLASSES, tmp_path / "m" / "manifest.csv")
    tile = sample_copy / "Viable-Tumor" / "Case-4-C29-29639-16570.jpg"
    Image.open(tile).rotate(90).save(tile, quality=90)
    with pytest.raises(DataValidationError, match="sha256_matches"):
        run_validation(Config(), tmp_path / "m" / "manifest.csv", tmp_path / "v")


def test_a_missing_class_is_reported(sample_copy: Path, tmp_path: Path) -> None:
    for tile in (sample_copy / "Viable-Tumor").iterdir():
        tile.unlink()
    ingest(sample_copy, CLASSES, tmp_path / "m" / "manifest.csv")
    with pytest.raises(DataValidationError, match=r"missing classes: \['Viable-Tumor'\]"):
        run_validation(Config(), tmp_path / "m" / "manifest.csv", tmp_path / "v")
