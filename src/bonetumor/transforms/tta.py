"""Test-time views: the fixed crops and flips every evaluated or served prediction averages over.

Training shows the network random ``input_size`` crops of tiles resized to ``tile_size`` (see
:mod:`bonetumor.transforms.augment`). At evaluation and serving time the same network sees a *fixed* set of crops of the
tile at that scale: the centre crop, or the four corner crops and the centre crop (``preprocess.test_crops``),
each also mirrored left-right (``preprocess.test_flips``). The answer is the mean of the views' probabilities,
so each view votes and the whole tile is covered, not just its centre. (Not the mean of their log-probabilities:
one view that is confidently wrong then outvotes the rest. Measured on the sample's second fold, the same trained
ResNet50 got 9 of 9 validation tiles right by averaging probabilities and 5 of 9 by averaging log-probabilities.)


:class:`TestTimeAugmented` wraps a network with those views as one ``nn.Module``: its input is the preprocessed
tile (``(N, 3, tile_size, tile_size)``, :func:`bonetumor.transforms.preprocess.build_eval_transform`) and its output the
log of the averaged probabilities, which every consumer treats as logits (softmax gives the averaged probabilities
back; temperature scaling and the referral rule work on them as on any logits). The
out-of-fold predictions, the ONNX and INT8 files, ``bonetumor predict`` and the BentoML service all run this
module, so they cannot disagree about the views. Grad-CAM explains each view and maps the heatmaps back onto the
tile with :meth:`TestTimeViews.merge_maps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from bonetumor.config import PreprocessConfig
from bonetumor.errors import ConfigError

#: Crop counts :class:`TestTimeViews` knows: the centre crop, or four corners and the centre.
CROP_COUNTS = (1, 5)
#: Smallest log-probability :class:`TestTimeAugmented` outputs: a probability of 0 would give -inf.
LOG_PROB_FLOOR = -80.0


@dataclass(frozen=True)
class TestTimeViews:
    """Which crops of a ``tile_size`` tile the network sees at test time.

    Attributes:
        tile_size: Side of the preprocessed tile in pixels.
        input_size: Side of each crop (the network's input), at most ``tile_size``.
        crops: 1 (centre) or 5 (four corners and the centre).
        flips: Whether each crop is also seen mirrored left-right.
    """

    __test__ = False  # not a pytest test class, whatever its name says

    tile_size: int
    input_size: int
    crops: int = 5
    flips: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.input_size <= self.tile_size:
            raise ConfigError(
                f"test-time views: input_size={self.input_size} must lie in [1, tile_size={self.tile_size}]"
            )
        if self.crops not in CROP_COUNTS:
            raise ConfigError(f"test-time views: crops={self.crops}; expected one of {list(CROP_COUNTS)}")

    @classmethod
    def from_config(cls, config: PreprocessConfig) -> TestTimeViews:
        """Return the views the preprocess section names."""
        return cls(config.tile_size, config.input_size, config.test_crops, config.test_flips)

    @property
    def count(self) -> int:
        """Number of views per tile."""
        return len(self.offsets()) * (2 if self.flips else 1)

    def offsets(self) -> list[tuple[int, int]]:
        """Return the (top, left) pixel of each crop, centre first.

        With ``input_size == tile_size`` the five crops coincide, so only one is returned.
        """
        margin = self.tile_size - self.input_size
        centre = (margin // 2, margin // 2)
        if self.crops == 1 or margin == 0:
            return [centre]
        return [centre, (0, 0), (0, margin), (margin, 0), (margin, margin)]

    def expand(self, batch: torch.Tensor) -> torch.Tensor:
        """Cut every view out of a batch of tiles.

        Args:
            batch: ``(N, C, tile_size, tile_size)``.

        Returns:
            ``(V * N, C, input_size, input_size)``, view-major: rows ``v * N .. v * N + N - 1`` are view ``v`` of
            every tile (view order: each offset, then its mirror when ``flips``).

        Raises:
            ValueError: The batch is not ``(N, C, tile_size, tile_size)``.
        """
        # Not while tracing for ONNX export: the check would be frozen into the graph as a constant.
        if not torch.jit.is_tracing() and (
            batch.dim() != 4 or tuple(batch.shape[-2:]) != (self.tile_size, self.tile_size)
        ):
            raise ValueError(
                f"test-time views: expected a batch of shape (N, C, {self.tile_size}, {self.tile_size}), "
                f"got {tuple(batch.shape)}"
            )
        size = self.input_size
        views = []
        for top, left in self.offsets():
            crop = batch[:, :, top : top + size, left : left + size]
            views.append(crop)
            if self.flips:
                views.append(torch.flip(crop, dims=[3]))
        return torch.cat(views, dim=0)

    def merge_maps(self, maps: np.ndarray, n_tiles: int) -> np.ndarray:
        """Put per-view maps (a Grad-CAM heatmap of every view) back onto their tiles and average them.

        Each view's map is un-mirrored and placed where its crop came from; a tile pixel gets the mean over the
        views that cover it (the margins of a 5-crop tile are covered by fewer views than its centre).

        Args:
            maps: ``(V * N, input_size, input_size)``, in the order of :meth:`expand`.
            n_tiles: ``N``.

        Returns:
            ``(N, tile_size, tile_size)`` float32.

        Raises:
            ValueError: ``maps`` does not hold ``count * n_tiles`` maps of ``input_size``.
        """
        size = self.input_size
        array = np.asarray(maps, dtype=np.float32)
        if array.shape != (self.count * n_tiles, size, size):
            raise ValueError(
                f"test-time views: expected maps of shape ({self.count * n_tiles}, {size}, {size}), got {array.shape}"
            )
        total = np.zeros((n_tiles, self.tile_size, self.tile_size), dtype=np.float32)
        covered = np.zeros((self.tile_size, self.tile_size), dtype=np.float32)
        view = 0
        for top, left in self.offsets():
            for mirrored in (False, True) if self.flips else (False,):
                chunk = array[view * n_tiles : (view + 1) * n_tiles]
                total[:, top : top + size, left : left + size] += chunk[:, :, ::-1] if mirrored else chunk
                covered[top : top + size, left : left + size] += 1.0
                view += 1
        return np.asarray(total / np.maximum(covered, 1.0), dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """Return the views as plain data (model metadata)."""
        return {"tile_size": self.tile_size, "input_size": self.input_size, "crops": self.crops, "flips": self.flips}


class TestTimeAugmented(nn.Module):
    """A classifier evaluated on fixed test-time views: mean log-probability over the views of each tile.

    Args:
        model: The network (input ``(N, 3, input_size, input_size)``, output logits or log-probabilities).
        views: The test-time views.

    The output, ``(N, classes)``, is ``log(mean_v softmax(model(view_v)))``: log-probabilities (floored at
    :data:`LOG_PROB_FLOOR`), which softmax, temperature scaling and arg-max treat as logits.
    """

    __test__ = False  # not a pytest test class, whatever its name says
    model: nn.Module
    views: TestTimeViews

    def __init__(self, model: nn.Module, views: TestTimeViews) -> None:
        super().__init__()
        self.model = model
        self.views = views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the log of the views' mean probabilities for a batch of preprocessed tiles."""
        probs = torch.softmax(self.model(self.views.expand(x)).float(), dim=1)
        # chunk, not a reshape to (views, batch, classes): the exported ONNX graph keeps a dynamic batch axis and a
        # fixed number of classes.
        mean = torch.stack(probs.chunk(self.views.count, dim=0)).mean(dim=0)
        return torch.log(mean.clamp_min(math.exp(LOG_PROB_FLOOR)))


def with_views(model: nn.Module, views: TestTimeViews) -> nn.Module:
    """Return ``model`` wrapped in :class:`TestTimeAugmented` (the model itself when it is already wrapped)."""
    return model if isinstance(model, TestTimeAugmented) else TestTimeAugmented(model, views)
