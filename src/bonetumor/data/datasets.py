"""Torch datasets over manifests, and the composition of each fold's training and validation tables.

A training table is the ``train_manifest.csv`` that the balance stage writes for each training set
(``fold-<k>`` and ``full``): real tiles, whose ``path`` is relative to the data set manifest's folder, and
synthetic tiles (``synthetic`` true), whose ``path`` is relative to that training set's balance folder.
:func:`load_training_table` resolves both into absolute ``file`` paths; nothing else needs to know the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from bonetumor.data.manifest import read_manifest, resolve_paths
from bonetumor.data.split import TEST_FOLD, fold_membership
from bonetumor.errors import ArtifactError, DatasetError
from bonetumor.transforms.decode import decode_image
from bonetumor.utils import read_json

TRAIN_MANIFEST = "train_manifest.csv"
#: The balance gate's decision on the synthetic tiles, in the balance output (:mod:`bonetumor.balance.ablation`).
DECISION_FILE = "decision.json"
FULL_SET = "full"


def training_set_names(n_folds: int) -> list[str]:
    """Return the names of the training sets: one per fold, then ``full`` (all tiles, for the final refit)."""
    return [f"fold-{k}" for k in range(n_folds)] + [FULL_SET]


class TileDataset(Dataset[tuple[torch.Tensor, int]]):
    """Tiles decoded from files on access, with integer labels, through a transform.

    Args:
        files: Tile files.
        labels: Class index per file.
        transform: Applied to every item on every access (the random augmentation, then the tensor tail).
        prepare: Deterministic steps before ``transform`` (:func:`bonetumor.transforms.preprocess.tile_ops`: stain
            normalisation, centred square, resize to ``tile_size``). Their result is computed once per tile and
            kept in memory (a 128 px RGB tile is 48 KiB), so a training run of hundreds of steps over a few
            dozen tiles decodes and stain-normalises each tile once instead of at every draw.
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        transform: Callable[[Any], torch.Tensor],
        prepare: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        if len(files) != len(labels):
            raise DatasetError(f"{len(files)} files but {len(labels)} labels; expected one label per file")
        self.files = list(files)
        self.labels = list(labels)
        self.transform = transform
        self.prepare = prepare
        self._prepared: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.prepare is None:
            return self.transform(decode_image(self.files[index])), self.labels[index]
        image = self._prepared.get(index)
        if image is None:
            image = self._prepared[index] = self.prepare(decode_image(self.files[index]))
        return self.transform(image), self.labels[index]


def label_indices(labels: Sequence[str] | pd.Series, classes: Sequence[str]) -> list[int]:
    """Map label names to class indices.

    Raises:
        DatasetError: A label is not in ``classes``.
    """
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(label) for label in labels if label not in index})
    if unknown:
        raise DatasetError(f"labels {unknown} are not in the class set {list(classes)}")
    return [index[str(label)] for label in labels]


def split_tables(manifest: pd.DataFrame, folds: dict[str, Any], fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the real training and validation rows of one fold (tiles of the held-out test set are in neither)."""
    membership = fold_membership(manifest, folds)
    return manifest[(membership != fold) & (membership != TEST_FOLD)], manifest[membership == fold]


def load_training_table(
    balance_dir: str | Path, set_name: str, dataset_dir: str | Path, *, apply_gate: bool = True
) -> pd.DataFrame:
    """Read one training set's manifest from the balance output and resolve every row to a ``file`` path.

    Synthetic rows are kept only where the balance gate decided training uses them (``decision.json``,
    :mod:`bonetumor.balance.ablation`); the ablation, which compares with and without them, reads them all.

    Args:
        balance_dir: The balance stage's output folder.
        set_name: ``fold-<k>`` or ``full``.
        dataset_dir: The folder the data set manifest's paths are relative to.
        apply_gate: Drop the synthetic rows unless the gate decided to use them.

    Raises:
        ArtifactError: The training manifest is missing or lacks the ``synthetic`` column, or it holds synthetic
            rows and the balance output has no gate decision.
    """
    set_dir = Path(balance_dir) / set_name
    path = set_dir / TRAIN_MANIFEST
    if not path.is_file():
        raise ArtifactError(f"training manifest {path} not found; run `bonetumor balance` first")
    table = read_manifest(path)
    if "synthetic" not in table.columns:
        raise ArtifactError(
            f"{path}: no 'synthetic' column; expected a training manifest written by `bonetumor balance`"
        )
    table["synthetic"] = table["synthetic"].astype(str).str.lower().isin(("true", "1"))
    if apply_gate and table["synthetic"].any() and not read_decision(balance_dir)["use_synthetic"]:
        table = table[~table["synthetic"]].reset_index(drop=True)
    real = ~table["synthetic"]
    files = pd.Series(index=table.index, dtype=object)
    files[real] = resolve_paths(table[real], dataset_dir)
    files[~real] = resolve_paths(table[~real], set_dir)
    table["file"] = files
    return table


def read_decision(balance_dir: str | Path) -> dict[str, Any]:
    """Return a balance output's ``decision.json``.

    Raises:
        ArtifactError: It is missing (an output of an older version, or of a Kubeflow task not given the decision).
    """
    path = Path(balance_dir) / DECISION_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{path} not found: the balance output holds synthetic tiles but no gate decision on them; rerun "
            "`bonetumor balance` (dvc repro does this)"
        )
    return dict(read_json(path, "balance gate decision"))
