from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import CLASSES, DatasetFactory

from bonetumor.balance.gan import deficits, generate, run_balance, train_gan
from bonetumor.config import BalanceConfig, Config, SplitConfig
from bonetumor.data.datasets import load_training_table, split_tables
from bonetumor.data.ingest import ingest
from bonetumor.data.split import make_folds, write_folds
from bonetumor.errors import ArtifactError


def test_deficits_fill_up_to_the_target_ratio() -> None:
    assert deficits({"a": 10, "b": 4, "c": 7}, 1.0) == {"a": 0, "b": 6, "c": 3}
    assert deficits({"a": 10, "b": 4, "c": 7}, 0.5) == {"a": 0, "b": 1, "c": 0}
    assert deficits({"a": 10, "b": 0}, 1.0) == {"a": 0, "b": 0}  # never invent a class the GAN never saw


@pytest.fixture
def _one_torch_thread() -> Iterator[None]:
    """One torch thread: with the default two, OpenMP's threads crawl when other jobs share the cores (366 s
    against 28 s for the GAN test below, measured on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("_one_torch_thread")
def test_conditional_gan_learns_the_colour_of_each_class() -> None:
    # Known answer: three classes of flat colour; each class's generated tiles must be nearest its own colour.
    colours = torch.tensor([[0.8, -0.6, -0.6], [-0.6, 0.8, -0.6], [-0.6, -0.6, 0.8]])
    labels = torch.tensor([0] * 6 + [1] * 6 + [2] * 3)
    torch.manual_seed(0)
    images = colours[labels][:, :, None, None].expand(-1, 3, 32, 32) + 0.1 * torch.randn(15, 3, 32, 32)
    config = BalanceConfig(steps=300, image_size=32)
    result = train_gan(images, labels, 3, config)
    targets = (colours + 1) * 127.5
    for label in range(3):
        mean = (
            torch.from_numpy(generate(result.generator, label, 8, config.latent_dim, seed=1))
            .float()
            .mean(dim=(0, 1, 2))
        )
        assert int(torch.cdist(mean[None], targets).argmin()) == label, (label, mean)


def test_balance_stage_marks_synthetic_tiles_and_keeps_them_out_of_validation(
    make_dataset: DatasetFactory, tmp_path: Path
) -> None:
    # Unbalanced on purpose: Viable-Tumor has one slide only.
    source = make_dataset(per_slide=2, slides=4, size=48)
    for tile in sorted((source / "Viable-Tumor").iterdir())[2:]:
        tile.unlink()
    manifest_path = tmp_path / "ingest" / "manifest.csv"
    manifest = ingest(source, CLASSES, manifest_path)
    folds = make_folds(manifest, SplitConfig(n_folds=2), CLASSES)
    write_folds(folds, tmp_path / "folds.json", manifest_path)
    config = Config.from_dict({"balance": {"enabled": True, "steps": 5, "image_size": 16, "batch_size": 4}})
    summary = run_balance(config, manifest_path, tmp_path / "folds.json", tmp_path / "balance")

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
    # Every set's sample grid, also gathered in one folder for `dvc plots show`.
    sheets = tmp_path / "balance" / "gan_samples"
    drawn = sorted(name for name, info in summary["sets"].items() if sum(info["generated"].values()))
    assert "full" in drawn
    assert sorted(p.name for p in sheets.iterdir()) == [f"{name}.png" for name in drawn]
    for name in drawn:
        assert (sheets / f"{name}.png").read_bytes() == (tmp_path / "balance" / name / "gan_samples.png").read_bytes()


def test_disabled_balancing_writes_real_tiles_only(make_dataset: DatasetFactory, tmp_path: Path) -> None:
    manifest_path = tmp_path / "manifest.csv"
    manifest = ingest(make_dataset(per_slide=2, slides=2, size=32), CLASSES, manifest_path)
    write_folds(make_folds(manifest, SplitConfig(n_folds=2), CLASSES), tmp_path / "folds.json", manifest_path)
    config = Config.from_dict({"balance": {"enabled": False}})
    summary = run_balance(config, manifest_path, tmp_path / "folds.json", tmp_path / "balance")
    assert all(info["gan"] is None for info in summary["sets"].values())
    assert not load_training_table(tmp_path / "balance", "full", tmp_path)["synthetic"].any()
    # The folder dvc.yaml lists for `dvc plots show` exists, empty: DVC warns about a listed path that is missing.
    assert list((tmp_path / "balance" / "gan_samples").iterdir()) == []


def test_missing_training_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="run `bonetumor balance` first"):
        load_training_table(tmp_path, "fold-9", tmp_path)
