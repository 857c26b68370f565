"""The training recipe of bonetumor.engine.fit on a tiny registered architecture and tiny generated tiles."""

from __future__ import annotations

import itertools
import logging
import math
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASS_COLOURS, CLASSES, write_tile
from mlflow.tracking import MlflowClient
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import TensorDataset
from torchvision import models as tvm

from bonetumor import faults
from bonetumor.config import AugmentConfig, Config, TrackingConfig, TrainConfig
from bonetumor.data.datasets import TileDataset
from bonetumor.errors import CheckpointWriteError, ConfigError, DatasetError
from bonetumor.registry.tracking import log_step_metrics, setup_mlflow
from bonetumor.training.engine import (
    FitResult,
    StepBatchSampler,
    channels_last_enabled,
    checkpoint_path,
    class_weights,
    clear_checkpoint,
    fit,
    lr_multiplier,
    predict_logits,
    training_dataset,
)
from bonetumor.training.models import ARCHITECTURES, ArchSpec
from bonetumor.transforms.augment import AugmentPolicy
from bonetumor.transforms.tta import TestTimeViews

CPU = torch.device("cpu")
ARCH = "tiny"


class TinyNet(nn.Module):
    """A backbone (two conv blocks with BatchNorm), a top block, and a GAP -> dropout -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.top = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(0.3), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.top(self.features(x)))


class ConstantLogits(nn.Module):
    """Uniform logits from one bias: on a balanced batch its gradient is exactly zero, so nothing ever improves."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 3)


def _spec(build: Callable[[], nn.Module], head: str, top: str) -> ArchSpec:
    return ArchSpec(
        build=build,
        imagenet_weights=tvm.ResNet50_Weights.DEFAULT,  # never loaded: the tests pass weights directly
        replace_head=lambda model, classes, dropout: None,
        head=lambda model: model.get_submodule(head),
        top_block=lambda model: model.get_submodule(top),
        cam_layer=lambda model: model.get_submodule(top),
    )


@pytest.fixture(autouse=True)
def _tiny_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ARCHITECTURES, ARCH, _spec(TinyNet, "head", "top"))
    monkeypatch.setitem(ARCHITECTURES, "constant", _spec(ConstantLogits, "", ""))


class LabelledTensors(TensorDataset):
    """A TensorDataset with the ``labels`` list that fit reads from a validation set."""

    @property
    def labels(self) -> list[int]:
        return [int(v) for v in self.tensors[1]]


def _tensors(n: int = 24, size: int = 16, seed: int = 0, labels: list[int] | None = None) -> LabelledTensors:
    generator = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels) if labels is not None else torch.arange(n) % 3
    # A learnable signal: the class shifts the mean of one channel.
    x = torch.randn(len(y), 3, size, size, generator=generator)
    x[torch.arange(len(y)), y] += 1.0
    return LabelledTensors(x, y)


@pytest.fixture
def augmented_tiles(tmp_path: Path) -> TileDataset:
    """Twelve 32 px JPEG tiles through the real augmenting training transform (24 px crops, flips, rotations)."""
    files, labels = [], []
    for c, label in enumerate(CLASSES):
        for t in range(4):
            files.append(write_tile(tmp_path / "tiles" / f"{c}-{t}.jpg", CLASS_COLOURS[label], 32, seed=10 * c + t))
            labels.append(label)
    config = Config.from_dict({"preprocess": {"tile_size": 32, "input_size": 32}})
    policy = AugmentPolicy.from_config(
        AugmentConfig(color_jitter=0.0, hue_jitter=0.0, hed_jitter=0.0, stain_normalization="none")
    )
    return training_dataset(pd.DataFrame({"file": files, "label": labels}), config, policy)


def _config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "architectures": ["resnet50"],
        "weights": "pretrained.pt",  # two-phase needs "pretrained" weights; fit itself never reads them
        "batch_size": 8,
        "lr": 1e-2,
        "steps": 4,
        "eval_every": 1,
        "scheduler": "constant",
        "warmup_fraction": 0.0,
        "label_smoothing": 0.0,
        "patience": 10,
        "progress": False,
        "channels_last": "off",
        "seed": 3,
    }
    return TrainConfig(**{**values, **overrides})


def _tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_seconds(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_the_batches_of_a_step_depend_only_on_the_seed_and_the_step() -> None:
    sampler = StepBatchSampler(n=5, batch_size=4, steps=6, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    assert all(len(b) == 4 for b in batches)  # always full, running into the next shuffle
    stream = [i for b in batches for i in b]
    # Consecutive passes are permutations of the 5 tiles: every tile once per pass.
    assert all(sorted(stream[p * 5 : p * 5 + 5]) == list(range(5)) for p in range(4))
    assert stream[:5] != stream[5:10]  # a new shuffle each pass
    resumed = StepBatchSampler(n=5, batch_size=4, steps=6, seed=1, start=3)
    assert list(resumed) == batches[3:]
    assert list(StepBatchSampler(5, 4, 6, seed=2)) != batches
    with pytest.raises(DatasetError, match="empty"):
        StepBatchSampler(0, 4, 6, seed=1)


def test_one_cycle_warms_up_from_a_25th_and_anneals_towards_zero() -> None:
    config = _config(steps=40, scheduler="onecycle", warmup_fraction=0.25, lr=1e-2)
    result = fit(_tiny(), _tensors(n=8), None, config, CPU, 40, "one-cycle")
    rates = [h["lr"] / 1e-2 for h in result.history]
    assert rates[0] == pytest.approx(1 / 25)
    assert max(rates) == pytest.approx(1.0, rel=1e-3)
    peak = rates.index(max(rates))
    assert 8 <= peak <= 10  # at the end of the 10-step warm-up
    assert rates[-1] < 1e-3
    assert all(a <= b for a, b in itertools.pairwise(rates[: peak + 1]))  # rising
    assert all(a >= b for a, b in itertools.pairwise(rates[peak:]))  # then falling


def test_cosine_and_constant_schedules_warm_up_linearly() -> None:
    cosine = [lr_multiplier(done, 10, 2, "cosine") for done in range(10)]
    assert cosine[:2] == pytest.approx([1 / 3, 2 / 3])  # linear warm-up
    assert cosine[2] == pytest.approx(1.0)
    assert cosine[-1] == pytest.approx((1 + math.cos(math.pi * 7 / 8)) / 2)
    assert [lr_multiplier(d, 10, 0, "constant") for d in range(3)] == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="scheduler"):
        lr_multiplier(0, 10, 0, "plateau")


@pytest.mark.parametrize("trainable", ["all", "top"])
def test_two_phase_trains_the_head_first_then_unfreezes_at_the_lower_rate(trainable: str) -> None:
    config = _config(head_steps=2, steps=4, trainable=trainable, scheduler="cosine", finetune_lr_factor=0.1)
    model = _tiny()
    start = {"features": _snapshot(model.features), "top": _snapshot(model.top), "head": _snapshot(model.head)}
    after: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def record(stats: dict[str, float]) -> None:
        after[int(stats["step"])] = {
            "features": _snapshot(model.features),
            "top": _snapshot(model.top),
            "head": _snapshot(model.head),
        }

    result = fit(model, _tensors(), None, config, CPU, 4, "two-phase", record, arch=ARCH)

    for step in (1, 2):  # head phase: the backbone is untouched, BatchNorm running statistics included
        assert _same(after[step]["features"], start["features"])
        assert _same(after[step]["top"], start["top"])
        assert not _same(after[step]["head"], start["head"])
    assert not _same(after[4]["top"], after[2]["top"])
    assert _same(after[4]["features"], start["features"]) == (trainable == "top")
    # Cosine without warm-up over the 4 steps, the rate each step was taken at; backbone at 0.1x.
    multipliers = [(1 + math.cos(math.pi * done / 4)) / 2 for done in range(4)]
    assert [h["lr"] for h in result.history] == pytest.approx([1e-2 * m for m in multipliers])
    assert [h["lr_backbone"] for h in result.history] == pytest.approx([1e-3 * m for m in multipliers])
    # Afterwards the model is frozen as `trainable` says, like a model built with it.
    assert all(p.requires_grad for p in model.top.parameters())
    assert all(p.requires_grad for p in model.features.parameters()) == (trainable == "all")


def test_refit_follows_the_folds_schedule() -> None:
    config = _config(steps=5, scheduler="cosine")
    result = fit(_tiny(), _tensors(n=6), None, config, CPU, 3, "refit", arch=ARCH, schedule_steps=5)
    # Three steps of the 5-step schedule: the rates a fold took its first three steps at.
    assert [h["lr"] for h in result.history] == pytest.approx(
        [1e-2 * (1 + math.cos(math.pi * done / 5)) / 2 for done in range(3)]
    )


def test_early_stopping_waits_for_the_fine_tuning_phase() -> None:
    data = _tensors(n=6, labels=[0, 1, 2, 0, 1, 2])
    config = _config(head_steps=3, steps=7, patience=2, batch_size=6)
    result = fit(ConstantLogits(), data, data, config, CPU, 7, "patience", arch="constant")
    # Nothing ever improves after step 1. Patience 2 would stop after step 3, but that is still the head phase;
    # patience then counts fine-tuning evaluations only (4 and 5), not the stale head-phase ones before them.
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5]
    assert result.stopped_early
    assert result.best_step == 1


def test_early_stopping_neither_stops_nor_chooses_during_the_warm_up() -> None:
    data = _tensors(n=6, labels=[0, 1, 2, 0, 1, 2])
    config = _config(steps=10, patience=1, batch_size=6, warmup_fraction=0.4, eval_every=2)
    result = fit(ConstantLogits(), data, data, config, CPU, 10, "warm-up", arch="constant")
    # Warm-up is 4 steps: the evaluations at steps 2 and 4 are logged but can neither be the best nor stop the
    # run; step 6 is the first candidate, and the stale one at step 8 stops it.
    assert [h["step"] for h in result.history] == [2, 4, 6, 8]
    assert result.best_step == 6
    assert result.stopped_early


def test_every_evaluation_is_logged_to_mlflow_at_its_own_step(tmp_path: Path) -> None:
    setup_mlflow(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t"), tmp_path)
    config = _config(steps=6, eval_every=2, patience=10)
    model, val = _tiny(), _tensors(n=9, seed=1)
    # What the model itself scores on the validation set at each evaluation, recomputed here.
    recomputed: dict[int, tuple[float, float]] = {}

    def log_and_recompute(stats: dict[str, float]) -> None:
        logits = torch.from_numpy(predict_logits(model, val, config, CPU))
        targets = torch.tensor(val.labels)
        loss = float(nn.functional.cross_entropy(logits, targets))
        recomputed[int(stats["step"])] = (loss, float((logits.argmax(1) == targets).float().mean()))
        model.train()
        log_step_metrics(stats)

    with mlflow.start_run() as run:
        result = fit(model, _tensors(), val, config, CPU, 6, "logged", log_and_recompute)

    assert [h["step"] for h in result.history] == [2, 4, 6]  # three evaluations, one every eval_every steps
    client = MlflowClient()
    logged = set(client.get_run(run.info.run_id).data.metrics)
    assert logged == set(result.history[0]) - {"step"}
    assert {"train_loss", "train_accuracy", "lr", "val_loss", "val_accuracy", "val_macro_f1", "seconds"} <= logged
    for key in logged:
        points = client.get_metric_history(run.info.run_id, key)
        # One point per evaluation, at its optimiser step, in order, holding that evaluation's own value.
        assert [m.step for m in points] == [2, 4, 6], key
        assert [m.value for m in points] == pytest.approx([h[key] for h in result.history]), key
    for h in result.history:
        assert (h["val_loss"], h["val_accuracy"]) == pytest.approx(recomputed[int(h["step"])], rel=1e-5)
    # The steps' training losses are three different figures, not one evaluation's copied three times.
    assert len({h["train_loss"] for h in result.history}) == 3


def test_two_phase_needs_the_architecture() -> None:
    with pytest.raises(ConfigError, match="arch="):
        fit(_tiny(), _tensors(n=6), None, _config(head_steps=1), CPU, 2, "no arch")


def test_class_weights_are_normalised_inverse_frequencies() -> None:
    weights = class_weights([0, 0, 0, 1], num_classes=3)
    # Present classes: N / (K * n_c) with K = 2 present classes; the absent class gets 0.
    assert weights.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1), 0.0])
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    balanced = class_weights(labels, 3).numpy()
    assert balanced[labels].mean() == pytest.approx(1.0)  # the loss keeps the unweighted scale
    counts = np.bincount(labels)
    assert balanced * counts == pytest.approx(np.full(3, len(labels) / 3))  # every class weighs the same in total
    with pytest.raises(DatasetError, match=r"expected 0\.\.2"):
        class_weights([0, 3], 3)


def test_class_weighted_loss_weights_the_training_loss_but_not_the_validation_loss() -> None:
    labels = [0, 0, 0, 0, 1, 2]
    data = _tensors(labels=labels)
    model = ConstantLogits()
    with torch.no_grad():
        model.bias.copy_(torch.tensor([1.0, -0.5, 0.25]))
    logits = model(data.tensors[0]).detach()
    y = torch.tensor(labels)
    weighted = float(nn.functional.cross_entropy(logits, y, weight=class_weights(labels, 3)))
    plain = float(nn.functional.cross_entropy(logits, y))
    assert weighted != pytest.approx(plain, rel=1e-3)
    config = _config(class_weighted_loss=True, batch_size=6, lr=1e-9)
    result = fit(model, data, data, config, CPU, 1, "weighted")
    assert result.history[0]["train_loss"] == pytest.approx(weighted, rel=1e-5)
    assert result.history[0]["val_loss"] == pytest.approx(plain, rel=1e-5)


def test_label_smoothing_smooths_the_training_loss_only() -> None:
    labels = [0, 1, 2, 0, 1, 2]
    data = _tensors(labels=labels)
    model = ConstantLogits()
    with torch.no_grad():
        model.bias.copy_(torch.tensor([2.0, -1.0, 0.5]))
    logits, y = model(data.tensors[0]).detach(), torch.tensor(labels)
    smoothed = float(nn.functional.cross_entropy(logits, y, label_smoothing=0.2))
    result = fit(model, data, data, _config(label_smoothing=0.2, batch_size=6, lr=1e-9), CPU, 1, "smooth")
    assert result.history[0]["train_loss"] == pytest.approx(smoothed, rel=1e-5)
    assert result.history[0]["val_loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)


def test_grad_clip_bounds_the_gradient_norm_of_every_step() -> None:
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        fit(_tiny(), _tensors(n=8), None, _config(steps=3, lr=1e-2), CPU, 3, "free")
        free = list(norms)
        norms.clear()
        fit(_tiny(), _tensors(n=8), None, _config(steps=3, lr=1e-2, grad_clip=0.05), CPU, 3, "clipped")
    finally:
        handle.remove()
    assert min(free) > 0.05  # the tiny net's gradients are larger than the clip ...
    assert norms == pytest.approx([0.05] * 3, rel=1e-4)  # ... and clipping scales each step's down to it


def test_channels_last_trains_in_nhwc_and_predicts_like_nchw() -> None:
    data = _tensors()
    layouts: list[bool] = []

    def layout(stats: dict[str, float]) -> None:
        weight = next(model.parameters())  # features[0].weight
        layouts.append(weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous())

    results: dict[str, FitResult] = {}
    for setting in ("on", "off"):
        model = _tiny()
        config = _config(channels_last=setting, lr=1e-3)
        results[setting] = fit(model, data, None, config, CPU, 2, setting, layout, arch=ARCH)
    assert layouts == [True, True, False, False]
    nhwc_model = results["on"].model
    assert next(nhwc_model.parameters()).is_contiguous()  # saved weights are back in the usual layout
    nhwc, nchw = (predict_logits(results[s].model, data, _config(), CPU) for s in ("on", "off"))
    # Two AdamW steps in either layout end at nearly the same weights (summation order differs, nothing else).
    np.testing.assert_allclose(nhwc, nchw, atol=5e-3)
    assert (nhwc.argmax(1) == nchw.argmax(1)).mean() >= 0.9
    # And one set of weights predicts the same in both layouts.
    nhwc_model.to(memory_format=torch.channels_last)
    np.testing.assert_allclose(predict_logits(nhwc_model, data, _config(), CPU), nhwc, rtol=1e-5, atol=1e-5)


def test_predictions_with_views_average_the_views_probabilities() -> None:
    data = _tensors(n=5, size=20)
    model = _tiny().eval()
    views = TestTimeViews(tile_size=20, input_size=16, crops=5, flips=True)
    got = predict_logits(model, data, _config(), CPU, views)
    x = data.tensors[0]
    with torch.no_grad():
        manual = []
        for top, left in [(2, 2), (0, 0), (0, 4), (4, 0), (4, 4)]:
            crop = x[:, :, top : top + 16, left : left + 16]
            manual += [torch.softmax(model(crop), 1), torch.softmax(model(torch.flip(crop, dims=[3])), 1)]
    np.testing.assert_allclose(got, torch.stack(manual).mean(0).log().numpy(), rtol=1e-5, atol=1e-5)


def test_channels_last_settings() -> None:
    assert channels_last_enabled("on", CPU, None)
    assert not channels_last_enabled("off", torch.device("cuda"), "resnet50")
    assert channels_last_enabled("auto", torch.device("cuda"), None)
    # On a CPU, auto follows the measurements: on for the three real architectures, off for an unmeasured one.
    assert all(channels_last_enabled("auto", CPU, arch) for arch in ("resnet50", "vgg19", "vgg19_bn"))
    assert not channels_last_enabled("auto", CPU, ARCH)
    with pytest.raises(ConfigError, match="channels_last"):
        channels_last_enabled("yes", CPU, ARCH)


def test_the_same_seed_repeats_weights_and_history_exactly(augmented_tiles: TileDataset) -> None:
    runs = []
    for _ in range(2):
        config = _config(head_steps=1, steps=3, class_weighted_loss=True, label_smoothing=0.1)
        runs.append(fit(_tiny(seed=5), augmented_tiles, None, config, CPU, 3, "repeat", arch=ARCH))
    assert _without_seconds(runs[0].history) == _without_seconds(runs[1].history)
    assert _same(runs[0].model.state_dict(), runs[1].model.state_dict())
    other = fit(_tiny(seed=5), augmented_tiles, None, _config(head_steps=1, steps=3, seed=4), CPU, 3, "s", arch=ARCH)
    assert not _same(runs[0].model.state_dict(), other.model.state_dict())  # the seed does matter


class Interrupted(KeyboardInterrupt):
    """Stands in for Ctrl-C or a killed job."""


def _interrupt_after(step: int) -> Callable[[dict[str, float]], None]:
    def callback(stats: dict[str, float]) -> None:
        if stats["step"] == step:
            raise Interrupted

    return callback


RESUME_RECIPE = {
    "head_steps": 1,
    "steps": 4,
    "class_weighted_loss": True,
    "channels_last": "on",
    "scheduler": "onecycle",
    "warmup_fraction": 0.25,
    "label_smoothing": 0.1,
}


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
    augmented_tiles: TileDataset, tmp_path: Path
) -> None:
    config = _config(**RESUME_RECIPE)
    val = _tensors(n=9, size=32, seed=1)
    reference = fit(_tiny(), augmented_tiles, val, config, CPU, 4, "reference", arch=ARCH)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        fit(
            _tiny(),
            augmented_tiles,
            val,
            config,
            CPU,
            4,
            "killed",
            _interrupt_after(2),
            arch=ARCH,
            checkpoint_dir=ckpt,
            fingerprint="data-v1",
        )
    assert checkpoint_path(ckpt).is_file()
    torch.manual_seed(999)  # whatever ran in between, the resumed run restores its random state
    seen: list[int] = []
    resumed = fit(
        _tiny(seed=7),
        augmented_tiles,
        val,
        config,
        CPU,
        4,
        "resumed",
        lambda s: seen.append(int(s["step"])),
        arch=ARCH,
        checkpoint_dir=ckpt,
        fingerprint="data-v1",
    )

    assert resumed.resumed_from == 2
    assert seen == [1, 2, 3, 4]  # restored evaluations are replayed to the callback, then the new ones
    assert _without_seconds(resumed.history) == _without_seconds(reference.history)
    assert resumed.best_step == reference.best_step
    assert _same(resumed.model.state_dict(), reference.model.state_dict())

    # A finished checkpoint is not trained again; clear_checkpoint removes it once the caller has the result.
    again = fit(
        _tiny(seed=8),
        augmented_tiles,
        val,
        config,
        CPU,
        4,
        "again",
        arch=ARCH,
        checkpoint_dir=ckpt,
        fingerprint="data-v1",
    )
    assert again.resumed_from == 4
    assert _same(again.model.state_dict(), reference.model.state_dict())
    clear_checkpoint(ckpt)
    assert not ckpt.exists()


def test_a_checkpoint_of_other_data_is_ignored_and_overwritten(
    augmented_tiles: TileDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(**{**RESUME_RECIPE, "steps": 3})
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        fit(
            _tiny(),
            augmented_tiles,
            None,
            config,
            CPU,
            3,
            "old",
            _interrupt_after(2),
            arch=ARCH,
            checkpoint_dir=ckpt,
            fingerprint="data-v1",
        )
    old = torch.load(checkpoint_path(ckpt), weights_only=True)["fingerprint"]

    with caplog.at_level(logging.WARNING, logger="bonetumor.training.engine"):
        fresh = fit(
            _tiny(), augmented_tiles, None, config, CPU, 3, "new", arch=ARCH, checkpoint_dir=ckpt, fingerprint="data-v2"
        )
    assert fresh.resumed_from == 0
    assert "fingerprint differs" in caplog.text
    assert torch.load(checkpoint_path(ckpt), weights_only=True)["fingerprint"] != old
    uninterrupted = fit(_tiny(), augmented_tiles, None, config, CPU, 3, "plain", arch=ARCH)
    assert _same(fresh.model.state_dict(), uninterrupted.model.state_dict())

    # A changed recipe (here the learning rate) invalidates the checkpoint too, whatever the caller's fingerprint.
    changed = fit(
        _tiny(),
        augmented_tiles,
        None,
        _config(**{**RESUME_RECIPE, "steps": 3, "lr": 5e-3}),
        CPU,
        3,
        "changed",
        arch=ARCH,
        checkpoint_dir=ckpt,
        fingerprint="data-v2",
    )
    assert changed.resumed_from == 0


def test_progress_bar_shows_the_name_step_and_loss(capsys: pytest.CaptureFixture[str]) -> None:
    fit(_tiny(), _tensors(n=16), None, _config(progress=True), CPU, 2, "tiny fold 1/3", arch=ARCH)
    err = capsys.readouterr().err
    assert "tiny fold 1/3" in err
    assert "step 2/2" in err
    assert "loss " in err


def _fit_with_checkpoints(tiles: TileDataset, ckpt: Path, name: str) -> FitResult:
    return fit(_tiny(), tiles, None, _config(), CPU, 4, name, arch=ARCH, checkpoint_dir=ckpt, fingerprint="d")


def test_a_full_disk_at_a_checkpoint_fails_clearly_keeps_the_previous_one_and_resumes(
    augmented_tiles: TileDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faults, "_reached", Counter())
    monkeypatch.setenv(faults.FAULT_ENV, "enospc@checkpoint-write#2")  # the write after step 2 finds no space
    ckpt = tmp_path / "ckpt"
    with pytest.raises(CheckpointWriteError) as error:
        _fit_with_checkpoints(augmented_tiles, ckpt, "full")
    message = str(error.value)
    assert f"no space left on the device of {ckpt}" in message
    assert "after step 2" in message
    assert f"the previous checkpoint {checkpoint_path(ckpt)} is kept" in message
    assert torch.load(checkpoint_path(ckpt), weights_only=True)["step"] == 1
    assert [p.name for p in ckpt.iterdir()] == ["checkpoint.pt"]  # no half-written temporary file left
    monkeypatch.delenv(faults.FAULT_ENV)
    resumed = _fit_with_checkpoints(augmented_tiles, ckpt, "after")
    assert resumed.resumed_from == 1
    reference = fit(_tiny(), augmented_tiles, None, _config(), CPU, 4, "reference", arch=ARCH)
    assert _same(resumed.model.state_dict(), reference.model.state_dict())


def test_a_really_full_tmpfs_is_reported_as_a_full_disk(augmented_tiles: TileDataset, tmp_path: Path) -> None:
    """The same on a real 'No space left on device': a tmpfs with room for one checkpoint, not two."""
    probe = tmp_path / "probe"
    _fit_with_checkpoints(augmented_tiles, probe, "probe")
    size = checkpoint_path(probe).stat().st_size
    mount = tmp_path / "small"
    mount.mkdir()
    # Room for one checkpoint and half of the next: the write goes to a temporary file beside the previous one.
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 4096 * 4096 + 4096}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the injected ENOSPC test covers this")
    try:
        with pytest.raises(CheckpointWriteError, match="no space left on the device") as error:
            _fit_with_checkpoints(augmented_tiles, mount / "ckpt", "tmpfs")
        assert isinstance(error.value.__cause__, RuntimeError | OSError)  # torch.save's report of ENOSPC
        assert torch.load(checkpoint_path(mount / "ckpt"), weights_only=True)["step"] == 1
    finally:
        subprocess.run(["umount", str(mount)], check=True)
