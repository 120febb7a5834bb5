"""One two-photon frame, as every frame source delivers it (patchrig-frame/1 in memory)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    """A greyscale frame. ``pixels``: (h, w) uint8 or uint16, C order.

    ``t_s``: acquisition time (seconds, the source's clock, time.time() for live sources);
    ``received_s``: time.monotonic() when the daemon received it (staleness is judged on it);
    ``um_per_px``: pixel size; ``z_um``: focal plane in microscope µm, None when unknown.
    """

    frame_id: int
    t_s: float
    pixels: np.ndarray
    um_per_px: float
    z_um: float | None
    received_s: float

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))
