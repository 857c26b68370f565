from pathlib import Path
from typing import Literal

import pandas as pd
import pytest
from conftest import CLASSES

from bonetumor.config import SplitConfig
from bonetumor.data.datasets import split_tables
from bonetumor.data.ingest import ingest
from bonetumor.data.split import (
    check_no_leakage,
    development_rows,
    fold_membership,
    held_out_rows,
    inner_split,
    make_folds,
    read_folds,
    write_folds,
)
from bonetumor.errors import ArtifactError, SplitError


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
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_folds(path, manifest)


def test_folds_of_another_manifest_are_refused(manifest: pd.DataFrame, tmp_path: Path) -> None:
    path = write_folds(make_folds(manifest, SplitConfig(), CLASSES), tmp_path / "folds.json", tmp_path / "manifest.csv")
    other = tmp_path / "other.csv"
    other.write_text((tmp_path / "manifest.csv").read_text().replace("Case-3,", "Case-33,"))
    with pytest.raises(ArtifactError, match="made from another manifest"):
        read_folds(path, manifest, other)


def grouped(sizes: list[int], labels: list[str]) -> pd.DataFrame:
    groups = [f"s{g}" for g, n in enumerate(sizes) for _ in range(n)]
    return pd.DataFrame({"path": [f"t{i}.jpg" for i in range(len(labels))], "label": labels, "slide": groups})


def test_a_fold_left_without_validation_tiles_is_an_error() -> None:
    # Uneven groups: scikit-learn's StratifiedGroupKFold leaves fold 1 empty with this seed.
    labels = ["A", "A", "A", "A", "A", "B", "A", "B", "B", "C", "B"]
    with pytest.raises(SplitError, match=r"folds \[1\] of 5 got no validation tiles"):
        make_folds(grouped([3, 1, 5, 1, 1], labels), SplitConfig(n_folds=5, seed=110), ["A", "B", "C"])


def test_more_folds_than_tiles_per_class_is_a_split_error_not_a_traceback() -> None:
    frame = grouped([1] * 6, ["A", "A", "B", "B", "C", "C"])
    with pytest.raises(SplitError, match="cannot make 5 stratified folds"):
        make_folds(frame, SplitConfig(n_folds=5), ["A", "B", "C"])


def test_inner_split_holds_out_whole_groups(manifest: pd.DataFrame) -> None:
    fit_rows, stop_rows = inner_split(manifest, "slide", 0.25, seed=3)
    assert len(fit_rows) + len(stop_rows) == len(manifest)
    assert len(stop_rows) > 0
    assert not set(fit_rows["slide"]) & set(stop_rows["slide"])
    with pytest.raises(SplitError, match="inner_val_fraction: 0"):
        inner_split(manifest[manifest["slide"] == "P9-B12"], "slide", 0.25, seed=3)


def test_leave_one_patient_out_makes_one_fold_per_case(manifest: pd.DataFrame) -> None:
    folds = make_folds(manifest, SplitConfig(method="leave_one_group_out", group_by="case"), CLASSES)
    cases = sorted(manifest["case"].unique())
    assert folds["method"] == "LeaveOneGroupOut"
    assert folds["n_folds"] == len(cases)
    assert [f["val_groups"] for f in folds["folds"]] == [[c] for c in cases]
    membership = fold_membership(manifest, folds)
    for fold in folds["folds"]:
        assert set(manifest.loc[membership == fold["fold"], "case"]) == set(fold["val_groups"])
    # Patients of this collection are dominated by one or two classes: the folds say which classes they lack.
    assert any("validation set has no tiles of" in w for w in folds["warnings"])


@pytest.mark.parametrize("group_by", ["slide", "case"])
def test_held_out_test_groups_are_in_no_fold(manifest: pd.DataFrame, group_by: Literal["slide", "case"]) -> None:
    config = SplitConfig(n_folds=2, group_by=group_by, test_fraction=0.25, seed=1)
    folds = make_folds(manifest, config, CLASSES)
    test = held_out_rows(manifest, folds)
    dev = development_rows(manifest, folds)
    assert len(test) > 0
    assert len(test) + len(dev) == len(manifest)
    assert set(folds["test_paths"]) == set(test["path"])
    assert not set(test[group_by]) & set(dev[group_by])
    assert sum(folds["test_counts"].values()) == len(test)
    for fold in folds["folds"]:
        train, val = split_tables(manifest, folds, fold["fold"])
        assert not set(train["path"]) & set(folds["test_paths"])
        assert not set(val["path"]) & set(folds["test_paths"])
    # Moving a test tile into a fold puts its group on both sides: refused.
    tampered = {**folds, "test_paths": folds["test_paths"][1:]}
    tampered["folds"] = [dict(f) for f in folds["folds"]]
    tampered["folds"][0]["val_paths"] = [*folds["folds"][0]["val_paths"], folds["test_paths"][0]]
    with pytest.raises(SplitError, match="test set and in the folds"):
        check_no_leakage(manifest, tampered)


def test_near_duplicates_link_their_groups(manifest: pd.DataFrame) -> None:
    slides = sorted(manifest["slide"].unique())
    # Pretend one tile of the first slide has a near-copy on the last slide: both slides must share a side.
    clusters = pd.Series("", index=manifest.index)
    first = manifest.index[manifest["slide"] == slides[0]][0]
    last = manifest.index[manifest["slide"] == slides[-1]][0]
    clusters[[first, last]] = "dup-1"
    for seed in range(5):
        folds = make_folds(manifest, SplitConfig(n_folds=3, seed=seed), CLASSES, clusters)
        membership = fold_membership(manifest, folds)
        assert membership[first] == membership[last]
        assert any(f"{slides[0]}+{slides[-1]}" in w for w in folds["warnings"])


def test_folds_record_groups_seed_and_counts(manifest: pd.DataFrame) -> None:
    folds = make_folds(manifest, SplitConfig(seed=5), CLASSES)
    assert folds["seed"] == 5
    assert folds["groups"] == sorted(manifest["slide"].unique())
    assert folds["counts"] == {c: 10 for c in CLASSES}
    for fold in folds["folds"]:
        assert sorted(fold["train_groups"] + fold["val_groups"]) == folds["groups"]
        assert {c: fold["counts"]["train"][c] + fold["counts"]["val"][c] for c in CLASSES} == folds["counts"]
