"""The conditional GAN's networks, sized for a few dozen tiles per class.

* :class:`Generator`: noise to a 4x4 map, then upsampling blocks (nearest neighbour and a 3x3 convolution, not a
  transposed convolution, whose uneven overlaps print a checkerboard) with class-conditional group norm: the class
  sets the gain and bias of every normalisation, so the class shapes every scale of the tile, not only its start.
  Group norm, not batch norm: a tile then depends on its own noise vector only, not on the batch it was drawn in
  or on running statistics (which the moving average of the weights would blur), so a seed and an index name it.
* :class:`Discriminator`: strided convolutions with spectral norm on every layer (Miyato et al. 2018), which bounds
  the discriminator's Lipschitz constant and keeps a tiny training set from being memorised within a few hundred
  steps, and a projection head (Miyato & Koyama 2018): the class enters as the inner product of a class embedding
  with the pooled features, rather than as concatenated one-hot planes.

Both work at 32, 64 or 128 px: one block per doubling from 4 px.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from bonetumor.errors import ConfigError

#: Tile sides the networks are built for (powers of two from 32 px).
IMAGE_SIZES = (32, 64, 128)


def _blocks(image_size: int) -> int:
    if image_size not in IMAGE_SIZES:
        raise ConfigError(f"balance.image_size: {image_size}; expected one of {list(IMAGE_SIZES)}")
    return int(math.log2(image_size)) - 2


class ConditionalGroupNorm(nn.Module):
    """Group norm whose gain and bias are looked up per class (initialised to the identity)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels // 4), channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` and apply each sample's class gain and bias."""
        return self.norm(x) * self.gain(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]


class NoiseInjection(nn.Module):
    """Adds per-pixel Gaussian noise, scaled by a learned weight per channel (StyleGAN, Karras et al. 2019).

    Fine texture (nuclei, fibres, the grain of bone) is stochastic: fresh noise at every scale gives the
    generator a source for it, instead of having to draw it from the single latent vector.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` plus scaled noise of one channel, broadcast over its channels."""
        return x + self.weight * torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)


class _UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_classes: int) -> None:
        super().__init__()
        self.norm = ConditionalGroupNorm(c_in, num_classes)
        # Reflected borders: zero padding lets the generator draw a frame it can place by the padding alone.
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="reflect")
        self.noise = NoiseInjection(c_out)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(x, labels))
        return self.noise(self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")))


class Generator(nn.Module):
    """Noise and class to an RGB tile in [-1, 1].

    Args:
        latent_dim: Size of the noise vector.
        num_classes: Classes it can be asked for.
        image_size: Side of the tiles (32, 64 or 128).
        width: Channels of the last block; each earlier block has twice as many, up to ``8 * width``.
    """

    def __init__(self, latent_dim: int, num_classes: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        n_up = _blocks(image_size)
        channels = [width * min(2 ** (n_up - i), 8) for i in range(n_up + 1)]
        self.latent_dim = latent_dim
        self.start_channels = channels[0]
        self.project = nn.Linear(latent_dim, channels[0] * 16)
        self.blocks = nn.ModuleList(_UpBlock(channels[i], channels[i + 1], num_classes) for i in range(n_up))
        self.out_norm = ConditionalGroupNorm(channels[-1], num_classes)
        self.out = nn.Conv2d(channels[-1], 3, 3, padding=1, padding_mode="reflect")

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Generate one tile per (noise vector, class index) pair: (N, 3, S, S) in [-1, 1]."""
        h = self.project(z).view(-1, self.start_channels, 4, 4)
        for block in self.blocks:
            h = block(h, labels)
        return torch.tanh(self.out(torch.relu(self.out_norm(h, labels))))


class Discriminator(nn.Module):
    """RGB tile and class to a real-vs-fake score (spectral norm throughout, projection of the class).

    Args:
        num_classes: Classes of the tiles.
        image_size: Side of the tiles (32, 64 or 128).
        width: Channels of the first block; each next block has twice as many, up to ``8 * width``.
    """

    def __init__(self, num_classes: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        n_down = _blocks(image_size)
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(3, width, 3, padding=1)), nn.LeakyReLU(0.1)]
        c_in = width
        for i in range(n_down):
            c_out = width * min(2 ** (i + 1), 8)
            layers += [
                spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)),
                nn.LeakyReLU(0.1),
                spectral_norm(nn.Conv2d(c_out, c_out, 3, padding=1)),
                nn.LeakyReLU(0.1),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.linear = spectral_norm(nn.Linear(c_in, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, c_in))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return one score per (tile, class index) pair: higher reads as real."""
        h = self.features(images).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)
