from pathlib import Path
from typing import Literal

import pandas as pd
import pytest
from conftest import CLASSES

from bonetumor.config import SplitConfig
from bonetumor.errors import SplitError
from bonetumor.ingest import ingest
from bonetumor.split import check_no_leakage, fold_membership, make_folds, read_folds, write_folds


@pytest.fixture
def manifest(sample_images: Path, tmp_path: Path) -> pd.DataFrame:
    return ingest(sample_images, CLASSES, tmp_path / "manifest.csv")


@pytest.mark.parametrize("group_by", ["slide", "case"])
def test_no_group_is_on_both_sides_of_any_fold(manifest: pd.DataFrame, group_by: Literal["slide", "case"]) -> None:
    n_folds = 3 if group_by == "slide" else 2
    folds = make_folds(manifest, SplitConfig(n_folds=n_folds, group_by=group_by), CLASSES)
    membership = fold_membership(manifest, folds)
    assert sorted(membership.unique()) == list(range(n_folds))
    for fold in range(n_folds):
        val_groups = set(manifest.loc[membership == fold, group_by])
        train_groups = set(manifest.loc[membership != fold, group_by])
        assert not val_groups & train_groups
        assert set(folds["folds"][fold]["val_groups"]) == val_groups
    # Counts recorded per fold add up to the class totals.
    for label in CLASSES:
        assert sum(f["counts"]["val"][label] for f in folds["folds"]) == 10


def test_folds_are_reproducible_from_the_seed(manifest: pd.DataFrame) -> None:
    first = make_folds(manifest, SplitConfig(seed=7), CLASSES)
    assert make_folds(manifest, SplitConfig(seed=7), CLASSES)["folds"] == first["folds"]


def test_more_folds_than_groups_is_a_clear_error(manifest: pd.DataFrame) -> None:
    with pytest.raises(SplitError, match=r"n_folds=5 but the data has only 4 distinct case"):
        make_folds(manifest, SplitConfig(n_folds=5, group_by="case"), CLASSES)


def test_a_tampered_folds_file_that_leaks_a_slide_is_refused(manifest: pd.DataFrame, tmp_path: Path) -> None:
    folds = make_folds(manifest, SplitConfig(), CLASSES)
    # Move one tile of a validation slide of fold 0 into fold 1's validation set: its slide now straddles.
    moved = folds["folds"][0]["val_paths"].pop()
    folds["folds"][1]["val_paths"].append(moved)
    with pytest.raises(SplitError, match="in both training and validation"):
        check_no_leakage(manifest, folds)


def test_round_trip_checks_the_file(manifest: pd.DataFrame, tmp_path: Path) -> None:
    folds = make_folds(manifest, SplitConfig(), CLASSES)
    path = write_folds(folds, tmp_path / "folds.json", tmp_path / "manifest.csv")
    assert read_folds(path, manifest)["folds"] == folds["folds"]
    path.write_text(path.read_text()[:100])  # a half-written file
    with pytest.raises(Exception, match="not valid JSON"):
        read_folds(path, manifest)
