"""``bonetumor assess`` and ``bonetumor demo-slide`` with a registered model from a real sqlite MLflow registry.

The slide is made of the sample's real tiles at their own scale (a 1024 um tile over 256 px), written losslessly,
so every tile the assessment reads is pixel for pixel a sample file: its answer must equal the service's answer
for that file (``ServedModel.answer``), probabilities included.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from bento_server import register_model, write_registry_project
from conftest import REPO
from typer.testing import CliRunner

from bonetumor.cli.main import app
from bonetumor.registry.model_registry import open_served_model
from bonetumor.slide.demo import CELL_CLASSES, layout_counts, sample_tile_source, write_demo_slide

runner = CliRunner()
LAYOUT = ("N.XV", "XVVN", "..XV")


@pytest.mark.slow
def test_assess_answers_each_tile_as_the_service_answers_its_file(tmp_path: Path, sample_images: Path) -> None:
    write_registry_project(tmp_path)
    register_model(tmp_path, seed=3, onnx=False)
    slide = write_demo_slide(tmp_path / "slide.tif", sample_tile_source(sample_images), LAYOUT)
    out = tmp_path / "out"

    result = runner.invoke(
        app, ["assess", str(slide), "--out", str(out), "--params", str(tmp_path / "params.yaml"), "--json"]
    )

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["tiles"] == sum(layout_counts(LAYOUT).values())
    assert summary["model"]["version"] == "1"
    assert (out / "config.resolved.yaml").is_file()
    # Which sample file each cell holds: sample_tile_source hands each class's files out in name order.
    files = {name: sorted((sample_images / name).glob("*.jpg")) for name in CELL_CLASSES.values()}
    used = {name: 0 for name in files}
    cell_file = {}
    for r, row in enumerate(LAYOUT):
        for c, code in enumerate(row):
            if code in CELL_CLASSES:
                name = CELL_CLASSES[code]
                cell_file[(c * 256, r * 256)] = files[name][used[name]]
                used[name] += 1
    holder, _ = open_served_model(tmp_path / "params.yaml")
    with (out / "tiles.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == summary["tiles"]
    for line in rows:
        expected = holder.current.answer(cell_file[(int(line["x"]), int(line["y"]))].read_bytes())
        assert line["label"] == expected["label"]
        for name, p in expected["probabilities"].items():
            assert float(line[f"p_{name}"]) == pytest.approx(p, abs=1e-5)
        assert int(line["referred"]) == int(expected["referral"]["refer"])


def test_assess_of_a_missing_input_names_it_before_loading_a_model(tmp_path: Path) -> None:
    write_registry_project(tmp_path)  # an empty registry: the input is checked first
    missing = tmp_path / "scan.svs"
    result = runner.invoke(
        app, ["assess", str(missing), "--out", str(tmp_path / "o"), "--params", str(tmp_path / "params.yaml")]
    )
    assert result.exit_code == 1
    assert f"error: {missing}: no such file or folder; expected a whole-slide image" in result.output
    assert "Traceback" not in result.output


def test_assess_refuses_a_negative_scale(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["assess", "x.tif", "--out", str(tmp_path), "--mpp", "-1", "--params", str(REPO / "params.yaml")]
    )
    assert result.exit_code == 1
    assert "--mpp -1.0: expected microns per pixel above 0" in result.output


def test_demo_slide_writes_the_sample_layout(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo-slide", str(tmp_path / "demo.tif"), "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "the layout's necrosis is 53.49 %" in result.output
    assert (tmp_path / "demo.tif").stat().st_size > 100_000
