"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) of every tile the discriminator sees.

A discriminator trained on a few dozen tiles memorises them within a few hundred steps, and the generator then
learns nothing more. Augmenting only the real tiles would teach the generator to make augmented tiles; DiffAugment
applies the same random family of transforms to real and generated tiles alike, inside the graph, so the
generator's gradient flows through them. The transforms here are the paper's three:

* ``color``: per tile, a random brightness shift, saturation scale and contrast scale (stain and scanner vary
  from slide to slide, so these are also plausible H&E variations);
* ``translation``: a random shift of up to 1/8 of the side, the uncovered border zero-filled;
* ``cutout``: a random square of half the side zeroed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bonetumor.errors import ConfigError


def _color(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    x = x + (torch.rand(n, 1, 1, 1, device=x.device) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device) + 0.5) + mean


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device)[None, :, None] + dy
    cols = torch.arange(w, device=x.device)[None, None, :] + dx
    # Index into a zero-padded copy: every output pixel reads the input pixel it is shifted from, or padding.
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    rows = (rows + 1).clamp(0, h + 1).expand(n, h, w)
    cols = (cols + 1).clamp(0, w + 1).expand(n, h, w)
    batch = torch.arange(n, device=x.device)[:, None, None].expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device) - ch // 2
    left = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device) - cw // 2
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


#: The augmentations by params name (``balance.diffaugment``), applied in this order.
AUGMENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "color": _color,
    "translation": _translation,
    "cutout": _cutout,
}


def parse_policy(policy: str) -> tuple[str, ...]:
    """Return the augmentation names of a comma-separated policy, in application order.

    Raises:
        ConfigError: A name is not one of :data:`AUGMENTATIONS`.
    """
    names = tuple(name.strip() for name in policy.split(",") if name.strip())
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(
            f"balance.diffaugment: unknown {unknown}; expected a comma-separated subset of {list(AUGMENTATIONS)}"
        )
    return tuple(name for name in AUGMENTATIONS if name in names)


def diff_augment(x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """Apply the named augmentations to a batch (N, 3, S, S), differentiably, drawing fresh parameters per tile."""
    for name in names:
        x = AUGMENTATIONS[name](x)
    return x
