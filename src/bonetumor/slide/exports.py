"""What an assessment writes: the per-tile CSV, the QuPath GeoJSON and the class-map overlay.

The GeoJSON follows QuPath's own export (0.4 and later): a FeatureCollection of ``tile`` objects in level-0
pixel coordinates, each with ``classification`` (name and RGB colour) and ``measurements`` (the probabilities,
the tissue fraction, whether it was referred). QuPath imports it with File > Import objects from file, or by
dragging the file onto the open slide.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bonetumor.slide.sources import TileSpec

#: Class colours (Okabe-Ito, colour-blind safe): necrosis and viable tumour must never be confused on the map.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "Non-Tumor": (0, 114, 178),
    "Non-Viable-Tumor": (240, 228, 66),
    "Viable-Tumor": (204, 0, 102),
}
#: Colour of a class the table above does not name.
OTHER_COLOUR = (128, 128, 128)
#: Opacity of the class colour over the thumbnail.
OVERLAY_ALPHA = 0.5
#: Longest side of each panel of the overlay figure: a 12-inch figure at 110 dpi shows about 650 px per panel,
#: and matplotlib holds each image as float RGBA, so a 2048 px thumbnail cost about 200 MB for nothing.
OVERLAY_PANEL_SIDE = 1024


@dataclass(frozen=True)
class TileRow:
    """One classified tissue tile, as exported.

    Attributes:
        tile: Where it is, in level-0 pixels.
        label: The predicted class.
        probabilities: Class name to probability.
        referred: Whether it is referred to a pathologist.
        reason: Why it is referred (empty when not).
        tissue_fraction: Its tissue share.
    """

    tile: TileSpec
    label: str
    probabilities: dict[str, float]
    referred: bool
    reason: str
    tissue_fraction: float


def colour_of(name: str) -> tuple[int, int, int]:
    """The map colour of a class."""
    return CLASS_COLOURS.get(name, OTHER_COLOUR)


def write_tiles_csv(rows: Sequence[TileRow], classes: Sequence[str], path: Path) -> Path:
    """Write one line per tissue tile: x, y, side (level-0 px), label, referral, tissue, probabilities."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["x", "y", "width", "height", "label", "referred", "referral_reason", "tissue_fraction"]
            + [f"p_{name}" for name in classes]
            + ["source"]
        )
        for row in rows:
            t = row.tile
            writer.writerow(
                [t.x, t.y, t.side, t.side, row.label, int(row.referred), row.reason, f"{row.tissue_fraction:.4f}"]
                + [f"{row.probabilities[name]:.6f}" for name in classes]
                + [t.key]
            )
    return path


def qupath_features(
    rows: Sequence[TileRow], classes: Sequence[str], origin: tuple[int, int] = (0, 0)
) -> dict[str, Any]:
    """The tiles as a GeoJSON FeatureCollection that QuPath imports (see the module docstring).

    Args:
        rows: The classified tiles.
        classes: The model's classes (the measurement names).
        origin: The slide's scanned-area corner (OpenSlide bounds), subtracted because QuPath places objects
            relative to it.
    """
    features = []
    ox, oy = origin
    for index, row in enumerate(rows):
        t = row.tile
        x, y = t.x - ox, t.y - oy
        ring = [[x, y], [x + t.side, y], [x + t.side, y + t.side], [x, y + t.side], [x, y]]
        measurements = {f"P({name})": round(row.probabilities[name], 6) for name in classes}
        measurements |= {"Tissue fraction": round(row.tissue_fraction, 4), "Referred": int(row.referred)}
        features.append(
            {
                "type": "Feature",
                "id": f"tile-{index}",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": f"{row.label}{' (referred)' if row.referred else ''}",
                    "classification": {"name": row.label, "color": list(colour_of(row.label))},
                    "isLocked": True,
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(
    rows: Sequence[TileRow], classes: Sequence[str], path: Path, origin: tuple[int, int] = (0, 0)
) -> Path:
    """Write :func:`qupath_features` to ``path``."""
    path.write_text(json.dumps(qupath_features(rows, classes, origin)), encoding="utf-8")
    return path


def class_map(thumbnail: Image.Image, dimensions: tuple[int, int], rows: Sequence[TileRow]) -> Image.Image:
    """The thumbnail with each tissue tile filled in its class colour; referred tiles outlined in black."""
    scale = thumbnail.width / dimensions[0]
    base = thumbnail.convert("RGB")
    colours = Image.new("RGB", base.size, (0, 0, 0))
    mask = Image.new("L", base.size, 0)
    draw_c, draw_m = ImageDraw.Draw(colours), ImageDraw.Draw(mask)
    boxes = []
    for row in rows:
        t = row.tile
        box = (
            round(t.x * scale),
            round(t.y * scale),
            max(round(t.x * scale), round((t.x + t.side) * scale) - 1),
            max(round(t.y * scale), round((t.y + t.side) * scale) - 1),
        )
        draw_c.rectangle(box, fill=colour_of(row.label))
        draw_m.rectangle(box, fill=round(255 * OVERLAY_ALPHA))
        boxes.append((box, row.referred))
    blended = Image.composite(colours, base, mask)
    outline = ImageDraw.Draw(blended)
    for box, referred in boxes:
        if referred:
            outline.rectangle(box, outline=(0, 0, 0), width=max(1, (box[2] - box[0]) // 14))
    return blended


def write_overlay(
    thumbnail: Image.Image,
    dimensions: tuple[int, int],
    rows: Sequence[TileRow],
    classes: Sequence[str],
    summary: Mapping[str, Any],
    path: Path,
) -> Path:
    """Write the class map beside the thumbnail, with a legend and the estimate in the title."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    scale = OVERLAY_PANEL_SIDE / max(thumbnail.size)
    if scale < 1:
        thumbnail = thumbnail.resize(
            (max(1, round(thumbnail.width * scale)), max(1, round(thumbnail.height * scale))), Image.Resampling.BOX
        )
    mapped = class_map(thumbnail, dimensions, rows)
    aspect = thumbnail.height / thumbnail.width
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.5, 6 * aspect) + 1.2), dpi=110)
    for ax, image, title in zip(axes, (thumbnail, mapped), ("slide", "tile classes"), strict=True):
        ax.imshow(np.asarray(image))
        ax.set_title(title)
        ax.set_axis_off()
    counts = summary.get("tiles_per_class", {})
    handles = [
        Patch(facecolor=_rgb(colour_of(name)), edgecolor="none", label=f"{name} ({counts.get(name, 0)})")
        for name in classes
    ]
    handles.append(Patch(facecolor="none", edgecolor="black", linewidth=2, label="referred to a pathologist"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(_headline(summary), fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.93))
    fig.savefig(path)
    plt.close(fig)
    return path


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    return (colour[0] / 255, colour[1] / 255, colour[2] / 255)


def _headline(summary: Mapping[str, Any]) -> str:
    necrosis = summary.get("necrosis_percent")
    interval = summary.get("necrosis_interval")
    referred = summary.get("referred", {}).get("share", 0.0)
    if necrosis is None:
        return f"{summary.get('name', '')}: no tumour tiles found ({summary.get('tiles', 0)} tissue tiles)"
    span = f" [{interval[0]:.1f}-{interval[1]:.1f}]" if interval else ""
    category = summary.get("response", {}).get("category", "")
    return (
        f"{summary.get('name', '')}: necrosis {necrosis:.1f} %{span}, {category} (estimate), "
        f"{summary.get('tiles', 0)} tissue tiles, {referred:.0%} referred"
    )
