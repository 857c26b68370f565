import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import CLASSES, DatasetFactory, tiny_params
from PIL import Image

import bonetumor.data.validate as validate_module
from bonetumor.config import Config
from bonetumor.data.ingest import ingest
from bonetumor.data.manifest import read_manifest
from bonetumor.data.validate import (
    DOCS_DIR,
    FOLDS_SUITE_NAME,
    REPORT_FILE,
    SUITE_NAME,
    TILES_FILE,
    hamming_pairs,
    inspect_tiles,
    run_validation,
    summarise,
    tissue_fraction,
    validate_dataset,
    validate_folds,
)
from bonetumor.errors import DataValidationError

BLANK = "P9-B6-5195-29864.jpg"


def _validate(images: Path, tmp_path: Path, config: Config | None = None) -> dict[str, Any]:
    """Ingest and validate (no Data Docs: they cost seconds and one test covers them); return the report."""
    ingest(images, CLASSES, tmp_path / "m" / "manifest.csv")
    return validate_dataset(
        read_manifest(tmp_path / "m" / "manifest.csv"),
        tmp_path / "m",
        config or Config(),
        tmp_path / "v" / REPORT_FILE,
        tiles_path=tmp_path / "v" / TILES_FILE,
    )


def _failed(tmp_path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    report = json.loads((tmp_path / "v" / REPORT_FILE).read_text())
    assert report["success"] is False
    return {(f["expectation"], f["column"]): f for f in report["failed"]}


def _names(paths: list[str]) -> set[str]:
    return {Path(p).name for p in paths}


def test_sample_passes_flags_the_near_blank_tile_and_writes_tiles_and_docs(
    sample_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the ephemeral GX context must not leave a gx/ folder in the working directory
    ingest(sample_images, CLASSES, tmp_path / "ingest" / "manifest.csv")
    report = run_validation(Config(), tmp_path / "ingest" / "manifest.csv", tmp_path / "validate")

    assert report["success"] is True
    assert report["failed"] == []
    assert report["class_counts"] == dict.fromkeys(CLASSES, 10)
    assert report["imbalance_ratio"] == 1.0
    assert (report["n_slides"], report["n_cases"]) == (12, 4)
    assert [Path(t["path"]).name for t in report["low_tissue"]] == [BLANK]
    assert any(BLANK in w for w in report["warnings"])
    assert report["duplicates"] == []
    assert report["near_duplicates"] == []

    tiles = pd.read_csv(tmp_path / "validate" / TILES_FILE)
    assert len(tiles) == 30
    assert tiles["phash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert (tiles["near_dup_cluster"] == tiles["path"]).all()  # no near-duplicates: every tile is its own cluster
    fractions = dict(zip(tiles["path"].map(lambda p: Path(p).name), tiles["tissue_fraction"], strict=True))
    assert fractions.pop(BLANK) < 0.25 <= min(fractions.values())
    assert set(tiles["mode"]) == {"RGB"}

    on_disk = json.loads((tmp_path / "validate" / REPORT_FILE).read_text())
    assert on_disk["success"] is True
    assert len(on_disk["expectations"]) >= 20
    index = tmp_path / "validate" / DOCS_DIR / "index.html"
    assert on_disk["data_docs"] == f"{DOCS_DIR}/index.html"
    assert SUITE_NAME in index.read_text()
    assert not (tmp_path / "gx").exists()
    assert not (tmp_path / "validate" / "gx").exists()

    summary = summarise(report)
    for text in ("Non-Tumor 10", "near-blank: 1", BLANK, "data docs: data_docs/index.html"):
        assert text in summary


def test_every_broken_tile_is_named_with_its_expectation(sample_copy: Path, tmp_path: Path) -> None:
    nt, vt = sample_copy / "Non-Tumor", sample_copy / "Viable-Tumor"
    truncated = nt / "Case-3-A15-2939-11262.jpg"
    truncated.write_bytes(truncated.read_bytes()[:2000])
    (vt / "Case-48-P5-C22-1-2.jpg").write_text("not an image")
    (vt / "Case-48-P5-C22-3-4.jpg").write_bytes(b"")
    shutil.copy(nt / "P9-B7-22066-28200.jpg", vt / "P9-B7-1-1.jpg")  # same bytes, two labels
    Image.new("L", (256, 256), 120).save(nt / "P9-B7-5-5.png")  # grayscale
    Image.new("RGBA", (256, 256), (200, 100, 150, 255)).save(nt / "P9-B7-7-7.png")
    Image.new("RGB", (64, 64), (200, 100, 150)).save(nt / "P9-B7-6-6.png")  # too small

    with pytest.raises(DataValidationError) as info:
        _validate(sample_copy, tmp_path)
    message = str(info.value)
    failed = _failed(tmp_path)
    decodes = failed[("expect_column_values_to_be_in_set", "decodes")]
    assert _names(decodes["failing_files"]) == {
        "Case-3-A15-2939-11262.jpg",
        "Case-48-P5-C22-1-2.jpg",
        "Case-48-P5-C22-3-4.jpg",
    }
    conflict = failed[("expect_column_values_to_be_between", "sha256_label_count")]
    assert _names(conflict["failing_files"]) == {"P9-B7-22066-28200.jpg", "P9-B7-1-1.jpg"}
    assert set(conflict["values"].values()) == {
        f"labelled {label}; this image carries Non-Tumor, Viable-Tumor" for label in ("Non-Tumor", "Viable-Tumor")
    }
    assert _names(failed[("expect_column_values_to_be_in_set", "mode")]["failing_files"]) == {
        "P9-B7-5-5.png",
        "P9-B7-7-7.png",
    }
    assert _names(failed[("expect_column_values_to_be_between", "decoded_width")]["failing_files"]) == {"P9-B7-6-6.png"}
    # The exception message alone tells the user what to fix.
    for text in (
        "Case-48-P5-C22-1-2.jpg: not a recognised image file",
        "Case-48-P5-C22-3-4.jpg: empty file (0 bytes)",
        "Case-3-A15-2939-11262.jpg: corrupt or truncated",
        "sha256_label_count",
        "P9-B7-1-1.jpg: labelled Viable-Tumor; this image carries Non-Tumor, Viable-Tumor",
        "P9-B7-5-5.png: L",
        "P9-B7-7-7.png: RGBA",
    ):
        assert text in message
    # The per-tile table is written even though validation failed.
    assert len(pd.read_csv(tmp_path / "v" / TILES_FILE)) == 36


def test_a_file_changed_after_ingest_fails_the_checksum_expectation(sample_copy: Path, tmp_path: Path) -> None:
    ingest(sample_copy, CLASSES, tmp_path / "m" / "manifest.csv")
    tile = sample_copy / "Viable-Tumor" / "Case-4-C29-29639-16570.jpg"
    Image.open(tile).rotate(90).save(tile, quality=90)
    with pytest.raises(DataValidationError, match="sha256_matches"):
        run_validation(Config(), tmp_path / "m" / "manifest.csv", tmp_path / "v")


def test_a_missing_class_is_reported(sample_copy: Path, tmp_path: Path) -> None:
    for tile in (sample_copy / "Viable-Tumor").iterdir():
        tile.unlink()
    with pytest.raises(DataValidationError, match=r"missing classes: \['Viable-Tumor'\]"):
        _validate(sample_copy, tmp_path)


def test_exact_and_near_duplicates_are_reported_with_their_pairs_but_pass(sample_copy: Path, tmp_path: Path) -> None:
    nvt = sample_copy / "Non-Viable-Tumor"
    shutil.copy(nvt / "Case-3-A12-16067-9053.jpg", nvt / "Case-3-A12-1-1.jpg")  # exact duplicate, same class
    Image.open(nvt / "Case-3-A17-16570-4475.jpg").save(nvt / "Case-3-A17-2-2.jpg", quality=60)  # re-encoded
    original = Image.open(nvt / "Case-4-C24-13844-15938.jpg")
    original.crop((4, 4, 256, 256)).resize((256, 256)).save(nvt / "Case-4-C24-3-3.jpg", quality=90)  # shifted

    report = _validate(sample_copy, tmp_path)
    assert report["success"] is True
    assert [(Path(p["a"]).name, Path(p["b"]).name) for p in report["duplicates"]] == [
        ("Case-3-A12-1-1.jpg", "Case-3-A12-16067-9053.jpg")
    ]
    near = {(Path(p["a"]).name, Path(p["b"]).name): p["distance"] for p in report["near_duplicates"]}
    assert set(near) == {
        ("Case-3-A17-16570-4475.jpg", "Case-3-A17-2-2.jpg"),
        ("Case-4-C24-13844-15938.jpg", "Case-4-C24-3-3.jpg"),
    }
    assert all(0 <= d <= Config().validate.near_duplicate_distance for d in near.values())
    assert report["n_near_duplicate_clusters"] == 3  # the exact pair is a cluster too
    assert any("exact duplicate" in w for w in report["warnings"])
    assert any("near-duplicate" in w for w in report["warnings"])

    tiles = pd.read_csv(tmp_path / "v" / TILES_FILE).set_index("path")
    reencoded = [p for p in tiles.index if "Case-3-A17-" in p and ("16570-4475" in p or "-2-2" in p)]
    assert tiles.loc[reencoded, "near_dup_cluster"].nunique() == 1
    assert tiles.loc[reencoded[0], "near_dup_cluster"] == min(reencoded)
    assert set(tiles.loc[reencoded, "near_dup_cluster_size"]) == {2}


def test_many_near_blank_tiles_fail(sample_copy: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for k in range(3):
        pixels = np.clip(244 + rng.normal(0, 2, (256, 256, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(sample_copy / "Non-Tumor" / f"P9-B6-{k}-{k}.jpg", quality=90)
    with pytest.raises(DataValidationError, match="tissue_fraction"):
        _validate(sample_copy, tmp_path)
    low = _failed(tmp_path)[("expect_column_values_to_be_between", "tissue_fraction")]
    assert _names(low["failing_files"]) == {BLANK, "P9-B6-0-0.jpg", "P9-B6-1-1.jpg", "P9-B6-2-2.jpg"}
    assert low["kwargs"]["mostly"] == pytest.approx(0.95)


def test_tissue_fraction_of_glass_and_of_stained_tissue() -> None:
    assert tissue_fraction(Image.new("RGB", (256, 256), (245, 245, 245))) == 0.0
    assert tissue_fraction(Image.new("RGB", (256, 256), (220, 120, 170))) == 1.0
    half = np.full((256, 256, 3), 245, dtype=np.uint8)
    half[:, :128] = (120, 70, 160)
    assert tissue_fraction(Image.fromarray(half)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("settings", "column"),
    [({"min_class_count": 5, "max_imbalance_ratio": 10.0}, "n_tiles"), ({"min_class_count": 1}, "largest_to_this")],
)
def test_too_few_tiles_of_a_class_or_too_much_imbalance_fails(
    make_dataset: DatasetFactory, tmp_path: Path, settings: dict[str, object], column: str
) -> None:
    images = make_dataset(per_slide=3, slides=3)
    for tile in sorted((images / "Viable-Tumor").iterdir())[2:]:
        tile.unlink()  # 9, 9 and 2 tiles: ratio 4.5
    config = Config.from_dict(tiny_params(validate=settings))
    with pytest.raises(DataValidationError, match=column) as info:
        _validate(images, tmp_path, config)
    failed = _failed(tmp_path)
    assert set(failed) == {("expect_column_values_to_be_between", column)}
    assert failed[("expect_column_values_to_be_between", column)]["failing_rows"] == ["Viable-Tumor"]
    assert "Viable-Tumor" in str(info.value)
    report = json.loads((tmp_path / "v" / REPORT_FILE).read_text())
    assert report["imbalance_ratio"] == 4.5


def test_hamming_pairs_match_brute_force_across_blocks() -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 2**63, 300, dtype=np.uint64)
    codes[150] = codes[3] ^ np.uint64(0b1011)  # 3 bits apart
    codes[299] = codes[7]  # identical
    codes[200] = codes[100] ^ np.uint64(0xFF)  # 8 bits apart: beyond 4
    i, j, d = hamming_pairs(codes, 4, block=64)
    found = {(int(a), int(b), int(x)) for a, b, x in zip(i, j, d, strict=True)}
    expected = {
        (a, b, bin(int(codes[a]) ^ int(codes[b])).count("1"))
        for a in range(300)
        for b in range(a + 1, 300)
        if bin(int(codes[a]) ^ int(codes[b])).count("1") <= 4
    }
    assert found == expected
    assert {(3, 150, 3), (7, 299, 0)} <= found


def test_parallel_decoding_gives_the_same_table(
    sample_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = ingest(sample_images, CLASSES, tmp_path / "manifest.csv")
    serial = inspect_tiles(manifest, tmp_path, workers=1)
    monkeypatch.setattr(validate_module, "MIN_TILES_PER_WORKER", 1)
    parallel = inspect_tiles(manifest, tmp_path, workers=2)
    pd.testing.assert_frame_equal(serial, parallel)


# ---------------------------------------------------------------------------------------------------------------
# The folds suite, on small tables (no images needed).

SLIDES = [f"Case-{1 + s // 2}-A{s}" for s in range(6)]  # 6 slides of 3 cases


@pytest.fixture
def folds_manifest() -> pd.DataFrame:
    """Six slides with one tile of each class."""
    rows = [
        {"path": f"{label}/{slide}-{k}-{k}.jpg", "label": label, "case": slide.rsplit("-", 1)[0], "slide": slide}
        for k, slide in enumerate(SLIDES)
        for label in CLASSES
    ]
    return pd.DataFrame(rows)


def _folds(manifest: pd.DataFrame, fold_of_slide: Mapping[str, int | str]) -> dict[str, Any]:
    """A folds document: each slide's tiles in the validation set of its fold, or in the test set."""
    where = manifest["slide"].map(fold_of_slide)
    folds = sorted({f for f in fold_of_slide.values() if f != "test"})
    return {
        "format_version": 1,
        "group_by": "slide",
        "test_paths": sorted(manifest.loc[where == "test", "path"]),
        "folds": [{"fold": f, "val_paths": sorted(manifest.loc[where == f, "path"])} for f in folds],
    }


THREE_FOLDS = dict(zip(SLIDES, [0, 0, 1, 1, 2, 2], strict=True))


def test_clean_folds_pass_with_data_docs(folds_manifest: pd.DataFrame, tmp_path: Path) -> None:
    folds = _folds(folds_manifest, {**THREE_FOLDS, SLIDES[5]: "test"})
    table = folds_manifest.assign(near_dup_cluster=folds_manifest["path"])
    report = validate_folds(
        folds_manifest, folds, table, Config(), docs_dir=tmp_path / "docs", report_path=tmp_path / "folds.json"
    )
    assert report["success"] is True
    assert report["warnings"] == []
    assert (report["n_folds"], report["n_test"], report["checks_near_duplicates"]) == (3, 3, True)
    assert json.loads((tmp_path / "folds.json").read_text())["success"] is True
    assert FOLDS_SUITE_NAME in (tmp_path / "docs" / "index.html").read_text()
    assert "3 folds grouped by slide" in summarise(report)


def test_a_group_in_two_folds_fails(folds_manifest: pd.DataFrame) -> None:
    folds = _folds(folds_manifest, THREE_FOLDS)
    moved = folds["folds"][0]["val_paths"].pop()  # a tile of a fold-0 slide now validates in fold 1
    folds["folds"][1]["val_paths"].append(moved)
    with pytest.raises(DataValidationError, match="group_fold_count") as info:
        validate_folds(folds_manifest, folds, None, Config())
    slide = folds_manifest.set_index("path").loc[moved, "slide"]
    assert f"group {slide} in ['fold 0', 'fold 1']" in str(info.value)


def test_a_near_duplicate_cluster_split_across_folds_fails(folds_manifest: pd.DataFrame) -> None:
    folds = _folds(folds_manifest, THREE_FOLDS)
    a, b = folds["folds"][0]["val_paths"][0], folds["folds"][2]["val_paths"][0]
    table = folds_manifest.assign(near_dup_cluster=folds_manifest["path"].replace({b: a}))
    assert validate_folds(folds_manifest, folds, None, Config())["success"] is True  # without clusters: fine
    with pytest.raises(DataValidationError, match="cluster_fold_count") as info:
        validate_folds(folds_manifest, folds, table, Config())
    assert a in str(info.value)
    assert b in str(info.value)


def test_a_group_in_the_test_set_and_a_fold_fails(folds_manifest: pd.DataFrame) -> None:
    folds = _folds(folds_manifest, {**THREE_FOLDS, SLIDES[5]: "test"})
    leaked = folds["test_paths"].pop()
    folds["folds"][2]["val_paths"].append(leaked)
    with pytest.raises(DataValidationError, match="group_spans_test") as info:
        validate_folds(folds_manifest, folds, None, Config())
    assert SLIDES[5] in str(info.value)


def test_a_tile_in_no_fold_or_unknown_fails(folds_manifest: pd.DataFrame) -> None:
    folds = _folds(folds_manifest, THREE_FOLDS)
    dropped = folds["folds"][0]["val_paths"].pop()
    folds["folds"][0]["val_paths"].append("Non-Tumor/unknown-1-1.jpg")
    with pytest.raises(DataValidationError) as info:
        validate_folds(folds_manifest, folds, None, Config())
    assert f"{dropped}: 0" in str(info.value)
    assert "Non-Tumor/unknown-1-1.jpg" in str(info.value)


def test_a_validation_fold_without_a_class_is_a_warning(folds_manifest: pd.DataFrame) -> None:
    manifest = folds_manifest[~((folds_manifest["label"] == "Viable-Tumor") & folds_manifest["slide"].isin(SLIDES[:2]))]
    report = validate_folds(manifest, _folds(manifest, THREE_FOLDS), None, Config())
    assert report["success"] is True
    assert report["missing_val_classes"] == {"fold 0": ["Viable-Tumor"]}
    assert report["warnings"] == ["fold 0 validation set has no tiles of ['Viable-Tumor']"]
    warning = next(e for e in report["expectations"] if e["column"] == "n_val_tiles")
    assert (warning["severity"], warning["success"], warning["failing_rows"]) == (
        "warning",
        False,
        ["fold 0: Viable-Tumor"],
    )
