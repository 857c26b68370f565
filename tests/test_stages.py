"""bonetumor.stages: the shared set-up of every stage entry point, on real stage runs where they are cheap.

Ingest, validate, split and augment run for real on generated tiles. The MLflow stages (train, evaluate,
register) see a stand-in module with a recording stage function here (so these tests neither pay for torch nor
depend on the training code's layout), to check the paths, the tracking override and the returned metadata;
they run for real in the kfp.local test.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CLASSES, DatasetFactory, tiny_params

import bonetumor.stages as stages
from bonetumor.data.manifest import read_manifest
from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.transforms.augment import load_policy

ENV = "MLFLOW_TRACKING_URI"


def test_data_stages_return_the_headline_values_they_wrote(make_dataset: DatasetFactory, tmp_path: Path) -> None:
    make_dataset(per_slide=3, slides=3, size=48)  # tmp_path/generated: 27 tiles, 9 slides, 2 cases
    params = tiny_params()
    ingest_dir, validate_dir, split_dir, augment_dir = (tmp_path / name for name in ("i", "v", "s", "a"))

    # A relative source folder is resolved against the project folder, and replaces data.source.
    ingested = stages.ingest_stage(params, source_dir="generated", out_dir=ingest_dir, project_dir=tmp_path)
    manifest = read_manifest(ingest_dir / "manifest.csv")
    assert ingested == {
        "n_tiles": len(manifest),
        "n_slides": manifest["slide"].nunique(),
        "n_cases": manifest["case"].nunique(),
    }
    assert ingested == {"n_tiles": 27, "n_slides": 9, "n_cases": 2}
    assert len(list((ingest_dir / "images").glob("*/*.jpg"))) == 27  # copied into the artifact
    resolved = yaml.safe_load((ingest_dir / "config.resolved.yaml").read_text())
    assert resolved["data"]["source"] == "generated"
    assert params == tiny_params()  # the caller's dict is not changed

    validated = stages.validate_stage(params, dataset_dir=ingest_dir, out_dir=validate_dir)
    report = json.loads((validate_dir / "report.json").read_text())
    assert validated == {"success": report["success"], "n_tiles": report["n_tiles"]}
    assert validated == {"success": True, "n_tiles": 27}

    split = stages.split_stage(params, dataset_dir=ingest_dir, validation_dir=validate_dir, out_dir=split_dir)
    folds = json.loads((split_dir / "folds.json").read_text())
    assert split == {"n_folds": folds["n_folds"], "group_by": folds["group_by"]}
    assert split["n_folds"] == 2  # tiny_params' split.n_folds, not the default
    # The near-duplicate clusters come from the validation folder's tiles.csv: without it, split refuses.
    with pytest.raises(ArtifactError, match=r"nowhere/tiles\.csv not found"):
        stages.split_stage(params, dataset_dir=ingest_dir, validation_dir=tmp_path / "nowhere", out_dir=tmp_path / "x")

    augmented = stages.augment_stage(params, dataset_dir=ingest_dir, out_dir=augment_dir)
    assert augmented == {"digest": load_policy(augment_dir / "policy.json").digest()}
    assert (augment_dir / "preview.png").is_file()


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"validate": {"min_sise": 32}}, r"validate\.min_sise: unknown key \(did you mean 'min_size'\?\)"),
        ({"split": {"n_folds": "two"}}, r"split\.n_folds: Input should be a valid integer"),
        ({"valdate": {}}, r"unknown section\(s\) \['valdate'\] \(did you mean 'validate'\?\)"),
    ],
)
def test_a_params_typo_is_a_config_error_naming_the_field(
    params: dict[str, Any], named: str, make_dataset: DatasetFactory, tmp_path: Path
) -> None:
    source = make_dataset(per_slide=1, slides=1, size=32)
    with pytest.raises(ConfigError, match=rf"^pipeline params: .*{named}"):
        stages.ingest_stage(params, source_dir=source, out_dir=tmp_path / "ingest")
    assert not (tmp_path / "ingest").exists()  # nothing ran


def test_a_malformed_data_section_is_a_config_error_not_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^pipeline params: "):
        stages.ingest_stage({"data": ["source"]}, source_dir=tmp_path, out_dir=tmp_path / "ingest")


def _fake_module(monkeypatch: pytest.MonkeyPatch, module: str, **functions: Any) -> None:
    """Make ``from <module> import <name>`` find ``functions`` (for this test only)."""
    fake = types.ModuleType(module)
    for name, function in functions.items():
        setattr(fake, name, function)
    monkeypatch.setitem(sys.modules, module, fake)


def _recorder(calls: list[dict[str, Any]], result: dict[str, Any]) -> Any:
    """A stand-in stage function: records its config, arguments and the tracking URI MLflow would use."""
    from bonetumor.registry.tracking import resolve_tracking_uri

    def record(config: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        project = kwargs["project_dir"]
        calls.append(
            {"config": config, "args": args, "kwargs": kwargs, "env": os.environ.get(ENV)}
            | {"uri": resolve_tracking_uri(config.tracking, project)}
        )
        return result

    return record


def test_train_stage_applies_the_tracking_override_only_while_it_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[dict[str, Any]] = []
    runs = {"experiment_id": "7", "architectures": {"resnet50": {"run_id": "r1"}, "vgg19": {"run_id": "r2"}}}
    _fake_module(monkeypatch, "bonetumor.training.cross_validation", run_cross_validation=_recorder(calls, runs))
    monkeypatch.setenv(ENV, "sqlite:///before.db")
    folders = {name: tmp_path / name for name in ("dataset", "folds", "policy", "balance", "validation", "train")}

    def train(tracking_uri: str | None) -> dict[str, Any]:
        return stages.train_stage(
            tiny_params(tracking={"uri": "sqlite:///params.db"}),
            dataset_dir=folders["dataset"],
            folds_dir=folders["folds"],
            policy_dir=str(folders["policy"]),  # plain strings work as well as paths
            balance_dir=folders["balance"],
            validation_dir=folders["validation"],
            out_dir=folders["train"],
            tracking_uri=tracking_uri,
            project_dir=tmp_path,
        )

    assert train("sqlite:///override.db") == {"experiment_id": "7", "run_id_resnet50": "r1", "run_id_vgg19": "r2"}
    assert calls[0]["env"] == "sqlite:///override.db"
    assert calls[0]["uri"] == f"sqlite:///{tmp_path / 'override.db'}"  # beats params' uri, relative to the project
    assert os.environ[ENV] == "sqlite:///before.db"  # restored afterwards
    assert calls[0]["kwargs"] == {
        "manifest_path": folders["dataset"] / "manifest.csv",
        "folds_path": folders["folds"] / "folds.json",
        "policy_path": folders["policy"] / "policy.json",
        "balance_dir": folders["balance"],
        "out_dir": folders["train"],
        "project_dir": tmp_path,
        "validation_dir": folders["validation"],
    }
    assert calls[0]["config"].train.steps == 2  # the params dict, not the defaults

    train("")  # no override: what was set stays
    assert calls[1]["env"] == "sqlite:///before.db"
    monkeypatch.delenv(ENV)
    train(None)
    assert calls[2]["env"] is None
    assert calls[2]["uri"] == f"sqlite:///{tmp_path / 'params.db'}"
    assert ENV not in os.environ
    train("sqlite:///override.db")  # an override where none was set is removed again
    assert calls[3]["env"] == "sqlite:///override.db"
    assert ENV not in os.environ


def test_evaluate_stage_returns_each_outputs_metadata_and_copies_the_comparison(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    matrix = [[3, 0, 0], [0, 2, 1], [0, 0, 4]]
    result = {
        "winner": "vgg19",
        "ranking": ["vgg19", "resnet50"],
        "selection": "macro-F1",
        "scores": {
            "vgg19": {
                "accuracy": 0.9,
                "fold_f1_macro_mean": 0.8,
                "n": 10,
                "beats_baseline": True,
                "confusion_matrix": matrix,
                "per_class": {},
            },
            "resnet50": {"accuracy": 0.5, "n": 10, "confusion_matrix": matrix},
        },
    }
    calls: list[dict[str, Any]] = []
    record = _recorder(calls, result)

    def run_evaluation(
        config: Any, train_dir: Path, out_dir: Path, project_dir: Path, balance_dir: Path | None
    ) -> dict[str, Any]:
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "comparison.md").write_text("# Model comparison\n\n| vgg19 |\n", encoding="utf-8")
        return record(config, train_dir=train_dir, out_dir=out_dir, project_dir=project_dir)

    _fake_module(
        monkeypatch, "bonetumor.evaluation.evaluate", run_evaluation=run_evaluation, COMPARISON_MD_FILE="comparison.md"
    )
    comparison = tmp_path / "kfp" / "comparison"
    got = stages.evaluate_stage(
        {},
        train_dir=tmp_path / "train",
        out_dir=tmp_path / "evaluate",
        comparison_path=comparison,
        tracking_uri="sqlite:///e.db",
        project_dir=tmp_path,
    )
    assert got == {
        "evaluation": {"winner": "vgg19", "ranking": ["vgg19", "resnet50"], "selection": "macro-F1"},
        "registration": {
            "allowed": True,
            "reason": "vgg19: mean per-fold macro-F1 0.800 >= register.min_macro_f1 0.0",
        },
        "metrics": {"accuracy": 0.9, "fold_f1_macro_mean": 0.8, "n": 10.0},  # the winner's numbers only
        "confusion_matrix": {"classes": list(CLASSES), "matrix": matrix, "arch": "vgg19"},
    }
    assert all(type(value) is float for value in got["metrics"].values())
    assert calls[0]["env"] == "sqlite:///e.db"
    assert comparison.read_bytes() == (tmp_path / "evaluate" / "comparison.md").read_bytes()


def test_register_stage_resolves_the_artifact_files_and_reports_the_champion(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    champion = {key: f"<{key}>" for key in stages.CHAMPION_KEYS} | {"gate": {"reason": "first"}, "test": None}
    calls: list[dict[str, Any]] = []
    _fake_module(monkeypatch, "bonetumor.registry.register", run_registration=_recorder(calls, champion))
    got = stages.register_stage(
        {},
        dataset_dir=tmp_path / "dataset",
        policy_dir=tmp_path / "policy",
        balance_dir=tmp_path / "balance",
        train_dir=tmp_path / "train",
        evaluate_dir=tmp_path / "evaluate",
        folds_dir=tmp_path / "folds",
        out_dir=tmp_path / "model",
    )
    assert got == {key: f"<{key}>" for key in stages.CHAMPION_KEYS}
    kwargs = calls[0]["kwargs"]
    assert kwargs["manifest_path"] == tmp_path / "dataset" / "manifest.csv"
    assert kwargs["policy_path"] == tmp_path / "policy" / "policy.json"
    assert kwargs["folds_path"] == tmp_path / "folds" / "folds.json"
    assert kwargs["project_dir"] == Path.cwd()  # the task's working folder by default
    assert calls[0]["env"] is None  # no override given


def test_fetch_weights_reads_params_only_when_no_architecture_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import bonetumor.training.models as models  # also what config validation reads architectures from

    monkeypatch.setattr(models, "fetch_imagenet_weights", lambda archs: [tmp_path / f"{a}.pth" for a in archs])
    assert stages.fetch_weights(["vgg19"], tmp_path / "missing.yaml") == [("vgg19", tmp_path / "vgg19.pth")]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"architectures": ["resnet50", "vgg19"]}}))
    assert [arch for arch, _ in stages.fetch_weights([], params)] == ["resnet50", "vgg19"]
    with pytest.raises(ConfigError, match="params file not found"):
        stages.fetch_weights([], tmp_path / "missing.yaml")


def test_importing_the_module_pulls_in_no_adapter_or_heavy_library() -> None:
    import subprocess
    import sys

    script = (
        "import sys, bonetumor.stages; "
        "print(sorted(m for m in ('kfp', 'dvc', 'bentoml', 'torch', 'mlflow', 'great_expectations') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
