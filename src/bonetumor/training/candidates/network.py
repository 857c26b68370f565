"""A torchvision architecture (ResNet50, VGG19, VGG19-BN...) trained by the engine: the candidates that get refit.

:class:`NetworkCandidate` builds ``arch`` by name (:func:`bonetumor.training.models.build_model`) from its starting
weights (``train.weights``, resolved once per architecture), trains it with :func:`bonetumor.training.engine.fit`
on the fold's augmented crops, early-stopping on the fold's held-out slides when there are any, and predicts
through the test-time views. Each fold also draws a Grad-CAM gallery of a few of its validation tiles. Its
runs.json entry carries the folds' best steps and the refit length (their median).

:class:`TorchFitted` is the fitted form of any torch candidate (this one, the two-stage classifier, the pruned
VGG): logits through the views, CPU latency, and export as a bundle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonetumor.config import Config
from bonetumor.data.manifest import resolve_paths
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.evaluation.gradcam import gradcam_gallery, select_gallery_tiles
from bonetumor.registry.tracking import TAG_PREFIX
from bonetumor.serving.predictor import ModelMetadata, save_bundle
from bonetumor.training.candidates.base import (
    Candidate,
    FitContext,
    FittedModel,
    FoldData,
    Section,
    TrainingSet,
    median_step,
)
from bonetumor.training.engine import FitResult, eval_dataset, fit, plot_history, predict_logits, training_dataset
from bonetumor.training.export import cpu_latency_ms
from bonetumor.training.models import InitWeights, build_model, resolve_weights
from bonetumor.transforms.preprocess import build_eval_transform
from bonetumor.transforms.stain import StainNormalizer
from bonetumor.transforms.tta import TestTimeViews, with_views
from bonetumor.utils import seed_everything, write_json

#: Tag naming where a model's starting weights came from, e.g. ``scratch (no ImageNet weights available)``.
INIT_TAG = f"{TAG_PREFIX}init"


def fit_title(data: TrainingSet) -> str:
    """Return how progress lines name a fit: ``fold 1/3``, or ``refit on all tiles``."""
    return data.title if isinstance(data, FoldData) else "refit on all tiles"


def stop_dataset(data: TrainingSet, config: Config) -> Any:
    """Return the early-stopping dataset of a training set (evaluation transform), or None without one."""
    if data.stop_rows is None:
        return None
    return eval_dataset(list(data.stop_rows["file"]), list(data.stop_rows["label"]), config, stain=data.stain)


class TorchFitted:
    """A trained torch classifier with its test-time views, as one fold (or the refit) left it.

    Args:
        model: The network (without views), in eval mode.
        arch: The architecture its bundle rebuilds it from.
        config: The config it trained with (``for_arch`` applied): preprocessing, views, batch size, classes.
        stain: Its stain normaliser, or None.
        device: Where it lives.
        result: The engine's record of the fit, or None (a model combined from several fits).
        extra: More figures for its fold run.
    """

    def __init__(
        self,
        model: nn.Module,
        arch: str,
        config: Config,
        stain: StainNormalizer | None,
        device: torch.device,
        result: FitResult | None = None,
        extra: Mapping[str, float] | None = None,
    ) -> None:
        self.model = model
        self.arch = arch
        self.config = config
        self.stain = stain
        self.device = device
        self.result = result
        self.extra = dict(extra or {})
        self.views = TestTimeViews.from_config(config.preprocess)
        self._latency: dict[tuple[int, int], float] = {}

    def logits(self, files: Sequence[Path]) -> np.ndarray:
        """Return the logits of tile files through the test-time views (float32, class order)."""
        classes = self.config.data.classes
        dataset = eval_dataset(list(files), [classes[0]] * len(files), self.config, stain=self.stain)
        return predict_logits(self.model, dataset, self.config.train, self.device, self.views)

    def latency_ms(self, tile_size: int, batch: int) -> float:
        """Return the CPU milliseconds per tile of the model with its views."""
        # Timed once per shape: an ensemble adds up its members' own figures instead of timing them again.
        key = (tile_size, batch)
        if key not in self._latency:
            self._latency[key] = cpu_latency_ms(with_views(self.model, self.views), tile_size, batch)
        return self._latency[key]

    def metrics(self) -> dict[str, float]:
        """Return the best step and the early-stopping metrics at it, plus any extra figures."""
        out = dict(self.extra)
        if self.result is not None:
            best = next((h for h in self.result.history if h["step"] == self.result.best_step), {})
            out["best_step"] = float(self.result.best_step)
            out.update({f"best_{k}": v for k, v in best.items() if k.startswith("val_")})
        return out

    def tags(self) -> dict[str, str]:
        """None."""
        return {}

    def export(
        self,
        out_dir: Path,
        provenance: Mapping[str, Any] | None = None,
        referral: ReferralPolicy | None = None,
    ) -> Path:
        """Write the bundle (``weights.pt`` and ``metadata.json``, :mod:`bonetumor.serving.predictor`).

        Args:
            out_dir: The bundle folder.
            provenance: What made the model (data version, runs, scores...), stored in its metadata.
            referral: The calibrated referral rule it is served with, or None.
        """
        return save_bundle(self.model, self.bundle_metadata(provenance, referral), out_dir)

    def bundle_metadata(
        self, provenance: Mapping[str, Any] | None = None, referral: ReferralPolicy | None = None
    ) -> ModelMetadata:
        """Return the metadata its bundle carries."""
        preprocess = self.config.preprocess
        return ModelMetadata(
            arch=self.arch,
            classes=self.config.data.classes,
            tile_size=preprocess.tile_size,
            input_size=preprocess.input_size,
            mean=preprocess.mean,
            std=preprocess.std,
            dropout=self.config.train.dropout,
            test_crops=preprocess.test_crops,
            test_flips=preprocess.test_flips,
            provenance=dict(provenance or {}),
            versions=ModelMetadata.current_versions(),
            stain=None if self.stain is None else self.stain.to_dict(),
            referral=None if referral is None else referral.to_dict(),
        )


class NetworkCandidate(Candidate):
    """One torchvision architecture, built by name, fine-tuned or trained from scratch by the engine.

    Args:
        arch: Key of :data:`bonetumor.training.models.ARCHITECTURES`.
        init: Where its weights start (resolved from ``train.weights`` when None).
    """

    kind: ClassVar[str] = "architecture"
    section: ClassVar[Section] = "architectures"

    def __init__(self, arch: str, init: InitWeights) -> None:
        super().__init__(arch, arch=arch)
        self.init = init

    @classmethod
    def from_config(cls, config: Config) -> list[Candidate]:
        """One candidate per ``train.architectures`` entry, each with its starting weights resolved once."""
        return [cls(arch, resolve_weights(arch, config.train.weights)) for arch in config.train.architectures]

    def fit(self, data: TrainingSet, context: FitContext, bases: Mapping[str, FittedModel]) -> TorchFitted:
        """Train the architecture on ``data`` and return it with its views."""
        config = self.settings(context.config)
        train = config.train
        seed_everything(data.seed)
        model = build_model(self.name, len(config.data.classes), train.dropout, self.init, train.trainable)
        result = fit(
            model,
            training_dataset(data.fit_table, config, context.policy, stain=data.stain),
            stop_dataset(data, config),
            train,
            context.device,
            data.steps or train.steps,
            f"{self.name} {fit_title(data)}",
            context.on_eval,
            context.timer,
            train.steps,
            arch=self.name,
            checkpoint_dir=context.checkpoints if train.checkpoint else None,
            fingerprint=context.fingerprint,
            views=TestTimeViews.from_config(config.preprocess),
        )
        return TorchFitted(result.model, self.name, config, data.stain, context.device, result)

    def planned_steps(self, config: Config, n_folds: int) -> int:
        """Every fold runs up to ``train.steps`` (the architecture's)."""
        return n_folds * self.settings(config).train.steps

    def run_tags(self) -> dict[str, str]:
        """Where its starting weights came from."""
        return {INIT_TAG: self.init.tag}

    def after_fold(
        self, fitted: FittedModel, fold: FoldData, oof: pd.DataFrame, out_dir: Path
    ) -> list[tuple[Path, str | None]]:
        """Draw Grad-CAM on a few of the fold's validation tiles per class, with the fold's own model and views."""
        if not isinstance(fitted, TorchFitted) or not fitted.config.evaluate.gradcam_per_class:
            return []
        config = fitted.config
        chosen = select_gallery_tiles(oof, config.evaluate.gradcam_per_class, seed=config.train.seed + fold.fold)
        (out_dir / "gradcam").mkdir(parents=True, exist_ok=True)
        views = fitted.views
        gallery = gradcam_gallery(
            fitted.model,
            self.name,
            resolve_paths(chosen, fold.dataset_dir),
            list(chosen["label"]),
            config.data.classes,
            build_eval_transform(config.preprocess, stain=fold.stain),
            out_dir / "gradcam" / f"fold-{fold.fold}.png",
            device=str(fitted.device),
            title=f"{self.name} fold {fold.fold}: Grad-CAM on validation tiles (final conv block, mean over "
            f"{views.count} views)",
            views=views,
        )
        return [(gallery, "gradcam")]

    def summary(self, folds: list[dict[str, Any]], scores: list[float], out_dir: Path) -> dict[str, Any]:
        """The fold records, learning curves, and the refit length: the median of the folds' best steps."""
        histories = {f"fold {f['fold']}": f.pop("history") for f in folds}
        write_json(out_dir / "history.json", {"folds": folds, "history": histories})
        plot_history(histories, f"{self.name}: {len(folds)}-fold cross-validation", out_dir / "learning_curves.png")
        return {
            "folds": folds,
            "refit_steps": median_step([f["best_step"] for f in folds]),
            "init": self.init.tag,
        }

    def summary_artifacts(self, out_dir: Path) -> list[tuple[Path, str | None]]:
        """The learning curves and the folds' Grad-CAM galleries."""
        return [(out_dir / "learning_curves.png", None), (out_dir / "gradcam", "gradcam")]

    def fold_record(self, fitted: FittedModel, fold: FoldData) -> dict[str, Any]:
        """What runs.json and history.json keep of a fold: best step, early stop, resume, stain, history."""
        result = fitted.result if isinstance(fitted, TorchFitted) else None
        if result is None:
            return {}
        return {
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "resumed_steps": result.resumed_from,
            "stain": None if fold.stain is None else fold.stain.to_dict(),
            "history": result.history,
        }
