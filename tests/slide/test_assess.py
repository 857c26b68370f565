"""Whole-slide assessment with a known answer: generated pyramidal TIFFs on a known grid, read by real OpenSlide.

A stub classifier names each tile by its colour, so the layout fixes every tile's label; the tests check the
tiling (glass skipped, coordinates), the necrosis figure and its interval, and the exports against the layout.
"""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
from PIL import Image
from shapely.geometry import box, shape
from shapely.ops import unary_union

from bonetumor.config import AssessConfig
from bonetumor.errors import SlideError
from bonetumor.slide.assess import _read_ahead, assess_slide, grid_tiles
from bonetumor.slide.demo import (
    CELL_CLASSES,
    compose_layout,
    layout_counts,
    layout_necrosis_percent,
    write_demo_slide,
    write_pyramidal_tiff,
)
from bonetumor.slide.necrosis import clopper_pearson
from bonetumor.slide.sources import TileSpec

CLASSES = ("Non-Tumor", "Non-Viable-Tumor", "Viable-Tumor")
#: Cell colours the stub tells apart; "R" cells are viable tumour the stub refers.
COLOURS = {"Non-Tumor": (90, 120, 200), "Non-Viable-Tumor": (230, 170, 60), "Viable-Tumor": (150, 40, 140)}
REFERRED_COLOUR = (60, 160, 90)
TILE = 64
MPP = 16.0  # 64 px x 16 um = 1024 um: one training tile per cell
LAYOUT = (
    "........",
    ".NNXXV..",
    ".NXXVV..",
    ".XXVVV..",
    "..NN....",
    "........",
)


def _tile(colour: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour, float) + rng.normal(0, 8, (TILE, TILE, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _colour_tiles(name: str, index: int) -> Image.Image:
    return _tile(COLOURS[name], index)


class ColourStub:
    """Names a tile by its nearest class colour; refers tiles of :data:`REFERRED_COLOUR` (as viable tumour)."""

    classes = CLASSES

    def __init__(self) -> None:
        self.seen = 0
        self.model_fields = {"name": "stub", "version": "0", "run_id": "", "runtime": "stub"}

    def classify_tiles(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        self.seen += len(images)
        answers = []
        for image in images:
            mean = np.asarray(image, float).reshape(-1, 3).mean(axis=0)
            refer = bool(np.abs(mean - REFERRED_COLOUR).sum() < 40)
            label = "Viable-Tumor" if refer else min(CLASSES, key=lambda c: np.abs(mean - COLOURS[c]).sum())
            probabilities = {c: (0.8 if c == label else 0.1) for c in CLASSES}
            answers.append(
                {"label": label, "probabilities": probabilities, "referral": {"refer": refer, "reason": "r"}}
            )
        return answers


def _slide(tmp_path: Path, layout: tuple[str, ...] = LAYOUT, mpp: float | None = MPP) -> Path:
    image = compose_layout(layout, _colour_tiles, TILE)
    path = tmp_path / "slide.tif"
    if mpp is None:
        import tifffile

        tifffile.imwrite(path, image, photometric="rgb", tile=(64, 64), compression="zlib")
        return path
    return write_pyramidal_tiff(image, path, mpp, tile=64)


def _config(**fields: Any) -> AssessConfig:
    return AssessConfig(**{"bootstrap": 0, "workers": 2, "batch_size": 4, **fields})


def test_openslide_reads_the_generated_slide_with_its_scale(tmp_path: Path) -> None:
    slide = openslide.OpenSlide(str(_slide(tmp_path)))
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    assert slide.dimensions == (8 * TILE, 6 * TILE)
    assert slide.level_count >= 2


def test_the_grid_skips_glass_and_places_every_tile_where_the_layout_has_it(tmp_path: Path) -> None:
    stub = ColourStub()
    result = assess_slide(_slide(tmp_path), stub, _config(), tmp_path / "out", progress=False)
    summary = result.summary
    counts = layout_counts(LAYOUT)
    assert summary["tiling"]["grid"] == {"columns": 8, "rows": 6}
    assert summary["tiling"]["tile_side_px"] == TILE
    assert summary["tiling"]["glass_skipped_by_thumbnail"] == 48 - sum(counts.values())
    assert stub.seen == sum(counts.values())  # glass was never classified
    assert summary["tiles_per_class"] == counts
    with result.files["csv"].open() as handle:
        for row in csv.DictReader(handle):
            cell = LAYOUT[int(row["y"]) // TILE][int(row["x"]) // TILE]
            assert CELL_CLASSES[cell] == row["label"], row
            assert int(row["width"]) == TILE


def test_necrosis_equals_the_layout_and_referred_tiles_bound_it(tmp_path: Path) -> None:
    summary = assess_slide(_slide(tmp_path), ColourStub(), _config(), tmp_path / "out", progress=False).summary
    expected = layout_necrosis_percent(LAYOUT)  # 6 necrotic, 6 viable
    assert summary["necrosis_percent"] == pytest.approx(expected, abs=0.01)
    # Nothing referred: the exact binomial interval of 6 necrotic out of 12 tumour tiles.
    assert summary["necrosis_interval"] == [pytest.approx(v, abs=0.01) for v in clopper_pearson(6, 12, 0.95)]
    assert summary["tumour_area_mm2"] == pytest.approx(12 * (TILE * MPP / 1000) ** 2, abs=1e-3)
    assert summary["response"]["category"] == "poor responder"
    assert summary["response"]["certain"] is True

    # Two viable cells become referred: lowest = 6 / (6 + 4 + 2), highest = (6 + 2) / (6 + 4 + 2).
    referred_colours = dict(COLOURS)

    def tiles(name: str, index: int) -> Image.Image:
        if name == "Viable-Tumor" and index < 2:
            return _tile(REFERRED_COLOUR, index)
        return _tile(referred_colours[name], index)

    path = write_pyramidal_tiff(compose_layout(LAYOUT, tiles, TILE), tmp_path / "referred.tif", MPP, tile=64)
    summary = assess_slide(path, ColourStub(), _config(), tmp_path / "out2", progress=False).summary
    assert summary["referred"]["tiles"] == 2
    assert summary["referred"]["share"] == pytest.approx(2 / 17, abs=1e-4)
    assert summary["necrosis_percent"] == pytest.approx(50.0)  # referred tiles still count by their label
    assert summary["interval"]["referral_bounds"] == [pytest.approx(50.0), pytest.approx(66.67, abs=0.01)]
    # Widened to the exact limits of the lowest (6 of 12) and highest (8 of 12) counts.
    low, high = clopper_pearson(6, 12, 0.95)[0], clopper_pearson(8, 12, 0.95)[1]
    assert summary["necrosis_interval"] == [pytest.approx(low, abs=0.01), pytest.approx(high, abs=0.01)]
    assert summary["response"]["certain"] is False  # the upper end reaches 90 %


def test_the_bootstrap_widens_the_interval_around_the_estimate_reproducibly(tmp_path: Path) -> None:
    slide = _slide(tmp_path)
    first = assess_slide(slide, ColourStub(), _config(bootstrap=500), tmp_path / "a", progress=False).summary
    again = assess_slide(slide, ColourStub(), _config(bootstrap=500), tmp_path / "b", progress=False).summary
    low, high = first["necrosis_interval"]
    assert low < first["necrosis_percent"] < high
    assert high - low > 20  # 12 tumour tiles leave a wide sampling interval
    assert first["necrosis_interval"] == again["necrosis_interval"]


def test_the_geojson_parses_with_shapely_at_the_tiles_coordinates(tmp_path: Path) -> None:
    result = assess_slide(_slide(tmp_path), ColourStub(), _config(), tmp_path / "out", progress=False)
    collection = json.loads(result.files["geojson"].read_text())
    assert collection["type"] == "FeatureCollection"
    polygons = []
    for feature in collection["features"]:
        polygon = shape(feature["geometry"])
        assert polygon.is_valid
        x0, y0, _, _ = polygon.bounds
        assert polygon.equals(box(x0, y0, x0 + TILE, y0 + TILE))
        cell = LAYOUT[int(y0) // TILE][int(x0) // TILE]
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["classification"]["name"] == CELL_CLASSES[cell]
        assert len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) >= {f"P({c})" for c in CLASSES} | {"Referred"}
        polygons.append(polygon)
    assert unary_union(polygons).area == pytest.approx(17 * TILE * TILE)  # no overlaps, no gaps missing


def test_the_overlay_is_a_picture_of_the_map(tmp_path: Path) -> None:
    result = assess_slide(_slide(tmp_path), ColourStub(), _config(), tmp_path / "out", progress=False)
    with Image.open(result.files["overlay"]) as image:
        assert image.format == "PNG"
        assert image.width > 600
    written = json.loads(result.files["json"].read_text())
    assert written["necrosis_percent"] == result.summary["necrosis_percent"]
    assert written["files"]["geojson"] == "tiles.geojson"


def test_progress_is_reported_tile_by_tile(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    assess_slide(
        _slide(tmp_path),
        ColourStub(),
        _config(),
        tmp_path / "o",
        progress=False,
        on_progress=lambda *a: calls.append(a),
    )
    assert calls[-1] == (17, 17)
    assert [done for done, _ in calls] == list(range(1, 18))


def test_reads_run_a_bounded_number_ahead() -> None:
    from concurrent.futures import ThreadPoolExecutor

    started: list[int] = []
    consumed = 0
    tiles = [TileSpec(i, 0, 1) for i in range(50)]

    def read(tile: TileSpec) -> int:
        started.append(tile.x)
        return tile.x

    with ThreadPoolExecutor(2) as pool:
        for tile, future in _read_ahead(pool, read, tiles, ahead=5):
            assert future.result() == tile.x
            consumed += 1
            assert len(started) <= consumed + 5
    assert consumed == 50


def test_grid_tiles_uses_whole_tiles_only() -> None:
    mask = np.ones((10, 13), dtype=bool)
    tiles, grid = grid_tiles((130, 100), 30, mask, 0.5)
    assert grid == (4, 3)
    assert len(tiles) == 12
    assert max(t.x for t in tiles) + 30 <= 130


def _tile_set(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    for index, name in enumerate(names):
        _tile(COLOURS["Viable-Tumor" if index % 2 else "Non-Viable-Tumor"], index).save(folder / name, quality=95)
    return folder


def test_a_zip_of_tcia_tiles_is_placed_by_the_coordinates_in_the_names(tmp_path: Path) -> None:
    names = ["Case-48-P5-C20-0-0.jpg", "Case-48-P5-C20-1024-0.jpg", "Case-48-P5-C20-0-1024.jpg"]
    folder = _tile_set(tmp_path / "tiles", names)
    archive = tmp_path / "slide.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in names:
            zf.write(folder / name, f"Case-48-P5-C20/{name}")
    result = assess_slide(archive, ColourStub(), _config(), tmp_path / "out", progress=False)
    assert result.summary["input"]["kind"] == "tile-zip"
    assert result.summary["tiles_per_class"] == {"Non-Tumor": 0, "Non-Viable-Tumor": 2, "Viable-Tumor": 1}
    assert result.summary["input"]["mpp"] == pytest.approx(1.0)  # 1024 um over a 1024 px TCIA tile
    with result.files["csv"].open() as handle:
        placed = {(int(r["x"]), int(r["y"])): r["label"] for r in csv.DictReader(handle)}
    assert placed == {(0, 0): "Non-Viable-Tumor", (1024, 0): "Viable-Tumor", (0, 1024): "Non-Viable-Tumor"}
    folder_result = assess_slide(folder, ColourStub(), _config(), tmp_path / "out2", progress=False)
    assert folder_result.summary["tiles_per_class"] == result.summary["tiles_per_class"]


def test_a_plain_image_needs_its_scale(tmp_path: Path) -> None:
    image = tmp_path / "section.png"
    Image.fromarray(compose_layout(LAYOUT, _colour_tiles, TILE)).save(image)
    with pytest.raises(SlideError, match=r"section\.png: the input records no microns per pixel.*--mpp"):
        assess_slide(image, ColourStub(), _config(), tmp_path / "out", progress=False)
    summary = assess_slide(image, ColourStub(), _config(mpp=MPP), tmp_path / "out", progress=False).summary
    assert summary["input"]["kind"] == "image"
    assert summary["tiles_per_class"] == layout_counts(LAYOUT)


def test_a_slide_without_recorded_scale_is_refused_unless_overridden(tmp_path: Path) -> None:
    path = _slide(tmp_path, mpp=None)
    with pytest.raises(SlideError, match=r"slide\.tif: the input records no microns per pixel"):
        assess_slide(path, ColourStub(), _config(), tmp_path / "out", progress=False)
    summary = assess_slide(path, ColourStub(), _config(mpp=MPP), tmp_path / "out", progress=False).summary
    assert summary["input"]["mpp_source"] == "assess.mpp (override)"
    assert summary["tiles"] == 17


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b"this is not a slide\n" * 10, "notes.svs", r"notes\.svs: not a slide or image"),
        (b"", "empty.tif", r"empty\.tif: empty file"),
        (b"PK\x03\x04 broken", "tiles.zip", r"tiles\.zip"),
    ],
)
def test_what_is_not_a_slide_is_refused_by_name(tmp_path: Path, content: bytes, name: str, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SlideError, match=message):
        assess_slide(path, ColourStub(), _config(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_truncated_tiff_is_refused_with_its_name(tmp_path: Path) -> None:
    path = _slide(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match=r"truncated\.tif: neither a slide OpenSlide recognises nor a readable"):
        assess_slide(truncated, ColourStub(), _config(), tmp_path / "out", progress=False)
    # Cut in its reduced levels only: OpenSlide no longer sees a pyramid, the full level still decodes, and the
    # answer says how it was read.
    partial = tmp_path / "partial.tif"
    partial.write_bytes(data[: int(len(data) * 0.9)])
    summary = assess_slide(partial, ColourStub(), _config(), tmp_path / "out", progress=False).summary
    assert summary["input"]["kind"] == "image"
    assert summary["tiles_per_class"] == layout_counts(LAYOUT)
    assert any("OpenSlide does not recognise partial.tif" in note for note in summary["warnings"])


def test_a_slide_of_glass_says_no_tissue(tmp_path: Path) -> None:
    path = _slide(tmp_path, layout=("......", "......", "......"))
    with pytest.raises(SlideError, match=r"slide\.tif: no tissue found: none of the 18 tiles"):
        assess_slide(path, ColourStub(), _config(), tmp_path / "out", progress=False)


def test_tile_names_without_coordinates_are_refused(tmp_path: Path) -> None:
    folder = _tile_set(tmp_path / "tiles", ["Case-48-P5-C20-0-0.jpg", "tile_a.jpg", "scan.jpg"])
    with pytest.raises(
        SlideError,
        match=r"2 of 3 tile names carry no coordinates.*expected TCIA names <case>\[-<part>\]-<block>-<x>-<y>",
    ):
        assess_slide(folder, ColourStub(), _config(), tmp_path / "out", progress=False)


def test_tiles_of_two_slides_in_one_zip_are_refused(tmp_path: Path) -> None:
    names = ["Case-48-P5-C20-0-0.jpg", "Case-48-P5-C20-1024-0.jpg", "P9-B12-0-0.jpg"]
    folder = _tile_set(tmp_path / "tiles", names)
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in names:
            zf.write(folder / name, name)
    with pytest.raises(SlideError, match=r"mixed\.zip: tiles of 2 slides.*Case-48-P5-C20 \(2 tiles\), P9-B12 \(1"):
        assess_slide(archive, ColourStub(), _config(), tmp_path / "out", progress=False)


def test_a_corrupt_tile_in_a_tile_set_is_left_out_and_reported(tmp_path: Path) -> None:
    folder = _tile_set(tmp_path / "tiles", ["Case-1-A1-0-0.jpg", "Case-1-A1-1024-0.jpg"])
    (folder / "Case-1-A1-0-1024.jpg").write_bytes(b"\xff\xd8\xff broken jpeg")
    summary = assess_slide(folder, ColourStub(), _config(), tmp_path / "out", progress=False).summary
    assert summary["tiles"] == 2
    assert summary["tiling"]["unreadable_tiles"] == 1
    assert "Case-1-A1-0-1024.jpg" in summary["tiling"]["unreadable_examples"][0]
    assert summary["warnings"]


def test_the_demo_slide_uses_the_sample_tiles(tmp_path: Path, sample_images: Path) -> None:
    from bonetumor.slide.demo import DEMO_LAYOUT, sample_tile_source

    path = write_demo_slide(tmp_path / "demo.tif", sample_tile_source(sample_images))
    slide = openslide.OpenSlide(str(path))
    assert slide.dimensions == (len(DEMO_LAYOUT[0]) * 256, len(DEMO_LAYOUT) * 256)
    first = sorted((sample_images / "Non-Tumor").glob("*.jpg"))[0]
    cell = DEMO_LAYOUT[1].index("N")
    region = slide.read_region((cell * 256, 256), 0, (256, 256)).convert("RGB")
    with Image.open(first) as tile:
        assert np.array_equal(np.asarray(region), np.asarray(tile.convert("RGB")))  # lossless, at level 0


def test_classes_the_model_lacks_are_named(tmp_path: Path) -> None:
    from bonetumor.errors import ConfigError

    with pytest.raises(ConfigError, match=r"assess.necrotic_class='Necrosis' is not a class of the model"):
        assess_slide(_slide(tmp_path), ColourStub(), _config(necrotic_class="Necrosis"), tmp_path / "o", progress=False)


def _gradient(width: int, height: int) -> np.ndarray:
    """A smooth pattern that differs everywhere, so a region read from the wrong place or scale shows."""
    y, x = np.mgrid[0:height, 0:width].astype(float)
    return np.stack(
        [128 + 100 * np.sin(x / 97), 128 + 100 * np.cos(y / 61), 128 + 60 * np.sin((x + y) / 151)], axis=-1
    ).astype(np.uint8)


def test_a_tile_read_from_a_reduced_level_matches_the_full_resolution_crop(tmp_path: Path) -> None:
    from bonetumor.slide.sources import OpenSlideSource

    pixels = _gradient(3072, 2048)
    source = OpenSlideSource(write_pyramidal_tiff(pixels, tmp_path / "g.tif", mpp=1.0))
    tile = TileSpec(1024, 1024, 1024)  # read at 256: from the level downsampled 4x
    assert source._slide.get_best_level_for_downsample(1024 / 256) == 2
    read = np.asarray(source.read(tile, 256), dtype=float)
    expected = np.asarray(Image.fromarray(pixels[1024:2048, 1024:2048]).resize((256, 256), Image.Resampling.BOX))
    error = np.abs(read - expected).mean()
    assert error < 1.5
    # The test can tell: the crop 16 px (4 px of that level) lower is several times further off.
    shifted = np.asarray(Image.fromarray(pixels[1040:2064, 1024:2048]).resize((256, 256), Image.Resampling.BOX))
    assert np.abs(read - shifted).mean() > 3 * error + 1
    source.close()


def test_a_slide_without_a_pyramid_gets_its_thumbnail_in_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tifffile

    from bonetumor.slide import sources

    pixels = _gradient(3000, 2000)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(
        path,
        pixels,
        photometric="rgb",
        tile=(256, 256),
        compression="zlib",
        resolution=(1e4, 1e4),
        resolutionunit="CENTIMETER",
    )
    monkeypatch.setattr(sources, "THUMBNAIL_BLOCK", 512)  # several blocks, uneven at the edges
    source = sources.OpenSlideSource(path)
    assert source._slide.level_count == 1
    thumb = source.thumbnail(300)
    assert thumb.size == (300, 200)
    expected = np.asarray(Image.fromarray(pixels).reduce(10), dtype=float)
    assert np.abs(np.asarray(thumb, dtype=float) - expected).mean() < 4
    source.close()


def test_grid_tiles_reads_the_mask_at_its_own_scale() -> None:
    # A 1000 x 600 slide, 100 px tiles, a 333 x 200 mask (scale 0.333 across, 0.333 down): tissue in one cell only.
    mask = np.zeros((200, 333), dtype=bool)
    mask[int(200 * 0.5) : int(200 * 0.6667), int(333 * 0.7) : int(333 * 0.8)] = True  # the cell at column 7, row 3
    tiles, grid = grid_tiles((1000, 600), 100, mask, 0.5)
    assert grid == (10, 6)
    assert [(t.x, t.y) for t in tiles] == [(700, 300)]


def test_read_ahead_is_tight_and_passes_errors_on_in_order() -> None:
    from concurrent.futures import ThreadPoolExecutor

    started: list[int] = []

    def read(tile: TileSpec) -> int:
        started.append(tile.x)
        if tile.x == 7:
            raise SlideError("tile 7 is broken")
        return tile.x

    seen: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        for tile, future in _read_ahead(pool, read, [TileSpec(i, 0, 1) for i in range(12)], ahead=3):
            assert len(started) <= len(seen) + 3
            try:
                seen.append(future.result())
            except SlideError:
                seen.append(-tile.x)
    assert seen == [0, 1, 2, 3, 4, 5, 6, -7, 8, 9, 10, 11]


def test_a_damaged_member_of_a_zip_is_left_out_and_the_rest_assessed(tmp_path: Path) -> None:
    names = ["Case-1-A1-0-0.jpg", "Case-1-A1-1024-0.jpg", "Case-1-A1-0-1024.jpg"]
    folder = _tile_set(tmp_path / "tiles", names)
    archive = tmp_path / "slide.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            zf.write(folder / name, name)
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("Case-1-A1-0-1024.jpg")
    body = info.header_offset + 30 + len(info.filename)  # the local header is 30 bytes plus the name
    data[body + 20 : body + 40] = bytes(20)  # corrupt the deflate stream: zlib.error or a CRC error
    archive.write_bytes(bytes(data))
    summary = assess_slide(archive, ColourStub(), _config(), tmp_path / "out", progress=False).summary
    assert summary["tiles"] == 2
    assert summary["tiling"]["unreadable_tiles"] == 1
    assert "cannot read Case-1-A1-0-1024.jpg from the zip" in summary["tiling"]["unreadable_examples"][0]


def test_a_damaged_zip_is_named_as_a_zip(tmp_path: Path) -> None:
    broken = tmp_path / "tiles.zip"
    broken.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(SlideError, match=r"tiles\.zip: not a readable zip archive"):
        assess_slide(broken, ColourStub(), _config(), tmp_path / "out", progress=False)


def test_resource_forks_are_ignored_and_duplicate_positions_refused(tmp_path: Path) -> None:
    folder = _tile_set(tmp_path / "tiles", ["Case-1-A1-0-0.jpg", "Case-1-A1-1024-0.jpg"])
    (folder / "._Case-1-A1-0-0.jpg").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    summary = assess_slide(folder, ColourStub(), _config(), tmp_path / "out", progress=False).summary
    assert summary["tiles"] == 2
    _tile(COLOURS["Viable-Tumor"], 9).save(folder / "Case-1-A1-0-0.png")
    with pytest.raises(
        SlideError, match=r"1 tile positions are given twice.*Case-1-A1-0-0\.jpg and Case-1-A1-0-0\.png"
    ):
        assess_slide(folder, ColourStub(), _config(), tmp_path / "out", progress=False)


def test_an_impossible_scale_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match=r"a 1024 um tile spans 0 px; expected at least 16 px"):
        assess_slide(_slide(tmp_path), ColourStub(), _config(mpp=5000.0), tmp_path / "out", progress=False)


def test_a_plain_image_between_pillows_limit_and_ours_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "section.png"
    Image.fromarray(compose_layout(LAYOUT, _colour_tiles, TILE)).save(image)  # 512 x 384 = 196,608 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # Pillow refuses above twice this
    summary = assess_slide(
        image, ColourStub(), _config(mpp=MPP, max_image_pixels=1_000_000), tmp_path / "out", progress=False
    ).summary
    assert summary["tiles"] == 17
    assert Image.MAX_IMAGE_PIXELS == 50_000  # restored


def test_qupath_coordinates_are_relative_to_the_scanned_area() -> None:
    from bonetumor.slide.exports import TileRow, qupath_features

    row = TileRow(TileSpec(5000, 7000, 1024), "Viable-Tumor", dict.fromkeys(CLASSES, 1 / 3), False, "", 0.9)
    feature = qupath_features([row], CLASSES, origin=(4000, 6500))["features"][0]
    assert feature["geometry"]["coordinates"][0][0] == [1000, 500]
