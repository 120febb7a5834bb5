"""CycleGAN pieces (Zhu et al. 2017) for the paper's denoiser (Sec. III-A).

- ``ResnetGenerator``: reflection-padded 7x7 stem, two stride-2 downsamplings, residual blocks,
  two transposed-conv upsamplings, 7x7 output conv, tanh; instance norm. Fully convolutional:
  any (B, C, H, W) with H, W multiples of 4 maps to the same size; values in [-1, 1].
- ``PatchDiscriminator``: the 70x70 PatchGAN (3 stride-2 layers): (B, C, H, W) -> (B, 1, h, w)
  real/fake logits, one per overlapping 70x70 patch (8x8 for an 80x80 input).
- ``Denoiser``: the in vivo -> ex vivo generator used at inference, on images in [0, 1].
  It needs no labels: ``tile=None`` runs it fully convolutionally on the whole frame;
  ``tile=80`` runs it on 80x80 tiles (the training crop size), blended over ``overlap``
  pixels. docs/readme/localiser-paper.md records the ablation that picked the default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rig.atomic import atomic_open
from rig.errors import DataError

DENOISER_FORMAT = "patchrig-denoiser/1"


class ResnetBlock(nn.Module):
    """x + (pad, conv3x3, IN, ReLU, pad, conv3x3, IN)(x); shape-preserving."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """(B, in_ch, H, W) in [-1, 1] -> (B, out_ch, H, W) in [-1, 1]; H, W multiples of 4.

    ``ngf=64, n_blocks=9`` is CycleGAN's 256x256 generator; ``n_blocks=6`` its 128x128 one.
    """

    def __init__(self, in_ch: int = 1, out_ch: int = 1, *, ngf: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_ch, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):  # downsample x4
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c), nn.ReLU(True)]
        layers += [ResnetBlock(4 * ngf) for _ in range(n_blocks)]
        for i in range(2):  # upsample x4
            c = ngf * 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(c // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_ch, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"generator input H, W must be multiples of 4, got {tuple(x.shape)}")
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN: (B, in_ch, H, W) -> (B, 1, H/8 - 2, W/8 - 2) logits (LSGAN targets)."""

    def __init__(self, in_ch: int = 1, *, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1),
                nn.InstanceNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights(net: nn.Module, gain: float = 0.02) -> None:
    """CycleGAN's init: conv weights N(0, 0.02), biases zero."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass(frozen=True)
class GeneratorSpec:
    """What a saved generator needs to be rebuilt."""

    ngf: int = 64
    n_blocks: int = 9
    crop: int = 80  # training crop size (px at the model scale)
    image_size: int = 256  # frames were resized to this before cropping


class Denoiser(nn.Module):
    """The trained in vivo -> ex vivo generator, on images in [0, 1].

    ``denoise(x)``: (B, 1, H, W) in [0, 1], any H, W >= 8 -> (B, 1, H, W) in [0, 1].
    ``tile=None``: whole frame at once (reflection-padded to a multiple of 4, then cropped).
    ``tile=T``: T x T tiles stepping by ``T - overlap``, the last one flush with the border,
    blended with linear ramps over the overlap (``overlap=0``: plain stitching).
    """

    def __init__(
        self,
        generator: ResnetGenerator,
        spec: GeneratorSpec,
        *,
        tile: int | None = None,
        overlap: int = 16,
    ) -> None:
        super().__init__()
        if tile is not None and (tile % 4 or tile < 8 or not 0 <= overlap < tile):
            raise ValueError(f"tile must be a multiple of 4 >= 8 and 0 <= overlap < tile, got {tile}, {overlap}")
        self.generator = generator.eval()
        self.spec = spec
        self.tile = tile
        self.overlap = overlap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.denoise(x)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> denoised (B, 1, H, W) in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 1 or min(x.shape[-2:]) < 8:
            raise ValueError(f"expected (B, 1, H, W) with H, W >= 8, got {tuple(x.shape)}")
        y = x * 2 - 1
        y = self._whole(y) if self.tile is None else self._tiled(y)
        return (y + 1) * 0.5

    def _whole(self, y: torch.Tensor) -> torch.Tensor:
        h, w = y.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            y = F.pad(y, (0, pw, 0, ph), mode="reflect")
        return self.generator(y)[..., :h, :w]

    def _tiled(self, y: torch.Tensor) -> torch.Tensor:
        t = int(self.tile)  # type: ignore[arg-type]
        b, _, h, w = y.shape
        ph, pw = max(0, t - h), max(0, t - w)
        if ph or pw:  # frame smaller than a tile: pad, denoise, crop
            y = F.pad(y, (0, pw, 0, ph), mode="replicate")
        hh, ww = y.shape[-2:]
        ys, xs = tile_starts(hh, t, self.overlap), tile_starts(ww, t, self.overlap)
        tiles = torch.cat([y[..., r : r + t, c : c + t] for r in ys for c in xs], dim=0)
        out_tiles = self.generator(tiles).reshape(len(ys) * len(xs), b, 1, t, t)
        ramp = blend_ramp(t, self.overlap, y.device)
        weight = (ramp[:, None] * ramp[None, :])[None, None]
        acc = torch.zeros_like(y)
        norm = torch.zeros_like(y)
        k = 0
        for r in ys:
            for c in xs:
                acc[..., r : r + t, c : c + t] += out_tiles[k] * weight
                norm[..., r : r + t, c : c + t] += weight
                k += 1
        return (acc / norm)[..., :h, :w]

    def save(self, path: str | Path) -> None:
        """Write the generator and its spec atomically (format ``patchrig-denoiser/1``)."""
        payload = {"format": DENOISER_FORMAT, "spec": asdict(self.spec), "generator": self.generator.state_dict()}
        atomic_torch_save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path, *, tile: int | None = None, overlap: int = 16) -> Denoiser:
        """Read a ``patchrig-denoiser/1`` file; anything else raises ``DataError``."""
        p = Path(path)
        return cls.from_payload(read_denoiser_file(p), p, tile=tile, overlap=overlap)

    @classmethod
    def from_payload(cls, payload: Any, p: Path, *, tile: int | None = None, overlap: int = 16) -> Denoiser:
        """The generator in a payload ``read_denoiser_file`` returned from ``p`` (DataError
        unless it is a consistent ``patchrig-denoiser/1`` payload)."""
        if not isinstance(payload, dict) or payload.get("format") != DENOISER_FORMAT:
            raise DataError(f"{p} is not a {DENOISER_FORMAT} checkpoint")
        try:
            spec = GeneratorSpec(**payload["spec"])
            gen = ResnetGenerator(ngf=spec.ngf, n_blocks=spec.n_blocks)
            gen.load_state_dict(payload["generator"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise DataError(f"denoiser checkpoint {p} is inconsistent: {exc}") from exc
        return cls(gen, spec, tile=tile, overlap=overlap)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets covering [0, length): step ``tile - overlap``, last one flush."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def blend_ramp(tile: int, overlap: int, device: torch.device) -> torch.Tensor:
    """1-D weights (tile,): linear ramp up over ``overlap`` px at each end, 1 in between."""
    w = torch.ones(tile, device=device)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
        w[:overlap] = ramp
        w[-overlap:] = ramp.flip(0)
    return w


def read_denoiser_file(p: Path) -> Any:
    """The payload of a denoiser file, read once (DataError when it is missing or unreadable)."""
    if not p.is_file():
        raise DataError(f"denoiser checkpoint not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"cannot read denoiser checkpoint {p}: {exc}") from exc


def atomic_torch_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace."""
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)
