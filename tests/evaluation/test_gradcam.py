from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASS_COLOURS, CLASSES, write_tile
from PIL import Image
from torch import nn

from bonetumor.config import PreprocessConfig
from bonetumor.errors import ArtifactError
from bonetumor.evaluation.gradcam import gradcam_gallery, gradcam_heatmaps, overlay, select_gallery_tiles
from bonetumor.training.models import build_model
from bonetumor.transforms.preprocess import build_eval_transform
from bonetumor.transforms.tta import TestTimeAugmented, TestTimeViews

#: Input side of the tests. ResNet50's layer4 downsamples 32x: at 64 px its map is 2x2 (at 32 px, 1x1, a constant
#: heatmap that Grad-CAM's min-max scaling turns into zeros).
SIZE = 64
Transform = Callable[[Image.Image], torch.Tensor]


@pytest.fixture(scope="module")
def transform() -> Transform:
    return cast(Transform, build_eval_transform(PreprocessConfig(tile_size=SIZE, input_size=SIZE)))


@pytest.fixture(scope="module")
def small_transform() -> Transform:
    return cast(Transform, build_eval_transform(PreprocessConfig(tile_size=32, input_size=32)))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet50", len(CLASSES))


def random_images(n: int, seed: int = 0, shape: tuple[int, int] = (40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)) for _ in range(n)]


def test_heatmaps_shape_range_and_model_state_restored(resnet: nn.Module, transform: Transform) -> None:
    resnet.train()
    resnet.get_submodule("layer1").requires_grad_(False)  # a partly frozen model, as trainable: top/head leaves it
    before = [p.requires_grad for p in resnet.parameters()]
    marked = next(resnet.get_submodule("fc").parameters())
    marked.grad = torch.ones_like(marked)
    try:
        heatmaps = gradcam_heatmaps(resnet, "resnet50", random_images(3), transform)
        assert len(heatmaps) == 3
        for heatmap in heatmaps:
            assert heatmap.shape == (SIZE, SIZE)
            assert heatmap.min() >= 0.0
            assert heatmap.max() <= 1.0
            assert heatmap.max() > 0.5  # each map is scaled to its own maximum, not all zero
        assert [p.requires_grad for p in resnet.parameters()] == before
        assert marked.grad is not None
        assert torch.equal(marked.grad, torch.ones_like(marked))  # an existing gradient is left untouched
        assert all(p.grad is None for p in resnet.parameters() if p is not marked)
        assert resnet.training  # mode restored
    finally:
        resnet.requires_grad_(True)
        marked.grad = None


def test_vgg19_heatmaps(small_transform: Transform) -> None:
    # torchvision's VGG has in-place ReLUs, which break Grad-CAM's hooks unless build_model turned them off.
    torch.manual_seed(0)
    model = build_model("vgg19", len(CLASSES))
    heatmaps = gradcam_heatmaps(model, "vgg19", random_images(2), small_transform)
    assert [h.shape for h in heatmaps] == [(32, 32)] * 2
    assert all(h.max() > 0.5 for h in heatmaps)  # VGG's map is 2x2 at 32 px: not constant
    assert all(h.min() >= 0.0 and h.max() <= 1.0 for h in heatmaps)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


class HalfMask(nn.Module):
    """Zero the activations of the right half of the feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(x)
        mask[..., x.shape[-1] // 2 :] = 0
        return x * mask


class LeftHalfModel(nn.Module):
    """A model whose class scores depend only on the left half of the image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mask = HalfMask()
        self.head = nn.Linear(4, len(CLASSES))
        with torch.no_grad():
            # Positive features (bright pixels), class 0 rewarded by them, the others penalised: class 0 is predicted.
            self.conv.weight.fill_(0.1)
            assert self.conv.bias is not None
            self.conv.bias.fill_(0.5)
            self.head.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4, [-0.5] * 4]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mask(torch.relu(self.conv(x))).mean(dim=(2, 3)))


def test_heatmap_mass_lies_where_the_decision_is_made(small_transform: Transform) -> None:
    model = LeftHalfModel()
    [heatmap] = gradcam_heatmaps(model, None, random_images(1, seed=5), small_transform, target_layer=model.mask)
    total = heatmap.sum()
    assert heatmap[:, :16].sum() / total > 0.95  # left, not right (no flip)
    assert heatmap[:16, :].sum() / total == pytest.approx(0.5, abs=0.1)  # not transposed to top/bottom
    with pytest.raises(ValueError, match="target_layer"):
        gradcam_heatmaps(model, None, random_images(1), small_transform)


def test_views_are_explained_for_the_tiles_answer_and_put_back_where_they_were_cut() -> None:
    model = LeftHalfModel()
    tile_transform = cast(Transform, build_eval_transform(PreprocessConfig(tile_size=40, input_size=32)))
    views = TestTimeViews(tile_size=40, input_size=32, crops=5, flips=False)
    images = random_images(2, seed=5)
    heatmaps = gradcam_heatmaps(model, None, images, tile_transform, target_layer=model.mask, views=views)
    assert [h.shape for h in heatmaps] == [(40, 40)] * 2  # the whole tile, not one crop
    for heatmap in heatmaps:
        # Each crop decides on its left 16 columns; the crops start at columns 0, 4 and 8, so tile columns
        # 24..39 lie only in right halves and get no heat, and the merged map covers the left of the tile.
        assert heatmap[:, 24:].max() == pytest.approx(0.0, abs=1e-6)
        assert heatmap[:, :24].max() == pytest.approx(1.0)
    # A wrapped model explains through its own views, the same way.
    wrapped = gradcam_heatmaps(TestTimeAugmented(model, views), None, images, tile_transform, target_layer=model.mask)
    for a, b in zip(heatmaps, wrapped, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    mirrored = gradcam_heatmaps(
        model, None, images, tile_transform, target_layer=model.mask, views=TestTimeViews(40, 32, 5, flips=True)
    )
    # Mirrored views decide on their left half, which is the tile's right half: heat reaches the right edge.
    assert all(h[:, 24:].max() > 0.1 for h in mirrored)


def test_targets_default_to_the_prediction_and_work_inside_no_grad(small_transform: Transform) -> None:
    model = LeftHalfModel()
    images = random_images(2, seed=2)
    with torch.no_grad():  # a caller in inference code: Grad-CAM still gets its gradients
        predicted = model(torch.stack([small_transform(i) for i in images])).argmax(1).tolist()
        default = gradcam_heatmaps(model, None, images, small_transform, target_layer=model.mask)
    assert predicted == [0, 0]
    explicit = gradcam_heatmaps(model, None, images, small_transform, targets=[0, 0], target_layer=model.mask)
    # Class 1 is penalised by every feature: its Grad-CAM weights are negative and ReLU leaves nothing.
    other = gradcam_heatmaps(model, None, images, small_transform, targets=[1, 1], target_layer=model.mask)
    for a, b, c in zip(default, explicit, other, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.max() == pytest.approx(1.0)
        assert c.max() == 0.0
    with pytest.raises(ValueError, match="targets"):
        gradcam_heatmaps(model, None, images, small_transform, targets=[0], target_layer=model.mask)


def test_overlay_is_rgb_uint8_of_the_square_crop() -> None:
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    heatmap = np.zeros((16, 16), dtype=np.float32)
    heatmap[:, :8] = 1.0
    blended = overlay(image, heatmap, 24)
    assert blended.shape == (24, 24, 3)
    assert blended.dtype == np.uint8
    # Hot (red in jet) on the left, cold (blue) on the right.
    assert blended[12, 2, 0] > blended[12, 21, 0]
    with pytest.raises(ValueError, match="2-D"):
        overlay(image, np.zeros((2, 4, 4)), 24)


def test_gallery_png_written(tmp_path: Path, small_transform: Transform) -> None:
    model = LeftHalfModel()
    files = [
        write_tile(tmp_path / f"{name}.jpg", CLASS_COLOURS[name], size=48, seed=i) for i, name in enumerate(CLASSES)
    ]
    out = gradcam_gallery(
        model,
        None,
        files,
        list(CLASSES),
        CLASSES,
        small_transform,
        tmp_path / "gallery.png",
        title="t",
        target_layer=model.mask,
    )
    with Image.open(out) as png:
        assert png.format == "PNG"
        png.load()
        assert png.height > png.width  # one row per tile
    with pytest.raises(ValueError, match="labels"):
        gradcam_gallery(model, None, files, ["Non-Tumor"], CLASSES, small_transform, tmp_path / "x.png")
    with pytest.raises(ValueError, match="3 outputs but 2 classes"):
        gradcam_gallery(
            model,
            None,
            files[:2],
            list(CLASSES[:2]),
            CLASSES[:2],
            small_transform,
            tmp_path / "y.png",
            target_layer=model.mask,
        )


def oof_frame(per_class_right: int, per_class_wrong: int) -> pd.DataFrame:
    rows = []
    for c, name in enumerate(CLASSES):
        wrong_as = CLASSES[(c + 1) % len(CLASSES)]
        rows += [{"path": f"{name}/r{i}.jpg", "label": name, "prediction": name} for i in range(per_class_right)]
        rows += [{"path": f"{name}/w{i}.jpg", "label": name, "prediction": wrong_as} for i in range(per_class_wrong)]
    frame = pd.DataFrame(rows)
    for name in reversed(CLASSES):  # probability columns fix the class order; reversed here on purpose
        frame[f"prob_{name}"] = 0.5
    return frame


def test_select_gallery_tiles_mixes_right_and_wrong_deterministically() -> None:
    oof = oof_frame(6, 6)
    chosen = select_gallery_tiles(oof, per_class=3, seed=7)
    assert list(chosen["label"].unique()) == list(reversed(CLASSES))
    for name in CLASSES:
        rows = chosen[chosen["label"] == name]
        assert sorted(rows["correct"].tolist()) == [False, True, True]
    shuffled = oof.sample(frac=1.0, random_state=3)
    assert chosen["path"].tolist() == select_gallery_tiles(shuffled, 3, seed=7)["path"].tolist()
    other_seeds = {tuple(select_gallery_tiles(oof, 3, seed=s)["path"]) for s in range(5)}
    assert len(other_seeds) > 1


def test_select_gallery_tiles_tops_up_when_one_kind_runs_short() -> None:
    chosen = select_gallery_tiles(oof_frame(4, 0), per_class=3, seed=0)
    assert len(chosen) == 3 * len(CLASSES)
    assert chosen["correct"].all()
    few = select_gallery_tiles(oof_frame(1, 1), per_class=5, seed=0)
    assert len(few) == 2 * len(CLASSES)  # all there is
    assert select_gallery_tiles(oof_frame(2, 2), per_class=0, seed=0).empty
    with pytest.raises(ArtifactError, match="prediction"):
        select_gallery_tiles(oof_frame(2, 2).drop(columns="prediction"), 2, seed=0)
