from __future__ import annotations

from typing import cast

import pytest
import torch
from torch import nn
from torchvision.models.vgg import make_layers

from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.training.models import ARCHITECTURES, InitWeights, build_model
from bonetumor.training.pruning import build_pruned_vgg, channel_plan, kept_channels, prune_vgg


class TinyVGG(nn.Module):
    """A VGG-shaped model (features, GAP, the project's head) small enough to set every filter by hand."""

    def __init__(self, cfg: list[int | str], batch_norm: bool, num_classes: int = 3) -> None:
        super().__init__()
        self.features = make_layers(cfg, batch_norm=batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = [c for c in cfg if isinstance(c, int)][-1]
        self.classifier = nn.Sequential(nn.Flatten(1), nn.Dropout(0.5), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.features if isinstance(m, nn.Conv2d)]  # type: ignore[union-attr]


@pytest.mark.parametrize("arch", ["vgg19", "vgg19_bn"])
def test_prune_vgg19_shrinks_model_and_round_trips_through_channel_plan(arch: str) -> None:
    torch.manual_seed(0)
    # trainable="top" freezes most layers: pruning must still reach them and keep the flags. Frozen layers need
    # "pretrained" weights: a seeded random backbone stands in for ImageNet's.
    weights = InitWeights(arch, "file", "random stand-in", state=ARCHITECTURES[arch].build().state_dict())
    model = build_model(arch, 3, dropout=0.3, weights=weights, trainable="top")
    assert not all(p.requires_grad for p in model.parameters())  # the flags below are a real mix
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(2, 3, 32, 32)

    pruned, summary = prune_vgg(model, 0.5, x[:1])

    assert channel_plan(model) == list(summary.plan_before)  # the input model is untouched
    assert list(summary.plan_after) == [c // 2 for c in summary.plan_before]
    assert channel_plan(pruned) == list(summary.plan_after)
    # Both the inputs and outputs of (almost) every convolution halve: about a quarter of the parameters stay.
    assert summary.params_after == sum(p.numel() for p in pruned.parameters())
    assert 0.22 < summary.params_ratio < 0.28
    assert 0.22 < summary.macs_ratio < 0.28
    assert [p.requires_grad for p in pruned.parameters()] == flags
    assert pruned.training

    pruned.eval()
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()

    rebuilt = build_pruned_vgg(arch, summary.plan_after, num_classes=3, dropout=0.3)
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_prune_keeps_highest_l1_filters_and_output_of_silenced_ones(batch_norm: bool) -> None:
    torch.manual_seed(1)
    model = TinyVGG([16, "M", 16, "M", 32], batch_norm).eval()
    strong: list[list[int]] = []
    with torch.no_grad():
        for i, module in enumerate(model.features):
            if not isinstance(module, nn.Conv2d):
                continue
            n = module.out_channels
            keep = sorted(torch.randperm(n)[: n // 2].tolist())
            weak = [c for c in range(n) if c not in keep]
            strong.append(keep)
            # Weak filters get a 100x smaller L1 norm, and their channel is silenced so that removing it must
            # leave the output exactly as it was: zero bias before ReLU, or a BatchNorm that outputs zero.
            assert module.bias is not None
            module.weight[weak] *= 0.01
            if batch_norm:
                bn = model.features[i + 1]
                bn.weight[weak] = 0.0
                bn.bias[weak] = 0.0
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
            else:
                module.bias[weak] = -10.0  # ReLU(negative) = 0 for any input of these tiny filters
    original = [(c.weight.detach().clone(), cast(torch.Tensor, c.bias).detach().clone()) for c in _convs(model)]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)

    pruned, summary = prune_vgg(model, 0.5, x[:1])

    assert list(summary.plan_after) == [8, 8, 16]
    previous: list[int] | None = None
    for conv, keep, (weight, bias) in zip(_convs(pruned), strong, original, strict=True):
        sliced = weight[keep] if previous is None else weight[keep][:, previous]
        torch.testing.assert_close(conv.weight, sliced, rtol=0, atol=0)
        torch.testing.assert_close(conv.bias, bias[keep], rtol=0, atol=0)
        previous = keep
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_prune_never_goes_below_min_channels() -> None:
    model = TinyVGG([16, "M", 64], batch_norm=False)
    pruned, summary = prune_vgg(model, 0.95, torch.randn(1, 3, 16, 16))
    assert list(summary.plan_after) == [8, 8]  # 16 * 0.05 and 64 * 0.05 round below 8
    assert kept_channels(64, 0.5) == 32
    assert kept_channels(10, 0.0) == 10
    assert pruned(torch.randn(1, 3, 16, 16)).shape == (1, 3)


def test_prune_rejects_bad_amount_and_non_vgg() -> None:
    model = TinyVGG([8], batch_norm=False)
    with pytest.raises(ConfigError, match="amount"):
        prune_vgg(model, 1.0, torch.randn(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="VGG"):
        prune_vgg(nn.Sequential(nn.Conv2d(3, 8, 3)), 0.5, torch.randn(1, 3, 8, 8))


def test_build_pruned_vgg_rejects_a_plan_of_the_wrong_length() -> None:
    with pytest.raises(ArtifactError, match="16 positive integers"):
        build_pruned_vgg("vgg19", [32] * 15, num_classes=3)
