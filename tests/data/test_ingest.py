import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import CLASSES, SAMPLE

from bonetumor.config import Config
from bonetumor.data.ingest import ingest, normalise_tile_name, parse_tile_name, run_ingest
from bonetumor.data.manifest import read_manifest, resolve_paths
from bonetumor.errors import DatasetError, TileNameError
from bonetumor.utils import sha256_file


@pytest.mark.parametrize(
    ("name", "case", "slide"),
    [
        ("Case-48-P5-C20-15162-19423.jpg", "Case-48", "Case-48-P5-C20"),
        ("P9-B12-15791-34183.jpg", "P9", "P9-B12"),
        ("Case-3-A17-7799-34542", "Case-3", "Case-3-A17"),
        ("Case 48 - P5 C13-1234-5678.jpg", "Case-48", "Case-48-P5-C13"),
        ("P9 B11-10-20.png", "P9", "P9-B11"),
    ],
)
def test_parse_tcia_names(name: str, case: str, slide: str) -> None:
    parsed = parse_tile_name(name)
    assert (parsed.case, parsed.slide) == (case, slide)


@pytest.mark.parametrize("name", ["tile.jpg", "Case-48-15162-19423.jpg", "README.txt", "Case-48-P5-C20-x-y.jpg"])
def test_unparseable_names_raise_with_the_expected_pattern(name: str) -> None:
    with pytest.raises(TileNameError, match="expected <case>"):
        parse_tile_name(name)


def test_normalise_spaced_spelling() -> None:
    assert normalise_tile_name("Case 48 - P5 C13-1-2") == "Case-48-P5-C13-1-2"


def test_ingest_sample_agrees_with_the_published_manifest(tmp_path: Path) -> None:
    frame = ingest(SAMPLE / "images", CLASSES, tmp_path / "out" / "manifest.csv")
    reference = pd.read_csv(SAMPLE / "manifest.csv")
    merged = frame.assign(name=frame["path"].map(lambda p: Path(p).name)).merge(
        reference.assign(name=reference["path"].map(lambda p: Path(p).name)), on="name", suffixes=("", "_ref")
    )
    assert len(frame) == len(merged) == 30
    for column in ("label", "case", "slide", "sha256"):
        assert (merged[column] == merged[f"{column}_ref"]).all(), column
    assert set(frame["width"]) == {256}
    # Paths are relative to the manifest's folder and resolve to the real files.
    files = resolve_paths(read_manifest(tmp_path / "out" / "manifest.csv"), tmp_path / "out")
    assert all(f.is_file() for f in files)


def test_ingest_copy_makes_a_self_contained_dataset_and_leaves_the_source_alone(
    sample_copy: Path, tmp_path: Path
) -> None:
    before = {p: sha256_file(p) for p in sample_copy.rglob("*.jpg")}
    assert len(before) == 30
    out = tmp_path / "artifact"
    ingest(sample_copy, CLASSES, out / "manifest.csv", copy_images_to=out / "images")
    assert {p: sha256_file(p) for p in sample_copy.rglob("*.jpg")} == before  # the source is untouched

    # The artifact travels alone: moved elsewhere with its source gone, every manifest row still resolves.
    moved = tmp_path / "elsewhere" / "artifact"
    moved.parent.mkdir()
    out.rename(moved)
    originals = {p.relative_to(sample_copy).as_posix(): digest for p, digest in before.items()}
    shutil.rmtree(sample_copy)
    manifest = read_manifest(moved / "manifest.csv")
    files = resolve_paths(manifest, moved)
    copies = {f.relative_to((moved / "images").resolve()).as_posix(): f for f in files}  # raises if outside
    # One copy per source tile, at images/<class>/<name>, byte-identical to its source, and nothing else there.
    assert set(copies) == set(originals)
    assert {name: sha256_file(f) for name, f in copies.items()} == originals
    assert sorted(p for p in (moved / "images").rglob("*") if p.is_file()) == sorted(files)
    # The manifest's own checksum and label describe the copy it points at.
    for row, f in zip(manifest.itertuples(), files, strict=True):
        assert row.sha256 == sha256_file(f)
        assert f.parent.name == row.label


def test_the_ingest_stage_copies_tiles_into_its_output_folder(tmp_path: Path) -> None:
    # The Kubeflow path: run_ingest builds the output in a temporary folder and renames it at the end; the
    # manifest must point at the copies in the final folder, not at the temporary one or the source.
    config = Config.from_dict({"data": {"source": str(SAMPLE / "images")}})
    out = tmp_path / "ingest"
    run_ingest(config, tmp_path, out, copy_images=True)
    files = resolve_paths(read_manifest(out / "manifest.csv"), out)
    assert len(files) == 30
    assert all(f.is_relative_to((out / "images").resolve()) for f in files)
    by_name = {p.name: sha256_file(p) for p in (SAMPLE / "images").rglob("*.jpg")}
    assert {f.name: sha256_file(f) for f in files} == by_name


def test_missing_and_unknown_class_folders_are_named(sample_copy: Path, tmp_path: Path) -> None:
    (sample_copy / "Viable-Tumor").rename(sample_copy / "Viable")
    with pytest.raises(DatasetError) as info:
        ingest(sample_copy, CLASSES, tmp_path / "m.csv")
    assert "missing: ['Viable-Tumor']" in str(info.value)
    assert "unknown: ['Viable']" in str(info.value)
    assert not (tmp_path / "m.csv").exists()


def test_badly_named_files_are_all_listed(sample_copy: Path, tmp_path: Path) -> None:
    (sample_copy / "Non-Tumor" / "scan001.jpg").write_bytes(b"x")
    (sample_copy / "Viable-Tumor" / "notes.txt").write_text("n")
    (sample_copy / "Viable-Tumor" / ".DS_Store").write_bytes(b"")  # hidden files are skipped
    with pytest.raises(TileNameError) as info:
        ingest(sample_copy, CLASSES, tmp_path / "m.csv")
    assert "Non-Tumor/scan001.jpg" in str(info.value)
    assert "Viable-Tumor/notes.txt" in str(info.value)
    assert ".DS_Store" not in str(info.value)


def test_source_that_is_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is not a folder"):
        ingest(tmp_path / "missing", CLASSES, tmp_path / "m.csv")


def test_manifest_with_missing_columns_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("path,label\na.jpg,Non-Tumor\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['case', 'slide'"):
        read_manifest(path)
