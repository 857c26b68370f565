"""What drift monitoring measures of a tile: cheap colour and stain statistics, and the model's own embedding.

Two views of an input, both computed the same way on the training tiles (:mod:`bonetumor.monitoring.reference`)
and on every served tile:

* :func:`tile_statistics`: a dozen numbers a pathologist would recognise (mean and spread of each colour channel,
  haematoxylin and eosin optical density, saturation, brightness, tissue fraction, sharpness). They are computed
  on the *uploaded* tile, before the model's stain normaliser, because a change of staining protocol or scanner is
  what they are there to see (the normaliser hides it from the network, not always completely). About 2 ms per
  256 px tile on one core, so every answer can carry them.
* :class:`EmbeddingExtractor`: the network's penultimate-layer features (the input of its last ``nn.Linear``),
  which also see changes no colour statistic names (other tissue, other magnification, artefacts).
  :func:`embed_images` feeds it through the predictor's own serving transform, so there is one preprocessing path.

The optical densities and the tissue rules come from :mod:`bonetumor.transforms.stain` and
:mod:`bonetumor.transforms.tissue`, so "tissue" and "haematoxylin" mean here what they mean in normalisation and
data validation.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from functools import cache
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image, ImageChops
from skimage.color import hed_from_rgb
from torch import nn

from bonetumor.errors import ConfigError
from bonetumor.transforms.stain import TISSUE_OD, rgb_to_od
from bonetumor.transforms.tissue import tissue_fraction
from bonetumor.transforms.tta import TestTimeAugmented

if TYPE_CHECKING:
    from bonetumor.serving.predictor import Predictor

#: The statistics of :func:`tile_statistics`, in a fixed order (the columns of a reference's statistics matrix).
#: Colours are in [0, 1]; optical densities in the units of :func:`bonetumor.transforms.stain.rgb_to_od`
#: (natural log); sharpness is ``log(1 + variance of the Laplacian)`` of the 8-bit grey image.
STATISTICS: tuple[str, ...] = (
    "red_mean",
    "green_mean",
    "blue_mean",
    "red_std",
    "green_std",
    "blue_std",
    "haematoxylin_od",
    "eosin_od",
    "saturation",
    "brightness",
    "tissue_fraction",
    "sharpness",
)
#: A larger tile is box-reduced by an integer factor to about this side first (as tissue.py does at 32 px): the
#: cost stays bounded, and tiles of 4x the side are measured at the scale of the training tiles' 256 px.
STATISTICS_SIDE = 256
T = TypeVar("T")

#: Tiles embedded per forward pass by :func:`embed_images` (bounded memory for a whole training set).
EMBED_BATCH = 32


@cache
def _od_table() -> NDArray[np.float64]:
    """Optical density of each 8-bit value (the lookup table behind the stain means)."""
    return rgb_to_od(np.arange(256, dtype=np.uint8)).astype(np.float64)


@cache
def _tissue_table() -> list[int]:
    """PIL lookup table from a pixel's darkest channel to a tissue mask (255 where its OD reaches TISSUE_OD)."""
    return [255 if od >= TISSUE_OD else 0 for od in _od_table().tolist()]


@cache
def _he_projection() -> NDArray[np.float64]:
    """Columns of scikit-image's colour-deconvolution matrix that give haematoxylin and eosin from RGB OD."""
    return np.asarray(hed_from_rgb[:, :2], dtype=np.float64)


def _rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    factor = max(1, min(rgb.size) // STATISTICS_SIDE)
    return rgb.reduce(factor) if factor > 1 else rgb


def tile_statistics(image: Image.Image) -> dict[str, float]:
    """Return the colour, stain, tissue and sharpness statistics of one tile, keyed and ordered as :data:`STATISTICS`.

    Per channel the mean and standard deviation (in [0, 1]); the mean haematoxylin and eosin optical density of the
    tissue pixels (colour deconvolution with scikit-image's H&E matrix, unclipped, so a pure-eosin tile may show a
    slightly negative haematoxylin; by linearity the mean of the per-pixel stain amounts is the deconvolution of
    the mean optical density, computed here from 256-bin histograms); the mean HSV saturation and the mean grey
    brightness (in [0, 1]); :func:`~bonetumor.transforms.tissue.tissue_fraction`; and ``log(1 + var(Laplacian))``
    of the grey image, which falls by about 6 (a 400th of the variance) when a 256 px sample tile is blurred with
    a Gaussian of radius 3.

    A pixel counts as tissue for the stain means when its darkest channel reaches
    :data:`~bonetumor.transforms.stain.TISSUE_OD` (the stain normaliser's rule); a tile without any gets 0 for
    both. Tiles larger than :data:`STATISTICS_SIDE` are box-reduced to about that side first.

    Args:
        image: A PIL image (converted to RGB).

    Returns:
        ``{name: value}`` for every name of :data:`STATISTICS`, in that order.

    Raises:
        TypeError: ``image`` is not a PIL image.
    """
    rgb = _rgb(image)
    red, green, blue = rgb.split()
    darkest = ImageChops.darker(ImageChops.darker(red, green), blue)
    brightest = np.asarray(ImageChops.lighter(ImageChops.lighter(red, green), blue), dtype=np.float32)
    # Histograms in C (PIL) rather than numpy reductions: a third of the cost.
    counts = np.asarray(rgb.histogram(), dtype=np.float64).reshape(3, 256)
    tissue = np.asarray(rgb.histogram(mask=darkest.point(_tissue_table())), dtype=np.float64).reshape(3, 256)
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = counts[0].sum()
    means = counts @ levels / total
    stds = np.sqrt(np.maximum(counts @ levels**2 / total - means**2, 0.0))
    haematoxylin, eosin = _stain_means(tissue)
    chroma = brightest - np.asarray(darkest, dtype=np.float32)
    saturation = np.divide(chroma, brightest, out=np.zeros_like(chroma), where=brightest > 0)
    grey = np.asarray(rgb.convert("L"), dtype=np.float32)
    return {
        "red_mean": float(means[0]),
        "green_mean": float(means[1]),
        "blue_mean": float(means[2]),
        "red_std": float(stds[0]),
        "green_std": float(stds[1]),
        "blue_std": float(stds[2]),
        "haematoxylin_od": haematoxylin,
        "eosin_od": eosin,
        "saturation": float(saturation.mean()),
        "brightness": float(grey.mean()) / 255.0,
        "tissue_fraction": tissue_fraction(rgb),
        "sharpness": _sharpness(grey),
    }


def _stain_means(tissue_counts: NDArray[np.float64]) -> tuple[float, float]:
    """Mean haematoxylin and eosin optical density from the tissue pixels' (3, 256) histograms; 0, 0 if none."""
    count = tissue_counts[0].sum()
    if count == 0:
        return 0.0, 0.0
    haematoxylin, eosin = (tissue_counts @ _od_table() / count) @ _he_projection()
    return float(haematoxylin), float(eosin)


def _sharpness(grey: NDArray[np.float32]) -> float:
    """``log(1 + variance)`` of the 4-neighbour Laplacian of a grey image (0 for an image under 3 px)."""
    if min(grey.shape) < 3:
        return 0.0
    laplacian = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4.0 * grey[1:-1, 1:-1]
    return math.log1p(float(laplacian.var()))


def statistics_vector(stats: dict[str, float]) -> NDArray[np.float64]:
    """Return the values of a statistics dict in :data:`STATISTICS` order.

    Raises:
        KeyError: A statistic is missing.
    """
    return np.array([float(stats[name]) for name in STATISTICS], dtype=np.float64)


def _last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of a module tree, in registration order (the classifier layer of every head here)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear layer; expected a classifier whose last layer is linear "
            "(the penultimate-layer embedding is that layer's input)"
        )
    return linears[-1]


class EmbeddingExtractor:
    """Captures a classifier's penultimate-layer embedding: the input of its last ``nn.Linear``.

    A forward pre-hook on that layer copies its input during :meth:`embed`. The hook records only forward passes
    that :meth:`embed` makes in its own thread, so the same module may serve predictions in other threads
    meanwhile. For the project's heads (``Dropout`` then ``Linear``, :mod:`bonetumor.training.models`) this is
    the pooled backbone feature: 2048 values for ResNet50, 512 for VGG19 and VGG19-BN; for torchvision's own VGG
    classifier it is the 4096 values of the second fully connected layer.

    A network wrapped in its test-time views (:class:`~bonetumor.transforms.tta.TestTimeAugmented`) is unwrapped:
    embeddings are of the tensors given, one row each. Use it as a context manager, or call :meth:`close`, to
    remove the hook.

    Args:
        model: The classifier.

    Raises:
        ConfigError: The model has no ``nn.Linear``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model.model if isinstance(model, TestTimeAugmented) else model
        self.layer = _last_linear(self.model)
        self._local = threading.local()
        self._handle = self.layer.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if getattr(self._local, "armed", False):
            self._local.captured = inputs[0].detach()

    @property
    def dim(self) -> int:
        """Length of an embedding (the last linear layer's ``in_features``)."""
        return int(self.layer.in_features)

    @torch.no_grad()
    def embed(self, batch: torch.Tensor) -> NDArray[np.float32]:
        """Run the network on a batch and return the embedding of each row, ``(n, dim)`` float32.

        The network runs in eval mode (dropout off); a module in training mode is switched back afterwards.

        Args:
            batch: The network's input, ``(n, 3, input_size, input_size)``.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            _, embeddings = self.during(self.model, batch)
        finally:
            self.model.train(was_training)
        return embeddings

    def during(self, call: Callable[..., T], *args: Any) -> tuple[T, NDArray[np.float32]]:
        """Call ``call(*args)`` and return its result with the embeddings its last forward pass computed.

        For a call that runs the network once (a predictor's :meth:`~Predictor.predict_images`: every test-time
        view of every tile in one batch), the rows are that batch's, in its order.

        Raises:
            ConfigError: ``call`` did not run the network's last linear layer.
        """
        self._local.armed, self._local.captured = True, None
        try:
            result = call(*args)
            captured = self._local.captured
        finally:
            self._local.armed, self._local.captured = False, None
        if captured is None:
            raise ConfigError(f"the model's last nn.Linear ({self.layer}) was not called during its forward pass")
        rows = captured.reshape(captured.shape[0], -1).float().cpu().numpy()
        return result, np.asarray(rows, dtype=np.float32)

    def close(self) -> None:
        """Remove the hook from the model."""
        self._handle.remove()

    def __enter__(self) -> EmbeddingExtractor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def centre_view(predictor: Predictor, image: Image.Image) -> torch.Tensor:
    """The network input of a tile's centre test-time view: the serving transform, then the centre crop.

    Args:
        predictor: The served predictor (its :attr:`~Predictor.transform` and views).
        image: The tile.

    Returns:
        ``(3, input_size, input_size)``.
    """
    views = predictor.metadata.views
    top, left = views.offsets()[0]
    size = views.input_size
    return predictor.transform(image)[:, top : top + size, left : left + size]


def embed_images(
    predictor: Predictor, images: Iterable[Image.Image], extractor: EmbeddingExtractor | None = None
) -> NDArray[np.float32]:
    """Embed tiles as the predictor's network sees them: its serving transform, the centre view only.

    One view per tile (the centre crop, not mirrored): the embedding describes the input, and the other views
    would multiply the cost without changing what drift is measured on. Tiles go through the network
    :data:`EMBED_BATCH` at a time.

    Args:
        predictor: The served predictor.
        images: The tiles.
        extractor: An extractor on ``predictor.model`` to reuse (a service keeps one for its lifetime); None
            hooks the model for this call only.

    Returns:
        ``(n, dim)`` float32; ``(0, dim)`` for no tiles.
    """
    if extractor is None:
        with EmbeddingExtractor(predictor.model) as own:
            return embed_images(predictor, images, own)
    chunks: list[NDArray[np.float32]] = []
    batch: list[torch.Tensor] = []
    for image in images:
        batch.append(centre_view(predictor, image))
        if len(batch) == EMBED_BATCH:
            chunks.append(extractor.embed(torch.stack(batch)))
            batch = []
    if batch:
        chunks.append(extractor.embed(torch.stack(batch)))
    return np.concatenate(chunks) if chunks else np.zeros((0, extractor.dim), dtype=np.float32)


def predict_and_embed(
    predictor: Predictor, images: list[Image.Image], extractor: EmbeddingExtractor | None = None
) -> tuple[list[dict[str, Any]], NDArray[np.float32]]:
    """Classify tiles with the eager predictor and capture their centre-view embeddings in the same forward pass.

    The test-time views are one view-major batch (:meth:`~bonetumor.transforms.tta.TestTimeViews.expand`), view 0
    the centre crop unmirrored, so its first ``len(images)`` rows are the embeddings :func:`embed_images` computes,
    at no extra cost. Only for the torch engine: an ONNX engine runs no torch module.

    Args:
        predictor: The eager predictor.
        images: The tiles.
        extractor: An extractor on ``predictor.model`` to reuse; None hooks the model for this call only.

    Returns:
        The answers of :meth:`~Predictor.predict_images` and the ``(n, dim)`` centre-view embeddings.

    Raises:
        ConfigError: The forward pass did not give one embedding per view of every tile.
    """
    if extractor is None:
        with EmbeddingExtractor(predictor.model) as own:
            return predict_and_embed(predictor, images, own)
    if not images:
        return [], np.zeros((0, extractor.dim), dtype=np.float32)
    answers, rows = extractor.during(predictor.predict_images, images)
    expected = predictor.metadata.views.count * len(images)
    if len(rows) != expected:
        raise ConfigError(
            f"captured {len(rows)} embeddings for {len(images)} tiles; expected {expected} "
            f"({predictor.metadata.views.count} test-time views each)"
        )
    return answers, rows[: len(images)]
