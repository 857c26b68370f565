import json
import math
import shutil
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASSES, DatasetFactory, tiny_params
from mlflow.tracking import MlflowClient
from tiny_arch import register_tiny

from bonetumor.balance.gan import run_balance
from bonetumor.config import Config, SplitConfig, TrainConfig
from bonetumor.data.datasets import TileDataset, label_indices, split_tables
from bonetumor.data.ingest import ingest, run_ingest
from bonetumor.data.manifest import MANIFEST_FILE, read_manifest, resolve_paths
from bonetumor.data.split import FOLDS_FILE, make_folds, run_split
from bonetumor.errors import ConfigError
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.evaluation.metrics import macro_f1
from bonetumor.training.candidates import (
    KINDS,
    Candidate,
    CandidateUnavailableError,
    FitContext,
    FittedModel,
    FoldData,
    TrainingSet,
)
from bonetumor.training.cross_validation import early_stopping_split, run_cross_validation
from bonetumor.training.engine import _improved, eval_dataset, fit, predict_logits, select_device, training_dataset
from bonetumor.training.models import build_model
from bonetumor.transforms.augment import POLICY_FILE, AugmentPolicy, run_augment
from bonetumor.transforms.tta import TestTimeViews


@pytest.mark.slow
def test_known_answer_the_loop_learns_a_clear_class_signal(make_dataset: DatasetFactory, tmp_path: Path) -> None:
    # Generated tiles whose class is their colour: held-out slides must be classified (almost) perfectly.
    source = make_dataset(per_slide=8, slides=4, size=48)
    manifest = ingest(source, CLASSES, tmp_path / "manifest.csv")
    folds = make_folds(manifest, SplitConfig(n_folds=2), CLASSES)
    train_rows, val_rows = split_tables(manifest, folds, 0)
    config = Config.from_dict(
        {
            "preprocess": {"tile_size": 40, "input_size": 32},
            "train": {"architectures": ["resnet50"], "steps": 40, "eval_every": 10, "batch_size": 8, "patience": 8},
        }
    )
    policy = AugmentPolicy.from_config(config.augment)
    train_set = training_dataset(
        train_rows.assign(file=list(map(str, resolve_paths(train_rows, tmp_path)))), config, policy
    )
    val_set = eval_dataset(resolve_paths(val_rows, tmp_path), list(val_rows["label"]), config)
    views = TestTimeViews.from_config(config.preprocess)
    torch.manual_seed(0)
    model = build_model("resnet50", 3, dropout=0.2)
    result = fit(model, train_set, val_set, config.train, torch.device("cpu"), 40, "known-answer", views=views)

    predictions = predict_logits(result.model, val_set, config.train, torch.device("cpu"), views).argmax(1)
    accuracy = float(np.mean(predictions == np.array(val_set.labels)))
    assert accuracy >= 0.95, result.history
    assert result.best_step in {h["step"] for h in result.history}
    assert [h["step"] for h in result.history][:2] == [10, 20]
    assert {"train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr"} <= set(result.history[0])


def test_improvement_rule_breaks_macro_f1_ties_on_loss() -> None:
    best = {"val_macro_f1": 0.5, "val_loss": 1.0}
    assert _improved({"val_macro_f1": 0.6, "val_loss": 2.0}, best, "val_macro_f1")
    assert _improved({"val_macro_f1": 0.5, "val_loss": 0.9}, best, "val_macro_f1")  # tie broken by loss
    assert not _improved({"val_macro_f1": 0.5, "val_loss": 1.1}, best, "val_macro_f1")
    assert not _improved({"val_macro_f1": 0.9, "val_loss": 1.1}, best, "val_loss")


class ConstantLogits(torch.nn.Module):
    """Uniform logits from one bias: on a balanced batch its gradient is exactly zero, so nothing ever improves."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 3)


@pytest.fixture
def small_sets(make_dataset: DatasetFactory, tmp_path: Path) -> tuple[Config, TileDataset]:
    manifest = ingest(make_dataset(per_slide=1, slides=2, size=32), CLASSES, tmp_path / "manifest.csv")
    config = Config.from_dict(
        {
            "preprocess": {"tile_size": 32, "input_size": 32},
            "train": {"patience": 1, "batch_size": 8, "eval_every": 1, "warmup_fraction": 0},
        }
    )
    return config, eval_dataset(resolve_paths(manifest, tmp_path), list(manifest["label"]), config)


def test_patience_stops_after_that_many_evaluations_without_improvement(
    small_sets: tuple[Config, TileDataset],
) -> None:
    config, data = small_sets
    result = fit(ConstantLogits(), data, data, config.train, torch.device("cpu"), 5, "patience")
    assert result.stopped_early
    assert [h["step"] for h in result.history] == [1, 2]
    assert result.best_step == 1


def test_the_best_epochs_weights_are_restored(small_sets: tuple[Config, TileDataset]) -> None:
    config, data = small_sets
    torch.manual_seed(0)
    result = fit(
        build_model("resnet50", 3),
        data,
        data,
        config.train.__class__(patience=5, lr=1e-3, eval_every=1),
        torch.device("cpu"),
        4,
        "best",
    )
    logits = torch.from_numpy(predict_logits(result.model, data, config.train, torch.device("cpu")))
    loss = float(torch.nn.functional.cross_entropy(logits, torch.tensor(data.labels)))
    assert loss == pytest.approx(result.history[result.best_step - 1]["val_loss"], rel=1e-5)


def test_cuda_requested_without_a_gpu_is_a_config_error() -> None:
    if torch.cuda.is_available():
        assert select_device("cuda").type == "cuda"
    else:
        with pytest.raises(ConfigError, match="no CUDA device"):
            select_device("cuda")
    assert select_device("cpu").type == "cpu"


def test_refit_follows_the_folds_learning_rate_schedule(small_sets: tuple[Config, TileDataset]) -> None:
    _, data = small_sets
    train_config = TrainConfig(lr=1e-3, scheduler="cosine", steps=6, eval_every=1, warmup_fraction=0)
    # A 2-step refit of a 6-step recipe uses the folds' first two learning rates, not a 2-step annealing.
    result = fit(ConstantLogits(), data, None, train_config, torch.device("cpu"), 2, "refit", schedule_steps=6)
    assert [h["lr"] for h in result.history] == pytest.approx([1e-3, 1e-3 * (1 + math.cos(math.pi / 6)) / 2])
    assert result.best_step == 2  # without validation the last step is kept


def test_early_stopping_tiles_are_whole_real_slides_and_synthetic_tiles_stay_in_training(
    make_dataset: DatasetFactory, tmp_path: Path
) -> None:
    manifest = ingest(make_dataset(per_slide=2, slides=4, size=32), CLASSES, tmp_path / "manifest.csv")
    synthetic = manifest.head(3).assign(slide="synthetic-fold-0", case="synthetic", synthetic=True)
    table = pd.concat([manifest.assign(synthetic=False), synthetic], ignore_index=True)
    config = Config.from_dict({"train": {"inner_val_fraction": 0.25}})
    fit_rows, stop_rows = early_stopping_split(table, config, seed=0)
    assert stop_rows is not None
    assert not stop_rows["synthetic"].any()
    assert fit_rows["synthetic"].sum() == 3
    assert not set(fit_rows["slide"]) & set(stop_rows["slide"])
    assert len(fit_rows) + len(stop_rows) == len(table)
    no_stop = Config.from_dict({"train": {"inner_val_fraction": 0}})
    assert early_stopping_split(table, no_stop, seed=0) == (table, None)


# --- the loop over candidates ----------------------------------------------------------------------------------


class MajorityFitted:
    """Predicts its training set's most common class: a known answer for every fold."""

    def __init__(self, index: int, n_classes: int) -> None:
        self.index, self.n_classes = index, n_classes

    def logits(self, files: Sequence[Path]) -> np.ndarray:
        out = np.full((len(files), self.n_classes), -5.0, dtype=np.float32)
        out[:, self.index] = 5.0
        return out

    def latency_ms(self, tile_size: int, batch: int) -> float:
        return 0.25

    def metrics(self) -> dict[str, float]:
        return {"majority_index": float(self.index)}

    def tags(self) -> dict[str, str]:
        return {"bonetumor.majority": CLASSES[self.index]}

    def export(
        self, out_dir: Path, provenance: Mapping[str, Any] | None = None, referral: ReferralPolicy | None = None
    ) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "majority.txt").write_text(CLASSES[self.index])
        return out_dir


class MajorityCandidate(Candidate):
    """A model added the way the protocol promises: one class and one entry in KINDS."""

    kind: ClassVar[str] = "majority"

    def __init__(self, fail_on_fold: int | None = None) -> None:
        super().__init__("majority" if fail_on_fold is None else "picky")
        self.fail_on_fold = fail_on_fold

    def fit(self, data: TrainingSet, context: FitContext, bases: Mapping[str, FittedModel]) -> MajorityFitted:
        if isinstance(data, FoldData) and data.fold == self.fail_on_fold:
            raise CandidateUnavailableError(f"no tiles it likes in {data.name}")
        counts = data.real_rows["label"].value_counts()
        top = sorted(counts[counts == counts.max()].index)[0]
        return MajorityFitted(CLASSES.index(top), len(CLASSES))


@pytest.fixture
def stage_inputs(make_dataset: DatasetFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Ingest, split, augment and balance outputs of a small generated data set, with two tiny architectures."""
    register_tiny(monkeypatch, "tiny_a")
    register_tiny(monkeypatch, "tiny_b")
    # Unbalanced on purpose: the majority class is then a known answer per fold.
    source = make_dataset(per_slide=2, slides=4, size=40)
    for extra in sorted((source / "Viable-Tumor").glob("*.jpg"))[:4]:
        shutil.copy(extra, extra.with_name(extra.stem.replace("-P1-", "-P2-") + ".jpg"))
    params = tiny_params(
        data={"source": str(source)},
        balance={"enabled": False},
        train={
            "architectures": ["tiny_a", "tiny_b"],
            "weights": "none",
            "steps": 4,
            "eval_every": 2,
            "progress": False,
            "device": "cpu",
        },
        evaluate={"gradcam_per_class": 1},
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "cv"},
    )
    config = Config.from_dict(params)
    out = tmp_path / "outputs"
    run_ingest(config, tmp_path, out / "ingest")
    manifest = out / "ingest" / MANIFEST_FILE
    run_split(config, manifest, out / "split")
    run_augment(config, manifest, out / "augment")
    run_balance(config, manifest, out / "split" / FOLDS_FILE, out / "balance", project_dir=tmp_path)
    return {
        "config": config,
        "manifest_path": manifest,
        "folds_path": out / "split" / FOLDS_FILE,
        "policy_path": out / "augment" / POLICY_FILE,
        "balance_dir": out / "balance",
        "out_dir": out / "train",
        "project_dir": tmp_path,
    }


def test_every_candidate_goes_through_the_same_loop(
    stage_inputs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(KINDS, "majority", lambda config: [MajorityCandidate(), MajorityCandidate(fail_on_fold=1)])
    runs = run_cross_validation(**stage_inputs)
    out: Path = stage_inputs["out_dir"]
    manifest = read_manifest(stage_inputs["manifest_path"])
    folds = json.loads(stage_inputs["folds_path"].read_text())

    # Sections by role; the loop named none of them.
    assert list(runs["architectures"]) == ["tiny_a", "tiny_b"]
    assert set(runs["candidates"]) == {"ensemble", "majority"}
    assert runs["candidates"]["ensemble"]["members"] == ["tiny_a", "tiny_b"]
    assert runs["candidates_skipped"] == {"picky": "fold 1: no tiles it likes in fold-1"}
    assert not (out / "picky").exists()
    assert set(runs["latency_ms"]) == {"baseline", "tiny_a", "tiny_b", "ensemble", "majority"}
    assert runs["latency_ms"]["majority"] == 0.25
    latency = runs["latency_ms"]
    assert all(math.isfinite(v) and v > 0 for v in latency.values())
    # The ensemble runs both members: it costs exactly what they reported.
    assert latency["ensemble"] == pytest.approx(latency["tiny_a"] + latency["tiny_b"])

    names = ["baseline", "tiny_a", "tiny_b", "ensemble", "majority"]
    oofs = {name: pd.read_csv(out / name / "oof.csv") for name in names}
    for name, oof in oofs.items():
        # Every tile scored exactly once, by the fold that held it out.
        assert sorted(oof["path"]) == sorted(manifest["path"]), name
        for fold in folds["folds"]:
            held = set(oof.loc[oof["fold"] == fold["fold"], "slide"])
            assert held == set(fold["val_groups"]), name

    # Known answer: the majority model predicts each fold's most common training class.
    for fold in folds["folds"]:
        train_rows = manifest[~manifest["slide"].isin(fold["val_groups"])]
        counts = train_rows["label"].value_counts()
        expected = sorted(counts[counts == counts.max()].index)[0]
        predicted = set(oofs["majority"].loc[oofs["majority"]["fold"] == fold["fold"], "prediction"])
        assert predicted == {expected}

    # The ensemble is the mean of its members' probabilities, tile by tile.
    probs = [f"prob_{c}" for c in CLASSES]
    mean = (oofs["tiny_a"][probs].to_numpy() + oofs["tiny_b"][probs].to_numpy()) / 2
    np.testing.assert_allclose(oofs["ensemble"][probs].to_numpy(), mean, atol=1e-6)

    # The refit length is the median of the folds' best steps.
    for arch in ("tiny_a", "tiny_b"):
        best = [f["best_step"] for f in runs["architectures"][arch]["folds"]]
        assert runs["architectures"][arch]["refit_steps"] == max(1, math.ceil(statistics.median(best)))
        assert (out / arch / "learning_curves.png").is_file()
        assert sorted(p.name for p in (out / arch / "gradcam").glob("*.png")) == ["fold-0.png", "fold-1.png"]

    # MLflow: a parent run per candidate with one nested run per fold, whose fold_macro_f1 is the OOF file's.
    client = MlflowClient()
    for name in names:
        parent = runs["baseline"] if name == "baseline" else {**runs["architectures"], **runs["candidates"]}[name]
        children = client.search_runs(
            [runs["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'"
        )
        assert sorted(r.data.params["fold"] for r in children) == ["0", "1"], name
        oof = oofs[name]
        for child in children:
            rows = oof[oof["fold"] == int(child.data.params["fold"])]
            recomputed = macro_f1(label_indices(rows["label"], CLASSES), label_indices(rows["prediction"], CLASSES))
            assert child.data.metrics["fold_macro_f1"] == pytest.approx(recomputed), name
    assert runs["baseline"]["fold_macro_f1"] == pytest.approx(
        [
            macro_f1(label_indices(r["label"], CLASSES), label_indices(r["prediction"], CLASSES))
            for _, r in oofs["baseline"].groupby("fold")
        ]
    )
