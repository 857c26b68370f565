import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASSES, DatasetFactory

from bonetumor.config import Config, SplitConfig, TrainConfig
from bonetumor.data.datasets import TileDataset, split_tables
from bonetumor.data.ingest import ingest
from bonetumor.data.manifest import resolve_paths
from bonetumor.data.split import make_folds
from bonetumor.errors import ConfigError
from bonetumor.training.cross_validation import early_stopping_split
from bonetumor.training.engine import _improved, eval_dataset, fit, predict_logits, select_device, training_dataset
from bonetumor.training.models import build_model
from bonetumor.transforms.augment import AugmentPolicy
from bonetumor.transforms.tta import TestTimeViews


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
