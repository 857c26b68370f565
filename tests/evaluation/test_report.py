"""The README's measured block is written from a run's outputs, and the weights command says what it did."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from bonetumor.cli.main import app
from bonetumor.errors import ArtifactError
from bonetumor.evaluation.report import BEGIN, END, measured_markdown, update_readme
from bonetumor.utils import write_json


def fold_summary(mean: float, low: float, high: float) -> dict[str, object]:
    return {"n": 3, "mean": mean, "ci_low": low, "ci_high": high, "level": 0.95}


def scores(accuracy: float, f1: float, fold_f1: float, coverage: float, bound: bool = False) -> dict[str, object]:
    return {
        "cpu_ms_per_tile": 12.5,
        "accuracy": accuracy,
        "f1_macro": f1,
        "fold_f1_macro_mean": fold_f1,
        "fold_summary": {"f1_macro": fold_summary(fold_f1, max(0.0, fold_f1 - 0.2), min(1.0, fold_f1 + 0.2))},
        "calibration": {"temperature": 1.7, "temperature_at_bound": bound},
        "referral": {
            "coverage": coverage,
            "accepted_accuracy": 0.95,
            "confidence_threshold": 0.8,
            "accepted_error_upper": 0.21,
            "max_error": 0.25,
        },
    }


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    out = tmp_path / "outputs"
    write_json(
        out / "evaluate" / "comparison.json",
        {
            "ranking": ["resnet50", "vgg19"],
            "candidates": ["ensemble"],
            "init": {"resnet50": "scratch (no ImageNet weights available)", "vgg19": "imagenet (vgg19-dcbb9e9d.pth)"},
            "baseline": {"name": "baseline", "fold_f1_macro_mean": 0.8},
            "beats_baseline": {"resnet50": True, "vgg19": False, "ensemble": True},
            "scores": {
                "baseline": scores(0.81, 0.80, 0.80, 0.5),
                "resnet50": scores(0.86, 0.85, 0.84, 0.6),
                "vgg19": scores(0.71, 0.70, 0.69, 0.3, bound=True),
                "ensemble": scores(0.83, 0.82, 0.81, 0.4),
            },
        },
    )
    write_json(
        out / "register" / "champion.json",
        {"version": "4", "arch": "resnet50", "alias": "champion", "gate": {"reason": "no champion yet; ok"}},
    )
    return out


def test_the_block_states_every_model_the_bar_and_the_gate(outputs: Path) -> None:
    block = measured_markdown(outputs, demo_time="12 min 40 s")
    rows = [line for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| baseline", "| resnet50", "| vgg19", "| ensemble"]
    assert "| resnet50 | scratch (no ImageNet weights available) | 0.860 | 0.850 | 0.840 [0.64, 1.00] | yes |" in block
    assert "| vgg19 | imagenet (vgg19-dcbb9e9d.pth) | 0.710 | 0.700 | 0.690 [0.49, 0.89] | **no** |" in block
    assert "version 4 (resnet50) as `@champion`. Gate: no champion yet; ok." in block
    assert "accepts 0.60 of the out-of-fold tiles" in block
    assert "Temperature fit at its bound (unreliable calibration): vgg19." in block
    assert "12 min 40 s" in block


def test_the_readme_block_is_replaced_and_nothing_else(outputs: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{BEGIN}\nold figures\n{END}\nafter\n")
    update_readme(readme, measured_markdown(outputs))
    text = readme.read_text()
    assert text.startswith(f"# Title\n\nbefore\n{BEGIN}\nOut-of-fold predictions")
    assert text.endswith(f"{END}\nafter\n")
    assert "old figures" not in text
    readme.write_text("no markers\n")
    with pytest.raises(ArtifactError, match=r"no .* block"):
        update_readme(readme, "x")


def test_an_incomplete_run_is_named(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"comparison\.json"):
        measured_markdown(tmp_path)


def test_report_and_weights_commands(outputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    printed = runner.invoke(app, ["report", "--outputs", str(outputs)])
    assert printed.exit_code == 0, printed.output
    assert "| baseline | - |" in printed.output
    # Offline, fetching weights fails with the reason and where the file would go, not a traceback.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import urllib.error

    import torch.hub

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    fetched = runner.invoke(app, ["weights", "fetch", "resnet50"])
    assert fetched.exit_code == 1
    assert "cannot download the ImageNet weights of resnet50" in fetched.output
    assert "no route to host" in fetched.output
