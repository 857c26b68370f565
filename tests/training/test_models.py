import hashlib
import logging
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import torch
from torchvision import models as tvm

from bonetumor.errors import ConfigError, WeightsCorruptError, WeightsUnavailableError
from bonetumor.training import models
from bonetumor.training.models import (
    ARCHITECTURES,
    OFFLINE_ENV,
    InitWeights,
    build_model,
    cam_layer,
    imagenet_weights_path,
    param_groups,
    resolve_weights,
    set_trainable,
    trainable_parameters,
)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_outputs_one_logit_per_class(arch: str) -> None:
    model = build_model(arch, num_classes=3, dropout=0.3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    assert all(d.p == 0.3 for d in dropouts)
    assert isinstance(cam_layer(model, arch), torch.nn.Module)


#: Per architecture: the prefix of its head's parameters, and which of its parameters form the top block, written
#: out by hand (ResNet50's layer4; VGG19's block 5, features[28:], and VGG19-BN's, features[40:]).
TOP_BLOCKS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "resnet50": ("fc.", lambda name: name.startswith("layer4.")),
    "vgg19": ("classifier.", lambda name: name.startswith("features.") and int(name.split(".")[1]) >= 28),
    "vgg19_bn": ("classifier.", lambda name: name.startswith("features.") and int(name.split(".")[1]) >= 40),
}


@pytest.fixture(scope="module")
def backbone_states() -> dict[str, dict[str, torch.Tensor]]:
    """A random torchvision state dict per architecture, standing in for ImageNet's (frozen layers need one)."""
    torch.manual_seed(0)
    return {arch: spec.build().state_dict() for arch, spec in ARCHITECTURES.items()}


def test_the_expected_trainable_sets_cover_every_architecture() -> None:
    assert set(TOP_BLOCKS) == set(ARCHITECTURES)  # a new architecture needs its row in TOP_BLOCKS


@pytest.mark.parametrize("trainable", ["all", "top", "head"])
@pytest.mark.parametrize("arch", sorted(TOP_BLOCKS))
def test_trainable_freezes_everything_below(
    arch: str, trainable: str, backbone_states: dict[str, dict[str, torch.Tensor]]
) -> None:
    weights = InitWeights(arch, "file", "random stand-in", state=backbone_states[arch])
    model = build_model(arch, 3, weights=weights, trainable=trainable)
    head, in_top = TOP_BLOCKS[arch]
    names = [n for n, _ in model.named_parameters()]
    expected = {
        "all": set(names),
        "top": {n for n in names if n.startswith(head) or in_top(n)},
        "head": {n for n in names if n.startswith(head)},
    }[trainable]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    # The head and the top block are real parts of the model, not empty matches, and "top" sits between the two.
    assert sum(n.startswith(head) for n in names) == 2  # the new linear layer's weight and bias
    assert 0 < sum(map(in_top, names)) < len(names) - 2
    # The loaded weights are there, frozen or not: the backbone is the stand-in's, not a fresh initialisation.
    first = names[0]
    assert torch.equal(model.get_parameter(first).detach(), backbone_states[arch][first])


def test_weights_from_a_path_are_loaded_into_the_backbone(tmp_path: Path) -> None:
    reference = tvm.resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r.pth")
    model = build_model("resnet50", 3, weights=str(tmp_path / "r.pth"))
    assert torch.equal(model.state_dict()["conv1.weight"], reference.state_dict()["conv1.weight"])


def test_weights_of_the_wrong_architecture_are_refused(tmp_path: Path) -> None:
    torch.save(tvm.resnet50(weights=None).state_dict(), tmp_path / "r.pth")
    with pytest.raises(WeightsUnavailableError, match="do not fit torchvision's vgg19"):
        build_model("vgg19", 3, weights=str(tmp_path / "r.pth"))


def test_imagenet_without_the_file_says_how_to_provide_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("resnet50", 3, weights="imagenet")
    message = str(info.value)
    assert "bonetumor weights fetch resnet50" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "never downloads" in message


def test_imagenet_file_with_a_wrong_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = imagenet_weights_path("resnet50")
    path.parent.mkdir(parents=True)
    torch.save(tvm.resnet50(weights=None).state_dict(), path)
    assert not hashlib.sha256(path.read_bytes()).hexdigest().startswith(path.stem.rsplit("-", 1)[1])
    with pytest.raises(WeightsUnavailableError, match="does not match the hash prefix"):
        build_model("resnet50", 3, weights="imagenet")


def fabricated_imagenet_file(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ResNet50 state dict saved under a torchvision-style name whose hash prefix fits its content."""
    torch.manual_seed(3)
    state = tvm.resnet50(weights=None).state_dict()
    scratch = folder / "weights.pth"
    torch.save(state, scratch)
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()[:8]
    path = folder / "hub" / "checkpoints" / f"resnet50-{digest}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch.rename(path)
    return path, state


def test_auto_offline_falls_back_to_random_init_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="bonetumor.training.models"):
        init = resolve_weights("resnet50", "auto")
    assert (init.source, init.fallback, init.state) == ("scratch", True, None)
    assert init.tag == "scratch (no ImageNet weights available)"
    assert len(caplog.records) == 1
    assert "bonetumor weights fetch resnet50" in caplog.text
    # Built from it, frozen layers make no sense: said plainly instead of training a random backbone's head.
    assert build_model("resnet50", 3, weights=init).training
    with pytest.raises(ConfigError, match="starts from random initialisation"):
        build_model("resnet50", 3, weights=init, trainable="head")


def test_auto_tries_torchvisions_download_and_falls_back_when_the_network_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    asked: list[str] = []

    def offline(url: str, dst: str, *args: object, **kwargs: object) -> None:
        asked.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with caplog.at_level(logging.WARNING, logger="bonetumor.training.models"):
        init = resolve_weights("resnet50", "auto")
    assert asked == [tvm.ResNet50_Weights.DEFAULT.url]  # torchvision's own URL, through torch.hub
    assert init.fallback
    assert "Name or service not known" in caplog.text


def test_auto_uses_a_hash_checked_file_in_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, state = fabricated_imagenet_file(tmp_path)
    monkeypatch.setattr(models, "imagenet_weights_path", lambda arch: path)
    init = resolve_weights("resnet50", "auto")
    assert (init.source, init.fallback, init.tag) == ("imagenet", False, f"imagenet ({path.name})")
    model = build_model("resnet50", 3, weights=init)
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])
    assert resolve_weights("resnet50", "imagenet").tag == init.tag  # strict mode finds the same file


def test_auto_refuses_a_corrupt_file_in_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = fabricated_imagenet_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")  # same name, other content
    monkeypatch.setattr(models, "imagenet_weights_path", lambda arch: path)
    with pytest.raises(WeightsCorruptError, match=r"does not match the hash prefix.*bonetumor weights fetch"):
        resolve_weights("resnet50", "auto")


@pytest.mark.parametrize(("arch", "first_top", "cam_index"), [("vgg19", 28, 35), ("vgg19_bn", 40, 51)])
def test_vgg_top_block_is_block_5_and_grad_cam_explains_its_last_relu(
    arch: str, first_top: int, cam_index: int
) -> None:
    model = build_model(arch, 3, trainable="all")
    features = cast(torch.nn.Sequential, model.get_submodule("features"))
    # Block 5 starts after the 4th max-pooling with conv5_1.
    assert isinstance(features[first_top - 1], torch.nn.MaxPool2d)
    assert isinstance(features[first_top], torch.nn.Conv2d)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in features[:first_top]) == 4
    set_trainable(model, arch, "top")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    top = {f"features.{n}" for n, _ in features[first_top:].named_parameters()}
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    assert trainable == top | head
    assert all(int(n.split(".")[1]) >= first_top for n in top)
    assert cam_layer(model, arch) is features[cam_index]
    assert isinstance(features[cam_index], torch.nn.ReLU)
    assert isinstance(features[cam_index - 1], torch.nn.Conv2d if arch == "vgg19" else torch.nn.BatchNorm2d)
    assert not features[cam_index].inplace  # Grad-CAM's backward hooks need out-of-place ReLUs


def test_vgg19_bn_trains_one_step_and_its_imagenet_file_is_torchvisions() -> None:
    torch.manual_seed(0)
    model = build_model("vgg19_bn", 3).train()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before["features.0.weight"], model.get_parameter("features.0.weight"))
    assert not torch.equal(before["classifier.2.weight"], model.get_parameter("classifier.2.weight"))
    assert imagenet_weights_path("vgg19_bn").name == "vgg19_bn-c79401a0.pth"


@pytest.mark.parametrize(("arch", "trainable"), [("resnet50", "top"), ("resnet50", "all"), ("vgg19", "head")])
def test_param_groups_split_the_trainable_parameters_into_head_and_backbone(arch: str, trainable: str) -> None:
    model = build_model(arch, 3)
    head, backbone = param_groups(model, arch, trainable, lr=1e-3, finetune_lr_factor=0.1)
    assert (head["name"], head["lr"]) == ("head", 1e-3)
    assert (backbone["name"], backbone["lr"]) == ("backbone", pytest.approx(1e-4))
    head_ids, backbone_ids = {id(p) for p in head["params"]}, {id(p) for p in backbone["params"]}
    assert not head_ids & backbone_ids
    assert head_ids | backbone_ids == {id(p) for p in trainable_parameters(model, arch, trainable)}
    assert head_ids == {id(p) for p in ARCHITECTURES[arch].head(model).parameters()}
    assert (len(backbone_ids) == 0) == (trainable == "head")
    # param_groups only reads: the model's frozen/unfrozen state is left as it was.
    assert all(p.requires_grad for p in model.parameters())
