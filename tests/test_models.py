import hashlib
from pathlib import Path

import pytest
import torch
from torchvision import models as tvm

from bonetumor.errors import WeightsUnavailableError
from bonetumor.models import ARCHITECTURES, build_model, cam_layer, imagenet_weights_path


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_outputs_one_logit_per_class(arch: str) -> None:
    model = build_model(arch, num_classes=3, dropout=0.3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    assert all(d.p == 0.3 for d in dropouts)
    assert isinstance(cam_layer(model, arch), torch.nn.Module)


@pytest.mark.parametrize(
    ("arch", "trainable", "frozen_name"), [("resnet50", "top", "layer3"), ("vgg19", "head", "features")]
)
def test_trainable_freezes_everything_below(arch: str, trainable: str, frozen_name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{arch}.pth"
    torch.save(ARCHITECTURES[arch].build().state_dict(), path)
    model = build_model(arch, 3, weights=str(tmp_path / "{arch}.pth"), trainable=trainable)
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names
    assert not any(n.startswith(frozen_name) for n in trainable_names)
    head = "fc." if arch == "resnet50" else "classifier."
    assert any(n.startswith(head) for n in trainable_names)


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
    assert "https://download.pytorch.org/models/resnet50-" in message
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
