""""Set tip": an offset-only recalibration of one channel.

After a pipette change, or when the error has grown, the axes' gains are still right but the
tip sits elsewhere. The tip's microscope position is taken from a detection (or from a pixel
the user clicked), its Z is the frame's focal plane (a tip one can see is in focus), and the
offset is set so that the current read-back position maps exactly there:

    offset_um = tip_um - matrix @ position_um

The new offset is pinned at the current position with the variance of one detection
(``detection_var_um2``), so the uncertainty grows again with distance from here.
"""

from __future__ import annotations

import numpy as np

from calibration.transform import ChannelCalibration


def set_tip_offset(
    calibration: ChannelCalibration,
    position_um: np.ndarray,
    tip_xy_um: np.ndarray,
    focal_z_um: float,
    *,
    detection_var_um2: float = 0.25,
) -> ChannelCalibration:
    """The calibration with its offset re-pinned so that ``position_um`` maps to the tip seen
    at microscope ``tip_xy_um`` (X, Y µm) in the focal plane ``focal_z_um`` (µm)."""
    p = np.asarray(position_um, float)
    tip = np.array([float(tip_xy_um[0]), float(tip_xy_um[1]), float(focal_z_um)])
    offset = tip - calibration.matrix @ p
    return calibration.with_offset(offset, anchor_position_um=p, anchor_var_um2=detection_var_um2)
