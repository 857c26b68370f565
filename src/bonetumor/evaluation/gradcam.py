"""Grad-CAM explanations of tile predictions: heatmaps, overlays, and a gallery of validation tiles.

Grad-CAM (the ``grad-cam`` package) weights the activations of the final convolutional block by the gradient of
the explained class score, so the heatmap shows which regions of the tile drove that class. The model is left as
it was found: the parameters are frozen for the call and the explained layer's output is made the start of the
autograd graph, so the backward pass runs only through the layers after it (the head, for the final conv block)
and never computes or accumulates weight gradients. The parameters' ``requires_grad`` flags, ``.grad`` tensors and
train/eval mode are restored afterwards.

A model that answers from test-time views (:mod:`bonetumor.transforms.tta`) is explained the same way it predicts: every
view of a tile is explained for the class of the tile's averaged answer, and the views' heatmaps are put back
where their crops came from and averaged (:meth:`bonetumor.transforms.tta.TestTimeViews.merge_maps`), so the heatmap
covers the whole tile at ``tile_size``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from bonetumor.errors import ArtifactError
from bonetumor.training.models import cam_layer
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.preprocess import CenterSquareCrop
from bonetumor.transforms.tta import TestTimeAugmented, TestTimeViews

#: Images explained per forward/backward pass (bounds memory on large galleries).
BATCH_SIZE = 8


def _start_graph(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        # The clone is what later layers see: an in-place op after the layer (``out += identity``) may not modify
        # a leaf that requires grad, but may modify its clone; the gradient reaching the clone is the same.
        return output.detach().requires_grad_(True).clone()
    return None


def _explain(
    model: nn.Module,
    arch: str | None,
    images: Sequence[Image.Image],
    transform: Callable[[Image.Image], torch.Tensor],
    device: str | torch.device,
    targets: Sequence[int] | None,
    target_layer: nn.Module | None,
    views: TestTimeViews | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Return Grad-CAM heatmaps and the softmax probabilities of each image."""
    if isinstance(model, TestTimeAugmented):
        views = views or model.views
        model = model.model
    if target_layer is None:
        if arch is None:
            raise ValueError("gradcam: give arch (to find its final conv block) or target_layer")
        target_layer = cam_layer(model, arch)
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"gradcam: {len(targets)} targets for {len(images)} images; expected one class per image")
    if not images:
        return [], np.empty((0, 0))
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    model.to(device)
    heatmaps: list[np.ndarray] = []
    probabilities: list[np.ndarray] = []
    # Grad-CAM needs d(score)/d(activations) at the explained layer only. With frozen parameters the layer's output
    # is a graph leaf; marking it as requiring grad (before GradCAM's own hook sees it, hence prepend) starts the
    # graph there: backward skips the backbone, and a partly frozen model (trainable: head) works the same.
    handle = target_layer.register_forward_hook(_start_graph, prepend=True)
    cam: GradCAM | None = None
    try:
        model.requires_grad_(False)
        cam = GradCAM(model=model, target_layers=[target_layer])  # puts the model in eval mode
        for start in range(0, len(images), BATCH_SIZE):
            chunk = images[start : start + BATCH_SIZE]
            batch = torch.stack([transform(image) for image in chunk]).to(device)
            chunk_targets = None if targets is None else [int(t) for t in targets[start : start + BATCH_SIZE]]
            maps, probs = _explain_batch(cam, model, batch, chunk_targets, views)
            heatmaps.extend(maps)
            probabilities.append(probs)
    finally:
        # Not GradCAM's context manager: its __exit__ swallows IndexError.
        if cam is not None:
            cam.activations_and_grads.release()
        handle.remove()
        for param, flag, grad in zip(params, saved_flags, saved_grads, strict=True):
            param.requires_grad_(flag)
            param.grad = grad
        model.train(was_training)
    return heatmaps, np.concatenate(probabilities)


def _explain_batch(
    cam: GradCAM,
    model: nn.Module,
    batch: torch.Tensor,
    targets: list[int] | None,
    views: TestTimeViews | None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Heatmaps and probabilities of one batch, through the test-time views when there are any."""
    if views is None:
        with torch.enable_grad():
            grayscale = cam(
                input_tensor=batch, targets=None if targets is None else [ClassifierOutputTarget(t) for t in targets]
            )
        probs = torch.softmax(cam.outputs.detach().float(), dim=1).cpu().numpy()
        return [np.clip(g, 0.0, 1.0).astype(np.float32) for g in grayscale], probs
    tile_probs: np.ndarray | None = None
    if targets is None:
        # The tile's answer must be known before its views are explained for it: one more forward pass.
        with torch.no_grad():
            tile_probs = torch.softmax(TestTimeAugmented(model, views)(batch), dim=1).cpu().numpy()
    # Each view is explained for the tile's answer (or the asked class), not for what that view alone would say.
    chosen = list(tile_probs.argmax(1)) if tile_probs is not None else list(targets or [])
    expanded = views.expand(batch)
    per_view = [ClassifierOutputTarget(int(chosen[i % len(batch)])) for i in range(expanded.shape[0])]
    with torch.enable_grad():
        grayscale = cam(input_tensor=expanded, targets=per_view)
    if tile_probs is None:
        # The views' mean probability, as TestTimeAugmented answers, from the forward pass Grad-CAM just made.
        per_view_probs = torch.softmax(cam.outputs.detach().float(), dim=1)
        tile_probs = torch.stack(per_view_probs.chunk(views.count, dim=0)).mean(dim=0).cpu().numpy()
    merged = views.merge_maps(np.clip(grayscale, 0.0, 1.0), len(batch))
    peaks = merged.reshape(len(batch), -1).max(axis=1)
    return [(m / p if p > 0 else m).astype(np.float32) for m, p in zip(merged, peaks, strict=True)], tile_probs


def gradcam_heatmaps(
    model: nn.Module,
    arch: str | None,
    images: Sequence[Image.Image],
    transform: Callable[[Image.Image], torch.Tensor],
    device: str | torch.device = "cpu",
    targets: Sequence[int] | None = None,
    target_layer: nn.Module | None = None,
    views: TestTimeViews | None = None,
) -> list[np.ndarray]:
    """Compute a Grad-CAM heatmap per image.

    Args:
        model: The classifier (moved to ``device``); its mode, ``requires_grad`` flags and ``.grad`` are restored.
        arch: Architecture name, used to find the final conv block (:func:`bonetumor.training.models.cam_layer`);
            may be None when ``target_layer`` is given.
        images: RGB PIL images (for example from :func:`bonetumor.transforms.decode.decode_image`).
        transform: The evaluation transform from a PIL image to the model's input tensor (``C, H, W``), e.g.
            :func:`bonetumor.transforms.preprocess.build_eval_transform`.
        device: Where to run.
        targets: Class index to explain per image; None explains each image's predicted class.
        target_layer: Layer whose activations are explained, overriding ``cam_layer(model, arch)``.
        views: The model's test-time views (taken from ``model`` when it is a
            :class:`~bonetumor.transforms.tta.TestTimeAugmented`); ``transform`` then gives whole tiles.

    Returns:
        One ``(H, W)`` float32 array in [0, 1] per image, at the size ``transform`` gives (the tile), each scaled to
        its own max.

    Raises:
        ValueError: Neither ``arch`` nor ``target_layer`` given, or ``targets`` does not match ``images``.
        bonetumor.errors.ConfigError: Unknown ``arch``.
    """
    heatmaps, _ = _explain(model, arch, images, transform, device, targets, target_layer, views)
    return heatmaps


def _square(image: Image.Image, size: int) -> Image.Image:
    # The same centred square the evaluation transform crops, so the heatmap lines up with the pixels.
    return CenterSquareCrop()(image.convert("RGB")).resize((size, size), Image.Resampling.BILINEAR)


def overlay(image: Image.Image, heatmap: np.ndarray, size: int) -> np.ndarray:
    """Blend a heatmap (jet colours) over an image.

    Args:
        image: The tile; it is cropped to its centred square (as the evaluation transform does) and resized.
        heatmap: ``(h, w)`` values in [0, 1]; resized to ``size`` when needed.
        size: Side in pixels of the output.

    Returns:
        ``(size, size, 3)`` RGB uint8 array.

    Raises:
        ValueError: The heatmap is not 2-D or ``size`` is not positive.
    """
    mask = np.asarray(heatmap, dtype=np.float32)
    if mask.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {mask.shape}")
    if size < 1:
        raise ValueError(f"overlay size must be a positive number of pixels, got {size}")
    if mask.shape != (size, size):
        mask = np.asarray(Image.fromarray(mask, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    rgb = np.asarray(_square(image, size), dtype=np.float32) / 255.0
    return np.asarray(show_cam_on_image(rgb, np.clip(mask, 0.0, 1.0), use_rgb=True), dtype=np.uint8)


def gradcam_gallery(
    model: nn.Module,
    arch: str | None,
    files: Sequence[str | Path],
    labels: Sequence[str],
    classes: Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    out_png: str | Path,
    device: str | torch.device = "cpu",
    title: str = "",
    target_layer: nn.Module | None = None,
    views: TestTimeViews | None = None,
) -> Path:
    """Draw a Grad-CAM gallery: one row per tile, the tile beside its heatmap overlay for the predicted class.

    Captions give the true label, the predicted label and its probability; a wrong prediction is captioned in red.

    Args:
        model: The classifier (state restored as in :func:`gradcam_heatmaps`).
        arch: Architecture name (None when ``target_layer`` is given).
        files: Tile image files.
        labels: True class name of each tile.
        classes: Class names in model output order.
        transform: The evaluation transform (PIL image to input tensor).
        out_png: Where to write the PNG (its folder must exist).
        device: Where to run.
        title: Figure title.
        target_layer: Overrides the architecture's Grad-CAM layer.
        views: The model's test-time views (see :func:`gradcam_heatmaps`).

    Returns:
        ``out_png`` as a Path.

    Raises:
        ValueError: No files, or ``labels`` does not match ``files``.
        bonetumor.errors.InvalidImageError: A file does not decode.
    """
    if not files:
        raise ValueError("gradcam gallery: no tiles given; expected at least one file")
    if len(labels) != len(files):
        raise ValueError(f"gradcam gallery: {len(labels)} labels for {len(files)} files; expected one per file")
    images = [decode_image(f) for f in files]
    heatmaps, probabilities = _explain(model, arch, images, transform, device, None, target_layer, views)
    if probabilities.shape[1] != len(classes):
        raise ValueError(f"the model has {probabilities.shape[1]} outputs but {len(classes)} classes were given")
    fig = Figure(figsize=(5.0, 2.6 * len(files)))
    axes = fig.subplots(len(files), 2, squeeze=False)
    for row, (path, label, image, heatmap, probs) in enumerate(
        zip(files, labels, images, heatmaps, probabilities, strict=True)
    ):
        size = heatmap.shape[0]
        predicted = int(probs.argmax())
        correct = classes[predicted] == label
        tile_axis, cam_axis = axes[row]
        tile_axis.imshow(np.asarray(_square(image, size)))
        tile_axis.set_title(f"true: {label}", fontsize=8)
        tile_axis.set_xlabel(Path(path).name, fontsize=5)
        cam_axis.imshow(overlay(image, heatmap, size))
        cam_axis.set_title(
            f"pred: {classes[predicted]} (p={probs[predicted]:.2f})",
            fontsize=8,
            color="black" if correct else "red",
        )
        for axis in (tile_axis, cam_axis):
            axis.set_xticks([])
            axis.set_yticks([])
    if title:
        # Wrapped to the figure's width: a long title is otherwise cut off at both edges.
        fig.suptitle("\n".join(textwrap.wrap(title, width=60)), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)


def select_gallery_tiles(oof: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """Pick a few out-of-fold tiles per true class for the Grad-CAM gallery.

    Per class, about half correct and half wrong predictions are drawn (more correct ones when ``per_class`` is
    odd), topping up from the other kind when one runs short. The draw depends only on ``seed`` and the rows'
    content (rows are sorted by ``path`` first), not on their order in the frame. Classes come in the order of
    the ``prob_<class>`` columns (model output order), else sorted by name.

    Args:
        oof: Out-of-fold predictions with at least ``path``, ``label`` and ``prediction`` columns.
        per_class: Tiles per class (``evaluate.gradcam_per_class``); 0 gives an empty frame.
        seed: Seed of the draw.

    Returns:
        The chosen rows (all columns of ``oof`` plus a boolean ``correct``), grouped by class, correct first.

    Raises:
        ArtifactError: A required column is missing.
        ValueError: ``per_class`` is negative.
    """
    missing = [c for c in ("path", "label", "prediction") if c not in oof.columns]
    if missing:
        raise ArtifactError(f"out-of-fold predictions lack column(s) {missing}; expected path, label, prediction")
    if per_class < 0:
        raise ValueError(f"per_class={per_class}; expected >= 0 tiles per class")
    frame = oof.assign(correct=oof["label"] == oof["prediction"]).sort_values("path", kind="stable")
    prob_classes = [c.removeprefix("prob_") for c in oof.columns if c.startswith("prob_")]
    labels = set(frame["label"])
    order = [c for c in prob_classes if c in labels] + sorted(labels - set(prob_classes))
    rng = np.random.default_rng(seed)
    picks: list[pd.DataFrame] = []
    for name in order:
        rows = frame[frame["label"] == name]
        right, wrong = rows[rows["correct"]], rows[~rows["correct"]]
        n_wrong = min(per_class // 2, len(wrong))
        n_right = min(per_class - n_wrong, len(right))
        n_wrong = min(per_class - n_right, len(wrong))
        for part, n in ((right, n_right), (wrong, n_wrong)):
            if n:
                picks.append(part.iloc[np.sort(rng.choice(len(part), size=n, replace=False))])
    if not picks:
        return frame.iloc[0:0].reset_index(drop=True)
    return pd.concat(picks).reset_index(drop=True)
