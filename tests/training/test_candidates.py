from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from conftest import CLASSES, DatasetFactory, plain_policy, tiny_params
from tiny_arch import register_tiny
from torch import nn

from bonetumor.config import Config
from bonetumor.data.datasets import TileDataset, label_indices
from bonetumor.errors import ConfigError, DatasetError
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.serving.predictor import load_bundle
from bonetumor.training.candidates import FitContext, TrainingSet, build_candidates, pruned, two_stage
from bonetumor.training.candidates.base import probabilities
from bonetumor.training.candidates.baseline import BaselineCandidate, load_baseline
from bonetumor.training.candidates.ensemble import EnsembleCandidate
from bonetumor.training.candidates.int8 import Int8Candidate, int8_classifier, onnx_logits, select_calibration_files
from bonetumor.training.candidates.network import NetworkCandidate, TorchFitted
from bonetumor.training.candidates.pruned import fit_pruned_vgg
from bonetumor.training.candidates.two_stage import (
    LOG_PROB_FLOOR,
    TwoStageModel,
    build_two_stage,
    class_roles,
    fit_two_stage,
)
from bonetumor.training.engine import FitResult
from bonetumor.training.export import OnnxClassifier, cpu_latency_ms
from bonetumor.training.models import build_model, resolve_weights
from bonetumor.training.pruning import channel_plan
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.preprocess import build_eval_transform
from bonetumor.utils import EtaTimer

SIZE = 32
TINY = "tiny_cnn"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # every test here: tiny models, shared cores


class Take(nn.Module):
    """A 'stage' whose two logits are two input channels at pixel (0, 0): outputs set by hand through the input."""

    def __init__(self, first: int) -> None:
        super().__init__()
        self.first = first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.first : self.first + 2, 0, 0]


def stage_inputs(pt: list[float], pv: list[float]) -> torch.Tensor:
    """Inputs whose stage logits are log(1-p), log(p): softmax of them gives back exactly pt and pv."""
    t, v = torch.tensor(pt, dtype=torch.float64), torch.tensor(pv, dtype=torch.float64)
    channels = torch.stack([torch.log1p(-t), torch.log(t), torch.log1p(-v), torch.log(v)], dim=1)
    return channels[:, :, None, None].float()


def test_two_stage_maps_stage_probabilities_to_the_three_classes() -> None:
    model = TwoStageModel(Take(0), Take(2), CLASSES, safe_class="Non-Tumor", target_class="Viable-Tumor")
    x = stage_inputs(pt=[0.8, 0.1, 0.5], pv=[0.25, 0.9, 0.5])

    logits = model(x)
    probs = torch.softmax(logits, dim=1).double()

    expected = torch.tensor(
        [
            [0.2, 0.8 * 0.75, 0.8 * 0.25],  # P(NT)=1-pt, P(NVT)=pt(1-pv), P(VT)=pt*pv
            [0.9, 0.1 * 0.1, 0.1 * 0.9],
            [0.5, 0.25, 0.25],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    # The outputs are log-probabilities already: exp sums to 1 without softmax.
    torch.testing.assert_close(logits.exp().sum(1).double(), torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_two_stage_follows_the_class_order_and_the_referral_roles() -> None:
    classes = ("Viable-Tumor", "Non-Tumor", "Non-Viable-Tumor")
    model = TwoStageModel(Take(0), Take(2), classes, safe_class="Non-Tumor", target_class="Viable-Tumor")
    probs = torch.softmax(model(stage_inputs(pt=[0.8], pv=[0.25])), dim=1)[0]
    torch.testing.assert_close(probs, torch.tensor([0.2, 0.2, 0.6]), atol=1e-6, rtol=0)

    # Other names: the roles come from safe/target, the third class is whatever remains.
    roles = class_roles(("a", "b", "c"), safe_class="c", target_class="a")
    assert (roles.safe, roles.other, roles.target) == (2, 1, 0)


@pytest.mark.parametrize(
    ("classes", "safe", "target", "message"),
    [
        (CLASSES[:2], "Non-Tumor", "Viable-Tumor", "exactly 3 classes"),
        ((*CLASSES, "Mixed"), "Non-Tumor", "Viable-Tumor", "exactly 3 classes"),
        (CLASSES, "Non-Tumor", "Non-Tumor", "both 'Non-Tumor'"),
        (CLASSES, "Normal", "Viable-Tumor", "safe_class='Normal'"),
    ],
)
def test_two_stage_rejects_classes_it_cannot_map(
    classes: tuple[str, ...], safe: str, target: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        TwoStageModel(Take(0), Take(2), classes, safe, target)


def test_two_stage_outputs_stay_finite_for_saturated_stages() -> None:
    model = TwoStageModel(Take(0), Take(2), CLASSES, "Non-Tumor", "Viable-Tumor")
    x = torch.tensor([[0.0, 1e4, -1e4, 1e4], [1e4, 0.0, 1e4, 0.0]])[:, :, None, None]
    out = model(x)
    assert torch.isfinite(out).all()
    assert out.min() >= LOG_PROB_FLOOR
    assert out.argmax(1).tolist() == [CLASSES.index("Viable-Tumor"), CLASSES.index("Non-Tumor")]
    # P(NVT) = 1 * exp(-1e4) and P(VT), P(NVT) in row 2 underflow to 0: floored, not -inf.
    assert out[0, 1] == LOG_PROB_FLOOR


def test_candidates_are_built_by_name_from_params_each_after_its_bases() -> None:
    extras = {"two_stage": True, "two_stage_arch": "resnet50", "pruned_vgg19": True, "int8": True}
    config = Config.from_dict(tiny_params(train={"architectures": ["resnet50", "vgg19"]}, candidates=extras))
    built = build_candidates(config)
    names = [c.name for c in built]
    assert names == [
        "baseline",
        "resnet50",
        "vgg19",
        "ensemble",
        "two_stage_resnet50",
        "vgg19_pruned",
        "resnet50_int8",
        "vgg19_int8",
    ]
    position = {name: i for i, name in enumerate(names)}
    assert all(position[base] < position[c.name] for c in built for base in c.bases)
    by_name = {c.name: c for c in built}
    assert by_name["ensemble"].bases == ("resnet50", "vgg19")
    assert by_name["vgg19_pruned"].bases == ("vgg19",)
    assert by_name["resnet50_int8"].bases == ("resnet50",)
    assert [c.name for c in built if c.section == "architectures"] == ["resnet50", "vgg19"]
    assert [c.name for c in built if c.section == "baseline"] == ["baseline"]
    # One architecture and no extras: the baseline and the network, and no ensemble of one.
    single = Config.from_dict(tiny_params(train={"architectures": ["vgg19"]}))
    assert [c.name for c in build_candidates(single)] == ["baseline", "vgg19"]


# --- training ---------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_arch(monkeypatch: pytest.MonkeyPatch) -> str:
    """Register a tiny architecture for the duration of a test, so fit_two_stage trains in a second."""
    return register_tiny(monkeypatch, TINY)


def _config(**train: object) -> Config:
    return Config.from_dict(
        tiny_params(
            augment={"stain_normalization": "none", "hed_jitter": 0.0},
            train={"progress": False, "checkpoint": False, "device": "cpu", **train},
        )
    )


def _table(root: Path) -> pd.DataFrame:
    files = sorted(root.rglob("*.jpg"))
    return pd.DataFrame({"file": files, "label": [f.parent.name for f in files], "synthetic": False})


@pytest.fixture
def tiles(make_dataset: DatasetFactory) -> pd.DataFrame:
    """27 generated 32 px tiles (3 slides x 3 tiles per class) with a clear colour per class."""
    return _table(make_dataset(per_slide=3, slides=3, size=SIZE))


def test_fit_two_stage_trains_each_stage_on_its_rows_and_learns_the_colours(
    tiny_arch: str, tiles: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(steps=40, eval_every=4, lr=0.03, batch_size=8, scheduler="constant", patience=20, dropout=0.0)
    stop = tiles.iloc[::4]
    seen: list[dict[str, Any]] = []
    real_fit = two_stage.fit

    def recording_fit(model: nn.Module, train_set: TileDataset, stop_set: TileDataset | None, *a: Any, **k: Any):  # type: ignore[no-untyped-def]
        seen.append({"train": list(train_set.labels), "stop": None if stop_set is None else list(stop_set.labels)})
        return real_fit(model, train_set, stop_set, *a, **k)

    monkeypatch.setattr(two_stage, "fit", recording_fit)
    evaluations: list[dict[str, float]] = []
    model = fit_two_stage(
        tiny_arch,
        tiles,
        stop,
        config,
        plain_policy(hflip_p=0.5, vflip_p=0.5),
        None,
        torch.device("cpu"),
        "two_stage tiny",
        seed=0,
        on_eval=evaluations.append,
    )

    labels = list(tiles["label"])
    tumour = [int(label != "Non-Tumor") for label in labels]
    assert seen[0]["train"] == tumour
    assert seen[1]["train"] == [int(label == "Viable-Tumor") for label in labels if label != "Non-Tumor"]
    assert seen[1]["stop"] == [int(label == "Viable-Tumor") for label in stop["label"] if label != "Non-Tumor"]
    assert set(model.histories) == {"stage1", "stage2"}
    # Stage 2 continues stage 1's step axis.
    assert [e["step"] for e in evaluations] == list(range(4, 41, 4)) + list(range(44, 81, 4))
    assert "stage1_train_loss" in evaluations[0]
    assert "stage2_val_loss" in evaluations[-1]

    transform = build_eval_transform(config.preprocess)
    x = torch.stack([transform(decode_image(f)) for f in tiles["file"]])
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(tiles), 3)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(len(tiles)), atol=1e-5, rtol=0)
    truth = np.array(label_indices(labels, CLASSES))
    assert (logits.argmax(1).numpy() == truth).mean() >= 0.9
    # A rebuilt model loads the trained weights strictly (how a saved two-stage model is restored).
    rebuilt = build_two_stage(tiny_arch, config, weights="none").eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), logits)


def test_build_two_stage_makes_binary_stages_of_the_architecture() -> None:
    config = _config()
    model = build_two_stage("resnet50", config).eval()
    for stage in (model.stage1, model.stage2):
        assert [m for m in stage.modules() if isinstance(m, nn.Linear)][-1].out_features == 2
    with torch.no_grad():
        out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 3)
    with pytest.raises(ConfigError, match="exactly 3 classes"):
        build_two_stage("resnet50", Config.from_dict({"data": {"classes": ["Non-Tumor", "Viable-Tumor"]}}))


def test_fit_two_stage_needs_both_classes_of_each_stage(tiny_arch: str, tiles: pd.DataFrame) -> None:
    config = _config()
    no_viable = tiles[tiles["label"] != "Viable-Tumor"]
    with pytest.raises(DatasetError, match="stage2: the training table has no viable tumour tiles"):
        fit_two_stage(tiny_arch, no_viable, None, config, plain_policy(), None, torch.device("cpu"), "x")
    wrong = tiles.assign(label=tiles["label"].replace({"Non-Tumor": "Normal"}))
    with pytest.raises(DatasetError, match="Normal"):
        fit_two_stage(tiny_arch, wrong, None, config, plain_policy(), None, torch.device("cpu"), "x")


def test_fit_pruned_vgg_returns_a_smaller_model_that_predicts_three_classes(tiles: pd.DataFrame) -> None:
    tiles = tiles.iloc[::3]  # 9 tiles, 3 per class: one fine-tuning step of VGG19 at 32 px
    config = Config.from_dict(
        tiny_params(
            train={"progress": False, "checkpoint": False, "device": "cpu", "batch_size": 16},
            candidates={"prune_amount": 0.5, "prune_finetune_steps": 1},
        )
    )
    torch.manual_seed(0)
    model = build_model("vgg19", 3, dropout=0.0).eval()
    before = channel_plan(model)
    transform = build_eval_transform(config.preprocess)
    labels = label_indices(list(tiles["label"]), CLASSES)
    train_set = TileDataset(list(tiles["file"]), labels, transform)
    stop_set = TileDataset(list(tiles["file"].iloc[:4]), labels[:4], transform)

    pruned, summary = fit_pruned_vgg(model, "vgg19", train_set, stop_set, config, torch.device("cpu"), "vgg19 pruned")

    assert channel_plan(model) == before  # the plain model is untouched
    assert channel_plan(pruned) == list(summary.plan_after) == [c // 2 for c in before]
    assert sum(p.numel() for p in pruned.parameters()) == summary.params_after < summary.params_before
    assert not pruned.training
    with torch.no_grad():
        out = pruned(torch.stack([train_set[i][0] for i in range(4)]))
    assert out.shape == (4, 3)
    assert torch.isfinite(out).all()


def test_fit_pruned_vgg_fine_tunes_at_the_backbone_rate_without_a_head_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two-phase fine-tuning configured (pretrained weights): the pruned model has a trained head already.
    config = Config.from_dict(
        tiny_params(
            train={
                "weights": "/nowhere/{arch}.pth",
                "head_steps": 2,
                "steps": 5,
                "lr": 1e-3,
                "finetune_lr_factor": 0.1,
            },
            candidates={"prune_finetune_steps": 3},
        )
    )
    calls: list[dict[str, Any]] = []

    def fake_fit(
        model: nn.Module, train_set: Any, stop_set: Any, train: Any, device: Any, steps: int, *a: Any, **k: Any
    ) -> FitResult:
        calls.append({"train": train, "steps": steps, **k})
        return FitResult(model=model)

    monkeypatch.setattr(pruned, "fit", fake_fit)
    model = build_model("vgg19", 3)
    dataset = TileDataset([], [], build_eval_transform(config.preprocess))
    fit_pruned_vgg(model, "vgg19", dataset, None, config, torch.device("cpu"), "x")

    (call,) = calls
    assert call["train"].head_steps == 0
    assert call["train"].lr == pytest.approx(1e-4)
    assert call["steps"] == call["schedule_steps"] == 3
    assert call["arch"] == "vgg19"


def test_fit_pruned_vgg_refuses_non_vgg_architectures() -> None:
    dataset = TileDataset([], [], build_eval_transform(_config().preprocess))
    with pytest.raises(ConfigError, match="cannot prune arch 'resnet50'"):
        fit_pruned_vgg(nn.Linear(1, 1), "resnet50", dataset, None, _config(), torch.device("cpu"), "x")


# --- INT8 and latency --------------------------------------------------------------------------------------------


@pytest.fixture
def colour_model(tiles: pd.DataFrame) -> nn.Module:
    """A tiny CNN trained to tell the class colours apart (well separated, non-trivial logits)."""
    torch.manual_seed(0)
    transform = build_eval_transform(_config().preprocess)
    x = torch.stack([transform(decode_image(f)) for f in tiles["file"]])
    y = torch.tensor(label_indices(list(tiles["label"]), CLASSES))
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(8, 3),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9, "the tiny model did not learn; INT8 check is moot"
    return model


def test_int8_classifier_agrees_with_torch(colour_model: nn.Module, tiles: pd.DataFrame, tmp_path: Path) -> None:
    preprocess = _config().preprocess
    calibration = select_calibration_files(tiles, 6, seed=0)
    classifier, quantized = int8_classifier(
        colour_model, preprocess, None, calibration + calibration, tmp_path, "tiny_int8", classes=CLASSES, max_tiles=6
    )
    assert quantized.method == "static_qdq"
    assert quantized.calibration_images == 6
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(quantized.path)).graph.node}
    assert (tmp_path / "tiny_int8.fp32.onnx").is_file()

    files = list(tiles["file"])
    logits = onnx_logits(classifier, files, batch=5)
    transform = build_eval_transform(preprocess)
    with torch.no_grad():
        expected = colour_model(torch.stack([transform(decode_image(f)) for f in files])).numpy()
    assert logits.shape == (len(files), 3)
    assert logits.dtype == np.float32
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.9
    assert onnx_logits(classifier, []).shape == (0, 3)
    with pytest.raises(ConfigError, match="batch=0"):
        onnx_logits(classifier, files, batch=0)


def test_int8_classifier_exports_a_two_stage_model(tiles: pd.DataFrame, tmp_path: Path) -> None:
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 2))]
    stages.append(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 2)))
    model = TwoStageModel(stages[0], stages[1], CLASSES, "Non-Tumor", "Viable-Tumor").eval()
    classifier, _ = int8_classifier(
        model, _config().preprocess, None, list(tiles["file"][:4]), tmp_path, "ts", classes=CLASSES
    )
    logits = onnx_logits(classifier, list(tiles["file"][:5]))
    assert logits.shape == (5, 3)
    np.testing.assert_allclose(np.exp(logits).sum(1), 1.0, atol=0.05)


def test_select_calibration_files_takes_real_tiles_of_every_class(tiles: pd.DataFrame) -> None:
    table = tiles.copy()
    table.loc[table["label"] == "Viable-Tumor", "synthetic"] = [True] * 8 + [False]
    chosen = select_calibration_files(table, 5, seed=1)
    by_file = dict(zip(table["file"], table["label"], strict=True))
    labels = [by_file[f] for f in chosen]
    assert len(chosen) == 5 == len(set(chosen))
    assert set(labels) == set(CLASSES)
    real_viable = table.loc[(table["label"] == "Viable-Tumor") & ~table["synthetic"], "file"].tolist()
    assert [f for f, label in zip(chosen, labels, strict=True) if label == "Viable-Tumor"] == real_viable
    assert len(select_calibration_files(table, 100)) == int((~table["synthetic"]).sum())


def test_cpu_latency_ms_times_torch_onnx_and_plain_callables(colour_model: nn.Module, tmp_path: Path) -> None:
    colour_model.train()
    assert cpu_latency_ms(colour_model, SIZE, 2, repeats=2) > 0
    assert colour_model.training  # mode restored

    shapes: list[tuple[int, ...]] = []
    assert cpu_latency_ms(lambda b: shapes.append(b.shape), SIZE, 3, warmup=0, repeats=2) > 0
    assert shapes == [(3, 3, SIZE, SIZE)] * 2

    from bonetumor.training.export import export_onnx

    path = export_onnx(colour_model, SIZE, tmp_path / "m.onnx")
    onnx_model = OnnxClassifier(path, CLASSES, build_eval_transform(_config().preprocess), threads=1)
    assert cpu_latency_ms(onnx_model, SIZE, 2, repeats=2) > 0
    with pytest.raises(ConfigError, match="batch=0"):
        cpu_latency_ms(colour_model, SIZE, 0)


# --- the protocol: every fitted kind exports something that loads and predicts the same -------------------------


def _fitted_set(config: Config, tiles: pd.DataFrame) -> tuple[TrainingSet, FitContext]:
    data = TrainingSet("full", tiles, tiles, None, None, seed=0, steps=4)
    context = FitContext(config, plain_policy(), torch.device("cpu"), EtaTimer(8))
    return data, context


def test_each_fitted_kind_exports_what_loads_and_predicts_the_same(
    tiny_arch: str, tiles: pd.DataFrame, tmp_path: Path
) -> None:
    config = _config(architectures=[tiny_arch], weights="none", steps=4, eval_every=2)
    data, context = _fitted_set(config, tiles)
    files = [Path(f) for f in tiles["file"]]
    referral = ReferralPolicy(
        classes=CLASSES,
        temperature=1.5,
        confidence_threshold=0.6,
        target_class="Viable-Tumor",
        target_recall=0.6,
        safe_class="Non-Tumor",
        max_target_prob_when_safe=0.2,
        n_tiles=27,
        coverage=0.5,
        accepted_accuracy=0.9,
        accepted_target_recall=0.8,
        target_met=True,
    )

    network = NetworkCandidate(tiny_arch, resolve_weights(tiny_arch, "none")).fit(data, context, {})
    bundle = network.export(tmp_path / "network", provenance={"run": "r1"}, referral=referral)
    model, metadata = load_bundle(bundle)
    assert metadata.arch == tiny_arch
    assert metadata.provenance == {"run": "r1"}
    assert metadata.referral == referral.to_dict()
    reloaded = TorchFitted(model, tiny_arch, network.config, None, torch.device("cpu"))
    np.testing.assert_allclose(reloaded.logits(files), network.logits(files), atol=1e-5)

    baseline = BaselineCandidate().fit(data, context, {})
    baseline.export(tmp_path / "baseline", provenance={"run": "r2"})
    np.testing.assert_array_equal(load_baseline(tmp_path / "baseline").logits(files), baseline.logits(files))
    assert json.loads((tmp_path / "baseline" / "baseline.json").read_text())["provenance"] == {"run": "r2"}

    context.scratch = tmp_path / "scratch"
    context.scratch.mkdir()
    quantised = Int8Candidate(tiny_arch).fit(data, context, {tiny_arch: network})
    quantised.export(tmp_path / "int8")
    onnx = OnnxClassifier(
        tmp_path / "int8" / "model.int8.onnx", CLASSES, build_eval_transform(network.config.preprocess)
    )
    np.testing.assert_allclose(onnx_logits(onnx, files), quantised.logits(files), atol=1e-6)
    # INT8 is close to the network it was made from, not equal to it.
    assert (quantised.logits(files).argmax(1) == network.logits(files).argmax(1)).mean() >= 0.8

    ensemble = EnsembleCandidate([tiny_arch, "baseline"]).fit(data, context, {tiny_arch: network, "baseline": baseline})
    expected = np.log((probabilities(network.logits(files)) + probabilities(baseline.logits(files))) / 2)
    np.testing.assert_allclose(ensemble.logits(files), expected, atol=1e-5)
    ensemble.export(tmp_path / "ensemble", referral=referral)
    document = json.loads((tmp_path / "ensemble" / "ensemble.json").read_text())
    assert document["members"] == [tiny_arch, "baseline"]
    assert (tmp_path / "ensemble" / tiny_arch / "weights.pt").is_file()
    assert (tmp_path / "ensemble" / "baseline" / "forest.joblib").is_file()
    size = config.preprocess.tile_size
    assert ensemble.latency_ms(size, 2) == pytest.approx(network.latency_ms(size, 2) + baseline.latency_ms(size, 2))


def test_a_derived_candidate_refuses_a_base_of_the_wrong_kind(tiles: pd.DataFrame) -> None:
    config = _config(architectures=["vgg19"], weights="none")
    data, context = _fitted_set(config, tiles)
    baseline = BaselineCandidate().fit(data, context, {})
    with pytest.raises(ConfigError, match="not a torch model"):
        Int8Candidate("vgg19").fit(data, context, {"vgg19": baseline})
    with pytest.raises(ConfigError, match="members \\['vgg19'\\] were not fitted"):
        EnsembleCandidate(["baseline", "vgg19"]).fit(data, context, {"baseline": baseline})
