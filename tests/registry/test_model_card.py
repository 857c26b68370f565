"""Model cards: the pure builder on known figures; logging, lookup and rebuilding on a real sqlite MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import card_fixtures
import mlflow
import pytest
from bento_server import MODEL_NAME, register_model, write_registry_project
from mlflow.tracking import MlflowClient
from scipy.stats import binomtest
from typer.testing import CliRunner

from bonetumor.cli.main import app
from bonetumor.errors import ArtifactError
from bonetumor.registry.model_card import (
    CARD_TAG,
    CardSources,
    build_model_card,
    read_card_sources,
    stored_card,
    wilson_interval,
    write_model_card,
)
from bonetumor.registry.model_registry import resolve_version
from bonetumor.stages import model_card_of

MITCHELL = [
    "Model details",
    "Intended use",
    "Factors",
    "Metrics",
    "Training and evaluation data",
    "Quantitative analyses",
    "Calibration and referral",
    "Ethical considerations",
    "Caveats and recommendations",
    "Changes since the previous champion",
]


def headings(markdown: str) -> list[str]:
    return [line.removeprefix("## ") for line in markdown.splitlines() if line.startswith("## ")]


def section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_card_has_mitchells_sections_and_says_what_the_model_is_not_for() -> None:
    card = build_model_card(card_fixtures.sources())
    markdown = card.to_markdown()
    assert markdown.startswith("# Model card: bone-tumor-classifier version 3 (resnet50)")
    assert headings(markdown) == MITCHELL
    use = section(markdown, "Intended use")
    assert "Decision support" in use
    assert "refers" in use
    assert "**Not for:**" in use
    assert "without a pathologist's review" in use
    data = section(markdown, "Training and evaluation data")
    assert "30 real tiles (Non-Tumor 10, Non-Viable-Tumor 10, Viable-Tumor 10) from 12 slides of 4 patients" in data
    assert "`git checkout abc1234 && dvc checkout data/sample.dvc`" in data
    assert "transfer learning from ImageNet weights (`imagenet (IMAGENET1K_V2)`)" in section(markdown, "Model details")


def test_the_recipe_is_read_from_the_training_params() -> None:
    recipe = {"optimizer": "adamw", "lr": 0.002, "scheduler": "onecycle", "weight_decay": 0.05}
    recipe |= {"label_smoothing": 0.1, "batch_size": 16, "trainable": "top", "head_steps": 40}
    details = section(build_model_card(card_fixtures.sources(training=recipe)).to_markdown(), "Model details")
    assert "adamw at lr 0.002 with a onecycle schedule, weight decay 0.05" in details
    assert "label smoothing 0.1, batch 16, training the top block and the head, the head alone for 40 steps" in details
    unrecorded = section(build_model_card(card_fixtures.sources()).to_markdown(), "Model details")
    assert "the recipe was not recorded with this card" in unrecorded


def test_per_class_intervals_are_wilson_intervals_of_the_pooled_confusion_matrix() -> None:
    markdown = build_model_card(card_fixtures.sources()).to_markdown()
    table = section(markdown, "Quantitative analyses").split("**This model, per class**", 1)[1]
    # Non-Viable-Tumor: 6 of its 10 tiles recalled; 6 of the 8 tiles predicted as it are right.
    recall = binomtest(6, 10).proportion_ci(confidence_level=0.95, method="wilson")
    precision = binomtest(6, 8).proportion_ci(confidence_level=0.95, method="wilson")
    row = next(line for line in table.splitlines() if line.startswith("| Non-Viable-Tumor |"))
    assert f"0.750 [{precision.low:.3f}, {precision.high:.3f}] (6/8)" in row
    assert f"0.600 [{recall.low:.3f}, {recall.high:.3f}] (6/10)" in row
    assert "0.700 [0.500, 0.900]" in row  # the per-fold recall interval, from the grouped folds
    assert wilson_interval(0, 0, 0.95) is None


def test_the_baseline_stands_beside_the_model_and_losing_to_it_is_a_caveat() -> None:
    winning = build_model_card(card_fixtures.sources()).to_markdown()
    figures = section(winning, "Quantitative analyses")
    assert "| mean per-fold macro-F1 | 0.710 [0.590, 0.810] | 0.620 [0.500, 0.720] |" in figures
    assert "**Baseline, per class**" in figures
    assert "Baseline: a random forest of 500 trees on RGB and HSV histograms, 16 bins per channel" in figures
    assert "vgg19_bn mean per-fold macro-F1 0.550" in figures
    assert "does **not** beat the colour-histogram baseline" not in winning
    losing = build_model_card(
        card_fixtures.sources(baseline=card_fixtures.report(f1_mean=0.9, accuracy=0.9))
    ).to_markdown()
    assert "does **not** beat the colour-histogram baseline" in section(losing, "Caveats and recommendations")


def test_a_scratch_model_a_missed_referral_target_and_a_kept_back_version_are_said_plainly() -> None:
    scores = card_fixtures.report()
    scores["referral"]["target_met"] = False
    meta = card_fixtures.metadata(init="scratch (no ImageNet weights available)")
    markdown = build_model_card(
        card_fixtures.sources(
            scores=scores, metadata=meta, gate={"promoted": False, "reason": "macro-F1 0.6 is below 0.7"}
        )
    ).to_markdown()
    assert "**from scratch**" in section(markdown, "Model details")
    assert "- **Targets met**: no. The rule could not reach" in section(markdown, "Calibration and referral")
    assert "a tile is answered when its calibrated confidence is at least 0.620" in markdown
    scores["referral"]["coverage"] = 0.0
    nothing = build_model_card(card_fixtures.sources(scores=scores)).to_markdown()
    assert "**every tile is referred** to a pathologist" in section(nothing, "Calibration and referral")
    caveats = section(markdown, "Caveats and recommendations")
    assert "It was trained from scratch" in caveats
    assert "did not make it the champion: macro-F1 0.6 is below 0.7" in caveats
    assert "did not meet its targets" in caveats


def test_changes_since_the_previous_champion_mark_what_changed() -> None:
    first = build_model_card(card_fixtures.sources()).to_markdown()
    assert "No version held the champion alias" in section(first, "Changes since the previous champion")
    previous = {
        "version": "2",
        "fold_f1_macro_mean": 0.65,
        "target_recall": 0.88,
        "arch": "resnet50",
        "init": "imagenet (IMAGENET1K_V2)",
        "data_version": "data-0",
        "params_hash": "p-new",
        "git_commit": "0ld0000",
        "folds_digest": "folds-1",
    }
    changes = section(
        build_model_card(card_fixtures.sources(previous=previous)).to_markdown(), "Changes since the previous champion"
    )
    assert "Compared with version 2" in changes
    assert "| mean per-fold macro-F1 | 0.650 | 0.710 |" in changes
    assert "| data version | `data-0` | `data-1` **(changed)** |" in changes
    assert "| git commit | `0ld0000` | `abc1234` **(changed)** |" in changes
    assert "| architecture | `resnet50` | `resnet50` |" in changes
    assert "| params hash | `p-new` | `p-new` |" in changes


def test_the_metadata_uses_monai_bundle_keys() -> None:
    metadata = build_model_card(card_fixtures.sources()).to_metadata()
    json.dumps(metadata)  # plain JSON
    for key in ("version", "changelog", "task", "description", "data_source", "label_classes", "eval_metrics"):
        assert key in metadata, key
    assert metadata["label_classes"] == {"0": "Non-Tumor", "1": "Non-Viable-Tumor", "2": "Viable-Tumor"}
    assert metadata["pytorch_version"] == "2.13.0"
    image = metadata["network_data_format"]["inputs"]["image"]
    assert (image["num_channels"], image["spatial_shape"], image["is_patch_data"]) == (3, [224, 224], True)
    assert metadata["eval_metrics"]["fold_f1_macro_ci"] == pytest.approx([0.59, 0.81])
    assert metadata["eval_metrics"]["baseline_fold_f1_macro_mean"] == 0.62
    assert metadata["changelog"] == {"3": "registered as @champion; no champion to compare with"}


def test_sources_round_trip_and_a_damaged_file_is_named(tmp_path: Path) -> None:
    sources = card_fixtures.sources()
    folder = write_model_card(build_model_card(sources), sources, tmp_path / "card")
    assert read_card_sources(folder / "card_sources.json") == sources
    assert (folder / "model_card.md").read_text() == build_model_card(sources).to_markdown()
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": {')
    with pytest.raises(ArtifactError, match=r"broken\.json: cannot read the model card sources"):
        read_card_sources(broken)
    with pytest.raises(ArtifactError, match=r"missing field\(s\) \['baseline'"):
        CardSources.from_dict({k: v for k, v in sources.to_dict().items() if k != "baseline"}, source="x")
    with pytest.raises(ArtifactError, match="model is missing"):
        build_model_card(card_fixtures.sources(model={"name": "m"}))


@pytest.mark.integration
def test_a_registered_card_is_found_and_an_older_version_gets_one_rebuilt_and_logged(tmp_path: Path) -> None:
    write_registry_project(tmp_path)
    with_card = register_model(tmp_path, seed=0, onnx=False)
    older = register_model(tmp_path, seed=1, alias="challenger", onnx=False, card=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        found = stored_card(resolve_version(MODEL_NAME, with_card))
        assert found is not None
        markdown, metadata = found
        assert markdown.startswith(f"# Model card: {MODEL_NAME} version {with_card} ")
        assert metadata["version"] == with_card
        assert stored_card(resolve_version(MODEL_NAME, older)) is None
        # The older version: its tags name the cross-validation run, which holds the evaluation report.
        client = MlflowClient()
        with mlflow.start_run(run_name="cv-resnet50") as cv:
            mlflow.log_dict(card_fixtures.report(), "evaluation/resnet50.json")
        for key, value in {"bonetumor.arch": "resnet50", "bonetumor.cv_run_id": cv.info.run_id}.items():
            client.set_model_version_tag(MODEL_NAME, older, key, value)
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    params, store = tmp_path / "params.yaml", MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    store.set_model_version_tag(MODEL_NAME, older, "bonetumor.arch", "vgg19_bn")
    with pytest.raises(ArtifactError, match=r"has no evaluation/vgg19_bn\.json"):
        model_card_of(params, older, rebuild=True)
    store.set_model_version_tag(MODEL_NAME, older, "bonetumor.arch", "resnet50")
    result = CliRunner().invoke(app, ["model-card", older, "--params", str(params), "--log"])
    assert result.exit_code == 0, result.output
    assert f"version {older} (resnet50)" in result.output
    assert "| Viable-Tumor | 10 |" in result.output
    assert f"logged with version {older}" in result.output
    logged = model_card_of(params, older)
    assert logged["source"] == "logged"
    assert "Intended use" in logged["markdown"]
    tag = store.get_model_version(MODEL_NAME, older).tags[CARD_TAG]
    assert tag.endswith("/model_card/model_card.md")
    # A card damaged in the artifact store is refused with the run named (the service then serves without it).
    damaged = tmp_path / "model_card.json"
    damaged.write_text("{not json")
    version = store.get_model_version(MODEL_NAME, with_card)
    store.log_artifact(str(version.run_id), str(damaged), "model_card")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with pytest.raises(ArtifactError, match=rf"model card in run {version.run_id} is unreadable"):
            stored_card(version)
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
