import logging
import shutil
import stat
import struct
import subprocess
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from conftest import CLASS_COLOURS, CLASSES, venv_env, write_tile
from PIL import Image
from typer.testing import CliRunner

from bonetumor.cli.data import data_app
from bonetumor.config import Config
from bonetumor.data import importer as dataimport
from bonetumor.data.importer import directory_digest, import_dataset
from bonetumor.data.ingest import ingest
from bonetumor.errors import ConfigError, DatasetError, InvalidImageError, TileNameError
from bonetumor.transforms.decode import decode_image
from bonetumor.utils import read_json, sha256_file

# ----------------------------------------------------------------------------------------------------------- helpers


def make_config(**data_import: object) -> Config:
    return Config.from_dict({"data_import": data_import} if data_import else {})


def tree_state(root: Path) -> dict[str, str]:
    """Every path under root with its SHA-256 (files) or kind, so any change to the source shows up."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        state[rel] = "link" if path.is_symlink() else sha256_file(path) if path.is_file() else "dir"
    return state


@contextmanager
def source_untouched(root: Path) -> Iterator[None]:
    before = tree_state(root)
    try:
        yield
    finally:
        assert tree_state(root) == before


def leftovers(target: Path) -> list[str]:
    """Temporary build or extraction folders left in the target folder."""
    return [p.name for p in target.iterdir() if p.name.startswith(".")] if target.exists() else []


def tile(root: Path, rel: str, colour: tuple[int, int, int] = (200, 100, 150), seed: int = 0) -> Path:
    return write_tile(root / rel, colour, size=64, seed=seed)


def class_folders(root: Path) -> Path:
    """Two tiles per class, the spaced TCIA spelling included."""
    for c, label in enumerate(CLASSES):
        tile(root, f"{label}/Case-48-P5-C2{c}-15162-1942{c}.jpg", CLASS_COLOURS[label], seed=c)
        tile(root, f"{label}/Case 3 - A1{c}-100-20{c}.jpg", CLASS_COLOURS[label], seed=10 + c)
    return root


TCIA_ROWS = [
    ("Case 48 - P5 C20-15162-19423", "Non-Tumor", "Training-Set-1/Set1_Part1"),
    ("P9 B12-15791-34183.jpg", "Non-Tumor", "Training-Set-1/Set1_Part1"),
    ("Case 3 - A15-2939-11262", "Viable", "Training-Set-1/Set1_Part2"),
    ("Case 4 - C52-7119-24770", "Non-Viable-Tumor", "Training-Set-2/Set2_Part1"),
    ("Case 4 - C53-7119-24771", "Non-Viable-Tumor", "Training-Set-2/Set2_Part1"),
    ("Case 48 - P5 C13-100-200", "viable: non-viable", "Training-Set-2/Set2_Part1"),
]


def tcia_download(root: Path) -> Path:
    """A fake TCIA download: Training-Set-* folders (nested), spaced names, a label CSV with a mixed row, clutter."""
    for i, (name, _, folder) in enumerate(TCIA_ROWS):
        stem = name.removesuffix(".jpg")
        tile(root, f"{folder}/{stem}.jpg", (60 + 30 * i, 90, 140), seed=i)
    lines = ["image.name,cellularity,Classification"] + [
        f"{n},{0.1 * i:.1f},{lab}" for i, (n, lab, _) in enumerate(TCIA_ROWS)
    ]
    (root / "ML_Features_1144.csv").write_text("\n".join(lines) + "\n")
    (root / "Training-Set-1" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "Training-Set-1" / "Set1_Part1" / "Thumbs.db").write_bytes(b"junk")
    (root / "__MACOSX" / "Training-Set-1").mkdir(parents=True)
    (root / "__MACOSX" / "Training-Set-1" / "._Case 3 - A15-2939-11262.jpg").write_bytes(b"resource fork")
    return root


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def png16_rgb(path: Path, pixels: np.ndarray) -> Path:
    """Write a 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


# ------------------------------------------------------------------------------------------------- source layouts


def test_tcia_download_is_imported_with_labels_mapped_and_the_mixed_class_excluded(
    tmp_path: Path, project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tcia_download(tmp_path / "Osteosarcoma TCIA")
    caplog.set_level(logging.INFO, logger="bonetumor.data.importer")
    with source_untouched(source):
        result = import_dataset(source, make_config(), project)

    assert result.name == "Osteosarcoma-TCIA"
    assert result.dest == project / "data" / "raw" / "Osteosarcoma-TCIA"
    assert result.counts == {"Non-Tumor": 2, "Non-Viable-Tumor": 2, "Viable-Tumor": 1}
    assert result.excluded == {"viable: non-viable": 1}
    assert "viable: non-viable: 1" in caplog.text
    assert not result.unchanged
    assert not result.conversions
    assert not result.duplicates
    # Names normalised to the dashed spelling; 8-bit RGB tiles copied byte for byte.
    copied = result.dest / "Viable-Tumor" / "Case-3-A15-2939-11262.jpg"
    assert sha256_file(copied) == sha256_file(source / "Training-Set-1/Set1_Part2/Case 3 - A15-2939-11262.jpg")
    assert (result.dest / "Non-Tumor" / "P9-B12-15791-34183.jpg").is_file()
    assert not list(result.dest.rglob("*C13-100-200*"))  # the mixed tile
    report = read_json(result.report, "import report")
    assert report["source_kind"] == "tcia"
    assert report["label_file"] == "ML_Features_1144.csv"
    assert (report["image_name_column"], report["label_column"]) == ("image.name", "Classification")
    assert report["excluded"] == {"viable: non-viable": 1}
    assert report["digest"] == result.digest == directory_digest(result.dest)
    assert report["label_map"]["viable: non-viable"] is None
    # The result is what the pipeline's ingest stage reads.
    frame = ingest(result.dest, CLASSES, tmp_path / "manifest.csv")
    assert sorted(frame["slide"]) == sorted(["Case-48-P5-C20", "P9-B12", "Case-3-A15", "Case-4-C52", "Case-4-C53"])


def test_zip_of_the_download_gives_the_same_content_and_cleans_up(tmp_path: Path, project: Path) -> None:
    folder = tcia_download(tmp_path / "download")
    archive = zip_folder(folder, tmp_path / "tcia-osteo.zip", prefix="download/")
    from_folder = import_dataset(folder, make_config(), project)
    with source_untouched(tmp_path / "download"):
        before = sha256_file(archive)
        from_zip = import_dataset(archive, make_config(), project)
        assert sha256_file(archive) == before
    assert from_zip.name == "tcia-osteo"
    assert from_zip.digest == from_folder.digest
    assert from_zip.counts == from_folder.counts
    report = read_json(from_zip.report, "import report")
    assert report["source_sha256"] == before
    assert report["label_file"] == "tcia-osteo.zip:download/ML_Features_1144.csv"
    assert leftovers(project / "data" / "raw") == []


def test_class_folders_are_mapped_through_the_label_map_and_clutter_is_skipped(tmp_path: Path, project: Path) -> None:
    # A wrapper folder around the class folders, Kaggle's "Viable" spelling, clutter, a file beside the folders.
    root = tmp_path / "kaggle"
    tile(root, "osteo/Non-Tumor/Case-3-A15-2939-11262.jpg", seed=1)
    tile(root, "osteo/Non-Viable-Tumor/nested/Case-4-C52-7119-24770.jpg", seed=2)
    tile(root, "osteo/Viable/P9 B11-10-20.jpg", seed=3)
    (root / "osteo" / "Viable" / ".DS_Store").write_bytes(b"junk")
    (root / "osteo" / "Non-Tumor" / "Thumbs.db").write_bytes(b"junk")
    (root / "osteo" / "README.txt").write_text("downloaded from kaggle")
    with source_untouched(root):
        result = import_dataset(root, make_config(), project, name="kaggle v2")
    assert result.name == "kaggle-v2"
    assert result.counts == {"Non-Tumor": 1, "Non-Viable-Tumor": 1, "Viable-Tumor": 1}
    assert sorted(p.relative_to(result.dest).as_posix() for p in result.dest.rglob("*.jpg")) == [
        "Non-Tumor/Case-3-A15-2939-11262.jpg",
        "Non-Viable-Tumor/Case-4-C52-7119-24770.jpg",
        "Viable-Tumor/P9-B11-10-20.jpg",
    ]
    assert read_json(result.report, "import report")["ignored"] == ["osteo/README.txt"]


def test_manifest_csv_paths_are_relative_to_the_csv(tmp_path: Path, project: Path) -> None:
    root = tmp_path / "mine"
    tile(root, "a/Case-3-A15-1-2.jpg", seed=1)
    tile(root, "b/Case-3-A16-1-2.jpg", seed=2)
    tile(root, "c/Case-3-A17-1-2.jpg", seed=3)
    (root / "labels.csv").write_text(
        "Path,Label\na/Case-3-A15-1-2.jpg,Non-Tumor\nb/Case-3-A16-1-2.jpg,Viable\n"
        "c/Case-3-A17-1-2.jpg,viable: non-viable\n"
    )
    with source_untouched(root):
        result = import_dataset(root / "labels.csv", make_config(), project)
    assert result.name == "labels"
    assert result.counts == {"Non-Tumor": 1, "Non-Viable-Tumor": 0, "Viable-Tumor": 1}
    assert result.excluded == {"viable: non-viable": 1}
    assert read_json(result.report, "import report")["source_kind"] == "manifest-csv"

    (root / "broken.csv").write_text("path,label\nmissing/Case-3-A15-1-2.jpg,Non-Tumor\n")
    with pytest.raises(DatasetError, match=r"missing/Case-3-A15-1-2.jpg: file not found"):
        import_dataset(root / "broken.csv", make_config(), project)
    (root / "features.csv").write_text("image.name,classification\nCase-3-A15-1-2,Non-Tumor\n")
    with pytest.raises(
        DatasetError, match=r"found columns \['image.name', 'classification'\].*looks like a label file"
    ):
        import_dataset(root / "features.csv", make_config(), project)


# ---------------------------------------------------------------------------------------------------------- labels


def test_unknown_labels_are_listed_with_the_maps_keys(tmp_path: Path, project: Path) -> None:
    source = tcia_download(tmp_path / "dl")
    csv = source / "ML_Features_1144.csv"
    csv.write_text(csv.read_text().replace("Non-Viable-Tumor", "necrotic").replace(",Viable", ",viable tumour"))
    with source_untouched(source), pytest.raises(DatasetError) as info:
        import_dataset(source, make_config(), project)
    message = str(info.value)
    assert "unknown label(s) ['necrotic', 'viable tumour']" in message
    assert "'Non-Tumor', 'Non-Viable-Tumor', 'Viable-Tumor', 'Viable', 'viable: non-viable'" in message
    assert not (project / "data" / "raw" / "dl").exists()


def test_unknown_class_folder_is_named_with_the_expected_labels(tmp_path: Path, project: Path) -> None:
    root = class_folders(tmp_path / "src")
    tile(root, "Necrosis/Case-3-A1-1-2.jpg", seed=99)
    with (
        source_untouched(root),
        pytest.raises(DatasetError, match=r"(?s)unknown class folder\(s\) \['Necrosis'\].*'Viable'"),
    ):
        import_dataset(root, make_config(), project)


def test_label_map_to_a_class_outside_data_classes_is_a_config_error(tmp_path: Path, project: Path) -> None:
    root = class_folders(tmp_path / "src")
    config = make_config(label_map={"Non-Tumor": "Non-Tumor", "Non-Viable-Tumor": "Necrotic", "Viable-Tumor": None})
    with pytest.raises(ConfigError, match=r"'Non-Viable-Tumor': 'Necrotic'.*one of \['Non-Tumor'"):
        import_dataset(root, config, project)


def test_mapping_a_label_to_null_leaves_it_out_and_keeping_the_mixed_class_works(tmp_path: Path, project: Path) -> None:
    source = tcia_download(tmp_path / "dl")
    keep_mixed = {**dict(make_config().data_import.label_map), "viable: non-viable": "Viable-Tumor", "Non-Tumor": None}
    result = import_dataset(source, make_config(label_map=keep_mixed), project)
    assert result.counts == {"Non-Tumor": 0, "Non-Viable-Tumor": 2, "Viable-Tumor": 2}
    assert result.excluded == {"Non-Tumor": 2}
    assert (result.dest / "Viable-Tumor" / "Case-48-P5-C13-100-200.jpg").is_file()


def test_tile_without_a_label_row_and_unreadable_label_columns_are_errors(tmp_path: Path, project: Path) -> None:
    source = tcia_download(tmp_path / "dl")
    tile(source, "Training-Set-2/Case 4 - C60-1-2.jpg", seed=77)
    with pytest.raises(DatasetError, match=r"(?s)1 tile\(s\) have no row.*Training-Set-2/Case 4 - C60-1-2.jpg"):
        import_dataset(source, make_config(), project)
    (source / "ML_Features_1144.csv").write_text("picture,verdict\nCase 4 - C60-1-2,Non-Tumor\n")
    with pytest.raises(DatasetError, match=r"found columns \['picture', 'verdict'\]"):
        import_dataset(source, make_config(), project)


# ------------------------------------------------------------------------------------------------------ bad tiles


def test_every_bad_file_is_listed_in_one_error_and_nothing_is_written(tmp_path: Path, project: Path) -> None:
    root = class_folders(tmp_path / "src")
    good = tile(root, "Non-Tumor/Case-9-A1-1-1.jpg", seed=5)
    (root / "Non-Tumor" / "Case-9-A1-2-2.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "Viable-Tumor" / "Case-9-A2-3-3.jpg").write_bytes(b"")
    (root / "Non-Viable-Tumor" / "Case-9-A3-4-4.png").write_text("not an image at all")
    with source_untouched(root), pytest.raises(InvalidImageError) as info:
        import_dataset(root, make_config(), project)
    message = str(info.value)
    assert "3 tile(s) cannot be imported" in message
    assert "Non-Tumor/Case-9-A1-2-2.jpg: corrupt or truncated" in message
    assert "Viable-Tumor/Case-9-A2-3-3.jpg: empty file (0 bytes)" in message
    assert "Non-Viable-Tumor/Case-9-A3-4-4.png: not a recognised image file" in message
    target = project / "data" / "raw"
    assert not (target / "src").exists()
    assert leftovers(target) == []


def test_unparsable_tile_names_are_listed(tmp_path: Path, project: Path) -> None:
    root = class_folders(tmp_path / "src")
    tile(root, "Non-Tumor/IMG_0001.jpg", seed=3)
    tile(root, "Viable-Tumor/Case 48 - 15162-19423.jpg", seed=4)
    with source_untouched(root), pytest.raises(TileNameError) as info:
        import_dataset(root, make_config(), project)
    assert "2 file(s)" in str(info.value)
    assert "Non-Tumor/IMG_0001.jpg" in str(info.value)
    assert "Viable-Tumor/Case 48 - 15162-19423.jpg" in str(info.value)


def _odd_modes(root: Path) -> dict[str, str]:
    """One tile per non-RGB mode; returns file -> mode."""
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = (200, 40, 90)
    rgb[:, 32:] = (30, 160, 220)
    base = Image.fromarray(rgb, mode="RGB")
    folder = root / "Non-Tumor"
    folder.mkdir(parents=True)
    base.convert("CMYK").save(folder / "Case-1-A1-0-0.jpg", quality=95)
    grey16 = np.full((64, 64), 65535, np.uint16)
    grey16[:, :32] = 32896  # 128 * 257
    Image.fromarray(grey16).save(folder / "Case-1-A2-0-0.png")
    Image.fromarray(grey16.astype(np.int32), mode="I").save(folder / "Case-1-A3-0-0.tif")
    rgba = np.dstack([rgb, np.zeros((64, 64), np.uint8)])
    rgba[:32, :, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(folder / "Case-1-A4-0-0.png")
    base.convert("LA").save(folder / "Case-1-A5-0-0.png")
    base.convert("P").save(folder / "Case-1-A6-0-0.png")
    base.convert("L").save(folder / "Case-1-A7-0-0.jpg", quality=95)
    png16_rgb(folder / "Case-1-A8-0-0.png", np.full((8, 8, 3), (65535, 32896, 0), np.uint16))
    base.save(folder / "Case-1-A9-0-0.jpg", quality=95)  # 8-bit RGB: copied as is
    return {
        "Case-1-A1-0-0.jpg": "CMYK",
        "Case-1-A2-0-0.png": "I;16",
        "Case-1-A3-0-0.tif": "I",
        "Case-1-A4-0-0.png": "RGBA",
        "Case-1-A5-0-0.png": "LA",
        "Case-1-A6-0-0.png": "P",
        "Case-1-A7-0-0.jpg": "L",
        "Case-1-A8-0-0.png": "RGB;16",
    }


def test_non_rgb_tiles_are_converted_to_8_bit_rgb_and_listed(
    tmp_path: Path, project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "modes"
    modes = _odd_modes(root)
    caplog.set_level(logging.INFO, logger="bonetumor.data.importer")
    with source_untouched(root):
        result = import_dataset(root, make_config(image_modes="convert"), project)
    assert {Path(c.source).name: c.from_mode for c in result.conversions} == modes
    out = result.dest / "Non-Tumor"
    for conversion in result.conversions:
        written = result.dest / conversion.file
        assert written.suffix == ".png"
        with Image.open(written) as image:
            assert image.mode == "RGB"
        assert f"converted {conversion.source}" in caplog.text
    # 16-bit values scaled by 257, not clipped; alpha composited on white.
    for name in ("Case-1-A2-0-0.png", "Case-1-A3-0-0.png"):
        pixels = np.asarray(decode_image(out / name))
        assert tuple(pixels[0, 0]) == (128, 128, 128)
        assert tuple(pixels[0, 63]) == (255, 255, 255)
    assert tuple(np.asarray(decode_image(out / "Case-1-A8-0-0.png"))[0, 0]) == (255, 128, 0)
    rgba = np.asarray(decode_image(out / "Case-1-A4-0-0.png"))
    assert tuple(rgba[0, 0]) == (200, 40, 90)
    assert tuple(rgba[63, 0]) == (255, 255, 255)
    with Image.open(root / "Non-Tumor" / "Case-1-A1-0-0.jpg") as cmyk:
        assert np.array_equal(np.asarray(decode_image(out / "Case-1-A1-0-0.png")), np.asarray(cmyk.convert("RGB")))
    assert sha256_file(out / "Case-1-A9-0-0.jpg") == sha256_file(root / "Non-Tumor" / "Case-1-A9-0-0.jpg")
    report = read_json(result.report, "import report")
    assert len(report["conversions"]) == len(modes)
    assert directory_digest(result.dest) == result.digest
    # Converting again gives the same bytes, so a re-import is a no-op.
    assert import_dataset(root, make_config(image_modes="convert"), project).unchanged


def test_reject_lists_every_tile_that_is_not_8_bit_rgb(tmp_path: Path, project: Path) -> None:
    root = tmp_path / "modes"
    modes = _odd_modes(root)
    with source_untouched(root), pytest.raises(InvalidImageError) as info:
        import_dataset(root, make_config(image_modes="reject"), project)
    message = str(info.value)
    assert f"{len(modes)} tile(s)" in message
    for name, mode in modes.items():
        assert f"Non-Tumor/{name}: pixel mode {mode} is not 8-bit RGB" in message
    assert "Case-1-A9-0-0.jpg" not in message
    assert not (project / "data" / "raw" / "modes").exists()


# ------------------------------------------------------------------------------------------------------ duplicates


def test_the_same_image_under_two_classes_is_a_conflict(tmp_path: Path, project: Path) -> None:
    root = class_folders(tmp_path / "src")
    shutil.copyfile(root / "Non-Tumor/Case-48-P5-C20-15162-19420.jpg", root / "Viable-Tumor/Case-5-B1-1-1.jpg")
    with source_untouched(root), pytest.raises(DatasetError) as info:
        import_dataset(root, make_config(), project)
    message = str(info.value)
    assert "label conflict" in message
    assert "Non-Tumor/Case-48-P5-C20-15162-19420.jpg (Non-Tumor)" in message
    assert "Viable-Tumor/Case-5-B1-1-1.jpg (Viable-Tumor)" in message


def test_the_same_image_twice_under_one_class_is_kept_once_and_reported(tmp_path: Path, project: Path) -> None:
    root = class_folders(tmp_path / "src")
    shutil.copyfile(root / "Non-Tumor/Case-48-P5-C20-15162-19420.jpg", root / "Non-Tumor/Case-5-B1-1-1.jpg")
    result = import_dataset(root, make_config(), project)
    assert result.counts["Non-Tumor"] == 2
    assert [(d.kept, d.dropped) for d in result.duplicates] == [
        ("Non-Tumor/Case-48-P5-C20-15162-19420.jpg", "Non-Tumor/Case-5-B1-1-1.jpg")
    ]
    assert read_json(result.report, "import report")["duplicates"][0]["dropped"] == "Non-Tumor/Case-5-B1-1-1.jpg"


def test_two_different_images_with_one_name_in_a_class_are_an_error(tmp_path: Path, project: Path) -> None:
    root = class_folders(tmp_path / "src")
    tile(root, "Non-Tumor/sub/Case-48-P5-C20-15162-19420.jpg", seed=123)
    with pytest.raises(DatasetError, match=r"(?s)same name.*Non-Tumor/Case-48-P5-C20-15162-19420.jpg: "):
        import_dataset(root, make_config(), project)


# ------------------------------------------------------------------------------------------------------- zip safety


def _evil_zip(path: Path, kind: str, good: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(good, "Non-Tumor/Case-3-A15-2939-11262.jpg")
        if kind == "parent":
            zf.writestr("Non-Tumor/../../escaped.jpg", good.read_bytes())
        elif kind == "absolute":
            info = zipfile.ZipInfo("x")
            info.filename = "/tmp/escaped.jpg"  # ZipInfo() strips a leading "/"; a hostile archive need not
            zf.writestr(info, good.read_bytes())
        else:
            info = zipfile.ZipInfo("Non-Tumor/Case-3-A16-1-1.jpg")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(("kind", "why"), [("parent", "'..'"), ("absolute", "absolute path"), ("symlink", "symbolic")])
def test_unsafe_zip_is_refused_before_anything_is_extracted(tmp_path: Path, project: Path, kind: str, why: str) -> None:
    good = tile(tmp_path / "tiles", "Case-3-A15-2939-11262.jpg")
    archive = _evil_zip(tmp_path / "evil.zip", kind, good)
    before = sha256_file(archive)
    with pytest.raises(DatasetError, match=rf"(?s)refused, nothing extracted.*{why}"):
        import_dataset(archive, make_config(), project)
    assert sha256_file(archive) == before
    target = project / "data" / "raw"
    assert not target.exists() or not any(target.iterdir())
    assert not (project / "escaped.jpg").exists()
    assert not (tmp_path / "escaped.jpg").exists()


# ---------------------------------------------------------------------------------------------- re-import, atomicity


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in [root, *root.rglob("*")]}


def test_reimporting_the_same_data_is_a_no_op(tmp_path: Path, project: Path) -> None:
    root = class_folders(tmp_path / "src")
    first = import_dataset(root, make_config(), project)
    stamps = _mtimes(first.dest)
    # The same tiles through another layout (a zip) are the same content.
    again = import_dataset(zip_folder(root, tmp_path / "src.zip"), make_config(), project, name="src")
    assert again.unchanged
    assert again.digest == first.digest
    assert _mtimes(first.dest) == stamps
    assert leftovers(project / "data" / "raw") == []


def test_changed_data_replaces_the_folder_and_a_failed_import_keeps_the_old_one(
    tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = class_folders(tmp_path / "src")
    first = import_dataset(root, make_config(), project)
    tile(root, "Viable-Tumor/Case-7-D1-5-5.jpg", seed=55)
    (root / "Non-Tumor" / "Case 3 - A10-100-200.jpg").unlink()
    second = import_dataset(root, make_config(), project)
    assert not second.unchanged
    assert second.digest != first.digest
    assert second.counts == {"Non-Tumor": 1, "Non-Viable-Tumor": 2, "Viable-Tumor": 3}
    assert not (second.dest / "Non-Tumor" / "Case-3-A10-100-200.jpg").exists()
    assert directory_digest(second.dest) == second.digest

    # A bad tile: checked before writing, so the previous import stays as it was.
    stamps = _mtimes(second.dest)
    (root / "Viable-Tumor" / "Case-7-D1-6-6.jpg").write_bytes(b"")
    with pytest.raises(InvalidImageError):
        import_dataset(root, make_config(), project)
    assert _mtimes(second.dest) == stamps
    (root / "Viable-Tumor" / "Case-7-D1-6-6.jpg").unlink()

    # A failure half-way through writing (disk full) leaves the previous import and no temporary folder.
    tile(root, "Viable-Tumor/Case-7-D1-7-7.jpg", seed=56)
    calls = {"n": 0}
    real_copy = shutil.copyfile

    def failing_copy(src: Path, dst: Path) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(dataimport.shutil, "copyfile", failing_copy)
    with pytest.raises(DatasetError, match=r"No space left on device.*previous import there is unchanged"):
        import_dataset(root, make_config(), project)
    assert _mtimes(second.dest) == stamps
    assert directory_digest(second.dest) == second.digest
    assert leftovers(project / "data" / "raw") == []


def test_destination_overlapping_the_source_or_not_an_import_is_refused(tmp_path: Path, project: Path) -> None:
    root = class_folders(project / "data" / "raw" / "mine")
    with source_untouched(root), pytest.raises(DatasetError, match="overlaps the source"):
        import_dataset(root, make_config(), project)
    other = class_folders(tmp_path / "other")
    with source_untouched(root), pytest.raises(DatasetError, match="not made by `bonetumor data import`"):
        import_dataset(other, make_config(), project, name="mine")


def test_progress_is_logged_every_n_files(
    tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dataimport, "PROGRESS_EVERY", 2)
    caplog.set_level(logging.INFO, logger="bonetumor.data.importer")
    import_dataset(class_folders(tmp_path / "src"), make_config(), project)
    for line in ("checked 2/6 tiles", "checked 6/6 tiles", "wrote 4/6 tiles", "wrote 6/6 tiles"):
        assert line in caplog.text


# ---------------------------------------------------------------------------------------------------------- the CLI


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Root, so that `data` is a sub-command as in bonetumor's CLI."""

    app.add_typer(data_app, name="data")
    return app


def _dvc_md5(project: Path, name: str) -> str:
    return str(yaml.safe_load((project / "data" / "raw" / f"{name}.dvc").read_text())["outs"][0]["md5"])


def test_cli_imports_and_tracks_with_dvc_only_when_the_content_changes(tmp_path: Path, project: Path) -> None:
    env = venv_env()
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(command, cwd=project, env=env, check=True, capture_output=True)
    (project / "params.yaml").write_text(yaml.safe_dump({"data_import": {"target": "data/raw"}}))
    source = tcia_download(tmp_path / "tcia")
    runner = CliRunner()
    args = ["data", "import", str(source), "--params", str(project / "params.yaml"), "--name", "osteo"]

    untracked = runner.invoke(_cli(), [*args, "--no-dvc"], env=env)
    assert untracked.exit_code == 0, untracked.output
    assert "not tracked (--no-dvc)" in untracked.output
    assert not (project / "data" / "raw" / "osteo.dvc").exists()

    # Unchanged, but never tracked: dvc add runs now.
    first = runner.invoke(_cli(), args, env=env)
    assert first.exit_code == 0, first.output
    assert "unchanged" in first.output
    assert "dvc add data/raw/osteo: tracked in data/raw/osteo.dvc" in first.output
    assert "osteo: 5 tiles (Non-Tumor: 2, Non-Viable-Tumor: 2, Viable-Tumor: 1)" in first.output
    assert "excluded by data_import.label_map: 1 ('viable: non-viable': 1)" in first.output
    assert "data.source: data/raw/osteo" in first.output
    assert "dvc push" in first.output
    md5 = _dvc_md5(project, "osteo")
    dvc_file = project / "data" / "raw" / "osteo.dvc"
    stamp = dvc_file.stat().st_mtime_ns

    again = runner.invoke(_cli(), args, env=env)
    assert again.exit_code == 0, again.output
    assert "unchanged" in again.output
    assert "dvc add" not in again.output
    assert _dvc_md5(project, "osteo") == md5
    assert dvc_file.stat().st_mtime_ns == stamp

    tile(source, "Training-Set-2/Set2_Part1/Case 4 - C52-7119-24770.jpg", seed=500)  # new pixels, same name
    changed = runner.invoke(_cli(), args, env=env)
    assert changed.exit_code == 0, changed.output
    assert _dvc_md5(project, "osteo") != md5


def test_cli_without_dvc_says_how_to_track_and_errors_exit_1(tmp_path: Path, project: Path) -> None:
    (project / "params.yaml").write_text("{}\n")
    runner = CliRunner()
    source = class_folders(tmp_path / "src")
    params = ["--params", str(project / "params.yaml")]
    plain = runner.invoke(_cli(), ["data", "import", str(source), *params])
    assert plain.exit_code == 0, plain.output
    assert "is not a DVC repository" in plain.output
    assert "dvc add data/raw/src" in plain.output
    assert not list(project.rglob("*.dvc"))

    tile(source, "Necrosis/Case-3-A1-1-2.jpg", seed=9)
    failed = runner.invoke(_cli(), ["data", "import", str(source), *params, "--no-dvc"])
    assert failed.exit_code == 1
    assert "error:" in failed.output
    assert "Necrosis" in failed.output
    assert "Traceback" not in failed.output
