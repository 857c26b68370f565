import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import CLASSES, DatasetFactory
from mlflow.tracking import MlflowClient

from bonetumor.balance.ablation import gate, oversample
from bonetumor.balance.gan import (
    GAN_CHECKPOINT,
    deficits,
    generate,
    merge_balance_outputs,
    read_png_provenance,
    run_balance,
    train_gan,
)
from bonetumor.config import BalanceConfig, Config, SplitConfig
from bonetumor.data.datasets import load_training_table, read_decision, split_tables
from bonetumor.data.ingest import ingest
from bonetumor.data.split import make_folds, write_folds
from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.faults import FAULT_ENV, InjectedFaultError


def test_deficits_fill_up_to_the_target_ratio() -> None:
    assert deficits({"a": 10, "b": 4, "c": 7}, 1.0) == {"a": 0, "b": 6, "c": 3}
    assert deficits({"a": 10, "b": 4, "c": 7}, 0.5) == {"a": 0, "b": 1, "c": 0}
    assert deficits({"a": 10, "b": 0}, 1.0) == {"a": 0, "b": 0}  # never invent a class the GAN never saw


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_conditional_gan_learns_the_colour_of_each_class() -> None:
    # Known answer: three classes of flat colour; each class's generated tiles must be nearest its own colour.
    colours = torch.tensor([[0.8, -0.6, -0.6], [-0.6, 0.8, -0.6], [-0.6, -0.6, 0.8]])
    labels = torch.tensor([0] * 6 + [1] * 6 + [2] * 3)
    torch.manual_seed(0)
    images = colours[labels][:, :, None, None].expand(-1, 3, 32, 32) + 0.1 * torch.randn(15, 3, 32, 32)
    config = BalanceConfig(steps=300, image_size=32, width=16)
    result = train_gan(images, labels, 3, config)
    targets = (colours + 1) * 127.5
    for label in range(3):
        mean = (
            torch.from_numpy(generate(result.generator, label, 8, config.latent_dim, seed=1))
            .float()
            .mean(dim=(0, 1, 2))
        )
        assert int(torch.cdist(mean[None], targets).argmin()) == label, (label, mean)


#: A GAN small enough for a test: 32 px, a few steps, a few report tiles.
TINY_GAN: dict[str, Any] = {
    "enabled": True,
    "steps": 4,
    "image_size": 32,
    "width": 8,
    "batch_size": 4,
    "checkpoint_every": 2,
    "quality": {"tiles_per_class": 4, "kid_subsets": 2},
}


def _unbalanced(make_dataset: DatasetFactory, tmp_path: Path) -> tuple[Path, pd.DataFrame, dict[str, Any]]:
    # Unbalanced on purpose: Viable-Tumor has one slide only.
    source = make_dataset(per_slide=2, slides=4, size=48)
    for tile in sorted((source / "Viable-Tumor").iterdir())[2:]:
        tile.unlink()
    manifest_path = tmp_path / "ingest" / "manifest.csv"
    manifest = ingest(source, CLASSES, manifest_path)
    folds = make_folds(manifest, SplitConfig(n_folds=2), CLASSES)
    write_folds(folds, tmp_path / "folds.json", manifest_path)
    return manifest_path, manifest, folds


def _config(tmp_path: Path, **balance: Any) -> Config:
    return Config.from_dict(
        {
            "balance": {**TINY_GAN, **balance},
            "baseline": {"trees": 10},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "balance"},
        }
    )


def test_balance_stage_marks_synthetic_tiles_and_keeps_them_out_of_validation(
    make_dataset: DatasetFactory, tmp_path: Path
) -> None:
    manifest_path, manifest, folds = _unbalanced(make_dataset, tmp_path)
    summary = run_balance(
        _config(tmp_path, gate="always"),
        manifest_path,
        tmp_path / "folds.json",
        tmp_path / "balance",
        project_dir=tmp_path,
    )

    assert set(summary["sets"]) == {"fold-0", "fold-1", "full"}
    for k in range(2):
        train_rows, val_rows = split_tables(manifest, folds, k)
        table = load_training_table(tmp_path / "balance", f"fold-{k}", manifest_path.parent)
        real, synthetic = table[~table["synthetic"]], table[table["synthetic"]]
        # Real rows are exactly this fold's training tiles: no validation tile, no synthetic tile from elsewhere.
        assert set(real["path"]) == set(train_rows["path"])
        assert not set(real["path"]) & set(val_rows["path"])
        assert all(Path(f).is_file() for f in table["file"])
        assert (synthetic["case"] == "synthetic").all()
        generated = summary["sets"][f"fold-{k}"]["generated"]
        assert len(synthetic) == sum(generated.values())
        counts = summary["sets"][f"fold-{k}"]["counts_after"]
        present = [c for c in CLASSES if summary["sets"][f"fold-{k}"]["counts_before"][c] > 0]
        assert len({counts[c] for c in present}) == 1  # balanced to the largest class
    full = pd.read_csv(tmp_path / "balance" / "full" / "train_manifest.csv")
    assert full["synthetic"].sum() == summary["sets"]["full"]["generated"]["Viable-Tumor"] > 0
    # Every set's figures, also gathered in one folder for `dvc plots show`.
    sheets = tmp_path / "balance" / "gan_samples"
    drawn = sorted(name for name, info in summary["sets"].items() if sum(info["generated"].values()))
    assert "full" in drawn
    expected = sorted(f"{name}{suffix}.png" for name in drawn for suffix in ("", "-closest", "-losses"))
    assert sorted(p.name for p in sheets.iterdir()) == sorted([*expected, "ablation.png"])
    for name in drawn:
        assert (sheets / f"{name}.png").read_bytes() == (tmp_path / "balance" / name / "gan_samples.png").read_bytes()
    # The gate (always, here) is recorded, with the quality reports and the ablation beside it.
    decision = read_decision(tmp_path / "balance")
    assert decision["use_synthetic"] is True
    assert decision["reason"].startswith("balance.gate is always")
    report = (tmp_path / "balance" / "ablation.md").read_text()
    assert "| fold-1 |" in report  # fold 0 has no Viable-Tumor tile to fill, so no GAN
    assert "oversampled real tiles" in report


def test_every_synthetic_tile_carries_its_provenance_in_its_row_its_png_and_mlflow(
    make_dataset: DatasetFactory, tmp_path: Path
) -> None:
    manifest_path, _, _ = _unbalanced(make_dataset, tmp_path)
    summary = run_balance(
        _config(tmp_path), manifest_path, tmp_path / "folds.json", tmp_path / "balance", project_dir=tmp_path
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name, info in summary["sets"].items():
        if info["gan"] is None:
            continue
        rows = pd.read_csv(tmp_path / "balance" / name / "train_manifest.csv")
        synthetic = rows[rows["synthetic"]]
        assert len(synthetic) == sum(info["generated"].values()) > 0
        run_id = info["gan"]["run_id"]
        assert set(synthetic["generator_run_id"]) == {run_id}
        assert set(synthetic["training_set"]) == {name}
        for _, row in synthetic.iterrows():
            chunks = read_png_provenance(tmp_path / "balance" / name / row["path"])
            assert chunks == {
                "synthetic": "true",
                "generator_run_id": run_id,
                "training_set": name,
                "gan_seed": str(int(row["gan_seed"])),
                "gan_index": str(int(row["gan_index"])),
                "class": row["label"],
            }
        # The seed and index give the same tile back from the generator run's weights... and the run holds the
        # quality report: its figures, its verdict and the sheets.
        run = client.get_run(run_id)
        assert run.info.run_name == f"gan-{name}"
        assert run.info.status == "FINISHED"
        quality = info["quality"]
        assert run.data.metrics["gan_kid"] == pytest.approx(quality["kid"])
        assert run.data.metrics["gan_two_sample_accuracy"] == pytest.approx(quality["two_sample_accuracy"])
        assert run.data.tags["bonetumor.gan.quality"] == ("passed" if quality["passed"] else "failed")
        logged = {a.path for a in client.list_artifacts(run_id, "quality")}
        assert {"quality/gan_samples.png", "quality/gan_closest_pairs.png", "quality/quality.json"} <= logged
        assert [m.step for m in client.get_metric_history(run_id, "d_loss")] == [4]  # every 10 steps, and the last
    experiment = client.get_experiment_by_name("balance")
    assert experiment is not None
    ablation = client.search_runs([experiment.experiment_id], "attributes.run_name = 'balance-ablation'")
    assert len(ablation) == 1
    decision = read_decision(tmp_path / "balance")
    assert ablation[0].data.tags["bonetumor.balance.use_synthetic"] == str(decision["use_synthetic"])
    assert {"none_macro_f1_mean", "gan_macro_f1_mean", "oversample_macro_f1_mean"} <= set(ablation[0].data.metrics)


def test_a_gan_that_fails_its_quality_report_is_never_trained_on(make_dataset: DatasetFactory, tmp_path: Path) -> None:
    manifest_path, manifest, folds = _unbalanced(make_dataset, tmp_path)
    # A 4-step GAN's tiles are noise: a two-sample classifier tells them apart (the bar here is 0.5).
    config = _config(tmp_path, quality={**TINY_GAN["quality"], "max_two_sample_accuracy": 0.5})
    run_balance(config, manifest_path, tmp_path / "folds.json", tmp_path / "balance", project_dir=tmp_path)
    decision = read_decision(tmp_path / "balance")
    assert decision["use_synthetic"] is False
    assert "balance.quality.max_two_sample_accuracy 0.5" in decision["reason"]
    for name in ("fold-0", "fold-1", "full"):
        raw = pd.read_csv(tmp_path / "balance" / name / "train_manifest.csv")
        used = load_training_table(tmp_path / "balance", name, manifest_path.parent)
        assert not used["synthetic"].any()
        assert len(used) == (~raw["synthetic"]).sum()
    assert pd.read_csv(tmp_path / "balance" / "fold-1" / "train_manifest.csv")["synthetic"].any()
    # With the folds' tiles refused, the refit's set gets no GAN at all.
    assert not pd.read_csv(tmp_path / "balance" / "full" / "train_manifest.csv")["synthetic"].any()
    summary = json.loads((tmp_path / "balance" / "summary.json").read_text())
    assert summary["sets"]["full"]["skipped"] == "no GAN: the gate refused the folds' GAN tiles"
    # The ablation still read them all: its GAN arm trained on more tiles than its real-only arm. Every arm is
    # scored on the fold's validation tiles of the data set manifest: real tiles, none of them synthetic.
    ablation = json.loads((tmp_path / "balance" / "ablation.json").read_text())
    for arm in ablation["arms"].values():
        for row in arm["per_fold"]:
            assert row["n_val"] == len(split_tables(manifest, folds, int(row["fold"]))[1])
    for gan, none in zip(ablation["arms"]["gan"]["per_fold"], ablation["arms"]["none"]["per_fold"], strict=True):
        assert gan["n_train"] >= none["n_train"]
    assert any(
        g["n_train"] > n["n_train"]
        for g, n in zip(ablation["arms"]["gan"]["per_fold"], ablation["arms"]["none"]["per_fold"], strict=True)
    )


def _summary(passed: bool = True) -> dict[str, Any]:
    quality = {"passed": passed, "failures": [] if passed else ["two-sample accuracy 1.00 > ..."]}
    return {"sets": {"fold-0": {"generated": {"a": 3}, "quality": quality}, "full": {"generated": {"a": 0}}}}


def _ablation(none: float, gan: float, none_recall: float = 0.5, gan_recall: float = 0.5) -> dict[str, Any]:
    def arm(f1: float, recall: float) -> dict[str, Any]:
        return {"macro_f1": {"mean": f1}, "minority_recall": {"mean": recall}}

    return {"arms": {"none": arm(none, none_recall), "gan": arm(gan, gan_recall)}}


def test_the_gate_refuses_tiles_the_ablation_shows_hurting_and_says_by_how_much() -> None:
    config = Config.from_dict({"balance": {"enabled": True, "ablation": {"max_macro_f1_drop": 0.02}}})
    assert gate(config, _summary(), _ablation(0.80, 0.79))["use_synthetic"] is True  # within the tolerance
    hurt = gate(config, _summary(), _ablation(0.80, 0.70))
    assert hurt["use_synthetic"] is False
    assert "from 0.800 (real tiles only) to 0.700, more than balance.ablation.max_macro_f1_drop 0.02" in hurt["reason"]
    recall = gate(config, _summary(), _ablation(0.80, 0.80, none_recall=0.9, gan_recall=0.6))
    assert recall["use_synthetic"] is False
    assert "max_minority_recall_drop" in recall["reason"]
    assert gate(config, _summary(passed=False), _ablation(0.8, 0.9))["use_synthetic"] is False
    never = Config.from_dict({"balance": {"enabled": True, "gate": "never"}})
    assert gate(never, _summary(), _ablation(0.5, 0.9))["use_synthetic"] is False
    always = Config.from_dict({"balance": {"enabled": True, "gate": "always"}})
    forced = gate(always, _summary(passed=False), _ablation(0.9, 0.5))
    assert forced["use_synthetic"] is True
    assert "though" in forced["reason"]
    nothing = {"sets": {"fold-0": {"generated": {"a": 0}}}}
    assert "no synthetic tile was needed" in gate(config, nothing, None)["reason"]


def test_oversampling_repeats_only_the_short_classes_tiles_up_to_the_target() -> None:
    rows = pd.DataFrame({"label": ["a"] * 6 + ["b"] * 2 + ["c"] * 4, "path": [f"t{i}" for i in range(12)]})
    out = oversample(rows, "label", 1.0, seed=3)
    assert out["label"].value_counts().to_dict() == {"a": 6, "b": 6, "c": 6}
    assert set(rows["path"]) <= set(out["path"])
    assert len(out.drop_duplicates()) == 12
    assert set(out[out["label"] == "b"]["path"]) == {"t6", "t7"}  # a class's repeats are its own tiles
    assert out.equals(oversample(rows, "label", 1.0, seed=3))
    assert oversample(rows, "label", 0.5, seed=3)["label"].value_counts().to_dict() == {"a": 6, "b": 3, "c": 4}


def test_a_killed_gan_training_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    images, labels = torch.rand(12, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2] * 4)
    config = BalanceConfig(**{**TINY_GAN, "steps": 6, "quality": {}})
    reference = train_gan(images, labels, 3, config, "reference")
    monkeypatch.setenv(FAULT_ENV, "raise@gan-step#5")  # killed before step 5; the checkpoint of step 4 is there
    with pytest.raises(InjectedFaultError):
        train_gan(images, labels, 3, config, "killed", checkpoint_dir=tmp_path)
    assert (tmp_path / GAN_CHECKPOINT).is_file()
    monkeypatch.delenv(FAULT_ENV)
    resumed = train_gan(images, labels, 3, config, "killed", checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 4
    for (name, ours), theirs in zip(
        resumed.generator.state_dict().items(), reference.generator.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    assert [row["step"] for row in resumed.history] == [row["step"] for row in reference.history] == [6.0]
    # Another seed is another training: its checkpoint is not resumed.
    other = train_gan(images, labels, 3, config, "killed", seed=9, checkpoint_dir=tmp_path)
    assert other.resumed_from == 0


def test_a_tile_is_named_by_its_seed_and_index_alone() -> None:
    torch.manual_seed(0)
    result = train_gan(
        torch.rand(6, 3, 32, 32) * 2 - 1, torch.tensor([0, 1] * 3), 2, BalanceConfig(**{**TINY_GAN, "quality": {}})
    )
    five = generate(result.generator, 1, 5, 64, seed=11)
    assert (generate(result.generator, 1, 2, 64, seed=11) == five[:2]).all()  # the same tiles, however many drawn
    assert not (generate(result.generator, 1, 2, 64, seed=12) == five[:2]).all()
    state = torch.get_rng_state()
    generate(result.generator, 0, 3, 64, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched


def test_the_full_sets_kubeflow_task_records_the_decision_the_ablation_made(
    make_dataset: DatasetFactory, tmp_path: Path
) -> None:
    manifest_path, _, _ = _unbalanced(make_dataset, tmp_path)
    config, folds = _config(tmp_path, gate="always"), tmp_path / "folds.json"
    parts = [tmp_path / f"part-{k}" for k in range(2)]
    for k, part in enumerate(parts):
        run_balance(config, manifest_path, folds, part, [f"fold-{k}"], project_dir=tmp_path)
        assert not (part / "decision.json").exists()  # one fold alone: the gate waits for the others
    merged = merge_balance_outputs(
        config, parts, tmp_path / "merged", manifest_path=manifest_path, folds_path=folds, project_dir=tmp_path
    )
    assert read_decision(tmp_path / "merged") == merged["decision"]
    run_balance(
        config, manifest_path, folds, tmp_path / "full", ["full"], project_dir=tmp_path, decision=merged["decision"]
    )
    assert read_decision(tmp_path / "full") == merged["decision"]
    # The sets balanced apart are the sets balanced together: the same tiles, byte for byte.
    run_balance(config, manifest_path, folds, tmp_path / "together", project_dir=tmp_path)
    for name, folder in (("fold-1", tmp_path / "merged"), ("full", tmp_path / "full")):
        ours = sorted((folder / name / "synthetic").rglob("*.png"))
        theirs = sorted((tmp_path / "together" / name / "synthetic").rglob("*.png"))
        assert [p.name for p in ours] == [p.name for p in theirs]
        assert ours
        assert all(a.read_bytes() != b"" and _pixels(a) == _pixels(b) for a, b in zip(ours, theirs, strict=True))


def _pixels(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as image:
        return image.tobytes()


def test_a_synthetic_tile_without_a_decision_is_refused(make_dataset: DatasetFactory, tmp_path: Path) -> None:
    manifest_path, _, _ = _unbalanced(make_dataset, tmp_path)
    run_balance(
        _config(tmp_path), manifest_path, tmp_path / "folds.json", tmp_path / "b", ["full"], project_dir=tmp_path
    )
    with pytest.raises(ArtifactError, match="holds synthetic tiles but no gate decision"):
        load_training_table(tmp_path / "b", "full", manifest_path.parent)


def test_an_unknown_augmentation_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown augmentation"):
        Config.from_dict({"balance": {"diffaugment": "color,blur"}})


def test_disabled_balancing_writes_real_tiles_only(make_dataset: DatasetFactory, tmp_path: Path) -> None:
    manifest_path = tmp_path / "manifest.csv"
    manifest = ingest(make_dataset(per_slide=2, slides=2, size=32), CLASSES, manifest_path)
    write_folds(make_folds(manifest, SplitConfig(n_folds=2), CLASSES), tmp_path / "folds.json", manifest_path)
    config = Config.from_dict({"balance": {"enabled": False}})
    summary = run_balance(config, manifest_path, tmp_path / "folds.json", tmp_path / "balance", project_dir=tmp_path)
    assert all(info["gan"] is None for info in summary["sets"].values())
    assert not load_training_table(tmp_path / "balance", "full", tmp_path)["synthetic"].any()
    assert "balance.enabled is false" in read_decision(tmp_path / "balance")["reason"]
    assert not (tmp_path / "mlflow.db").exists()  # no GAN, no run
    # The folder dvc.yaml lists for `dvc plots show` exists, empty: DVC warns about a listed path that is missing.
    assert list((tmp_path / "balance" / "gan_samples").iterdir()) == []


def test_missing_training_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="run `bonetumor balance` first"):
        load_training_table(tmp_path, "fold-9", tmp_path)
