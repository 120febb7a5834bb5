"""Persistence of calibrations: one versioned JSON file per channel, written atomically.

File ``<directory>/<channel>.json``::

    {"format": "patchrig-calibration", "version": 1,
     "channel": "A",
     "rig": {"name": "sim-rig", "objective": "25x/1.05", "um_per_px": 0.62},
     "calibration": {... ChannelCalibration.as_dict() ...},
     "offset_history": [{"t_s": 1764000000.0, "source": "calibrate" | "set_tip" | "correction",
                         "offset_um": [X, Y, Z], "delta_um": [dX, dY, dZ]}, ...],
     "saved_s": 1764000000.0}

Writes go to a temporary file in the same directory, are fsynced, then ``os.replace``d over
the old file, so a crash leaves either the old or the new calibration, never half of one.
A file made for another rig name, objective or pixel size is refused with ``NotCalibrated``
saying which; an unreadable or malformed file raises ``DataError`` naming it. In both cases
the file is left untouched.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.transform import ChannelCalibration, json_number, json_numbers
from config.models import RigIdentity
from rig.atomic import write_text_atomic
from rig.errors import DataError, InvalidParams, NotCalibrated

FORMAT = "patchrig-calibration"
VERSION = 1
MAX_HISTORY = 2000  # offset history entries kept per channel (the oldest are dropped)


def _offset_history(value: Any) -> list[dict[str, Any]]:
    """The file's offset history, checked entry by entry (InvalidParams on the first bad one):
    a NaN or a string here would make every later save of the channel fail."""
    if not isinstance(value, list):
        raise InvalidParams("offset_history is not a list")
    for k, entry in enumerate(value):
        where = f"offset_history[{k}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise InvalidParams(f"{where} must be an object with a 'source' string")
        json_number(entry.get("t_s"), f"{where}.t_s")
        json_numbers(entry.get("offset_um"), f"{where}.offset_um", (3,))
        if entry.get("delta_um") is not None:
            json_numbers(entry["delta_um"], f"{where}.delta_um", (3,))
    return value


@dataclass
class StoredCalibration:
    """A channel's calibration and the history of its offsets."""

    calibration: ChannelCalibration
    offset_history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, source: str, delta_um: list[float] | None = None) -> None:
        """Append the current offset to the history (``source``: calibrate, set_tip, correction)."""
        self.offset_history.append(
            {
                "t_s": time.time(),
                "source": source,
                "offset_um": [float(v) for v in self.calibration.offset_um],
                "delta_um": None if delta_um is None else [float(v) for v in delta_um],
            }
        )
        del self.offset_history[:-MAX_HISTORY]


def same_rig(a: RigIdentity, b: RigIdentity) -> str | None:
    """None if ``a`` and ``b`` are the same rig, objective and pixel size; else what differs."""
    if a.name != b.name:
        return f"rig {a.name!r}, not {b.name!r}"
    if a.objective != b.objective:
        return f"objective {a.objective!r}, not {b.objective!r}"
    if not math.isclose(a.um_per_px, b.um_per_px, rel_tol=1e-6):
        return f"pixel size {a.um_per_px} µm/px, not {b.um_per_px} µm/px"
    return None


class CalibrationStore:
    """Reads and writes the calibration files of one rig identity in ``directory``."""

    def __init__(self, directory: Path | str, rig: RigIdentity) -> None:
        self.directory = Path(directory).expanduser()
        self.rig = rig

    def path(self, channel: str) -> Path:
        if not channel or any(c in channel for c in "/\\") or channel.startswith("."):
            raise InvalidParams(f"bad channel name {channel!r}")
        return self.directory / f"{channel}.json"

    def save(self, channel: str, stored: StoredCalibration) -> Path:
        """Write atomically (rig.atomic: temp file, fsync, os.replace). Returns the path."""
        path = self.path(channel)
        self.directory.mkdir(parents=True, exist_ok=True)
        document = {
            "format": FORMAT,
            "version": VERSION,
            "channel": channel,
            "rig": {"name": self.rig.name, "objective": self.rig.objective, "um_per_px": self.rig.um_per_px},
            "calibration": stored.calibration.as_dict(),
            "offset_history": stored.offset_history,
            "saved_s": time.time(),
        }
        write_text_atomic(path, json.dumps(document, indent=1, allow_nan=False))
        return path

    def load(self, channel: str) -> StoredCalibration | None:
        """The stored calibration of ``channel``; None if there is no file.

        Raises ``DataError`` for an unreadable/malformed file and ``NotCalibrated`` for one made
        for another rig, objective or pixel size (the file is left as it is in both cases).
        """
        path = self.path(channel)
        if not path.exists():
            return None
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, huge ints
            raise DataError(f"calibration file {path} is unreadable: {exc}") from None
        if not isinstance(document, dict):
            raise DataError(f"calibration file {path} is not a JSON object")
        if document.get("format") != FORMAT:
            raise DataError(f"calibration file {path} has format {document.get('format')!r}, expected {FORMAT!r}")
        if type(document.get("version")) is not int or document.get("version") != VERSION:
            raise DataError(f"calibration file {path} has version {document.get('version')!r}; this patchrig reads version {VERSION}")
        try:
            rig = RigIdentity(**document["rig"])
        except Exception as exc:  # pydantic ValidationError, KeyError, TypeError
            raise DataError(f"calibration file {path} has a malformed rig section: {exc}") from None
        differs = same_rig(rig, self.rig)
        if differs is not None:
            raise NotCalibrated(
                f"stored calibration {path} was made for {differs}; refused, recalibrate this channel",
                channel=channel,
            )
        if document.get("channel") != channel:
            raise DataError(f"calibration file {path} belongs to channel {document.get('channel')!r}, not {channel!r}")
        try:
            calibration = ChannelCalibration.from_dict(document["calibration"])
            history = _offset_history(document.get("offset_history", []))
        except (KeyError, InvalidParams, TypeError, ValueError, OverflowError) as exc:  # numbers out of range
            raise DataError(f"calibration file {path}: {exc}") from None
        if calibration.channel != channel:
            raise DataError(f"calibration file {path} holds the calibration of channel {calibration.channel!r}, not {channel!r}")
        return StoredCalibration(calibration=calibration, offset_history=history)

    def set_aside(self, channel: str) -> Path | None:
        """Rename ``channel``'s file to ``<channel>.refused-<UTC time>.json`` (never over
        another file) so that a new calibration does not destroy one that was refused at
        load (another objective, a damaged file): a person may still want it. Returns the new
        path, or None if there was no file."""
        path = self.path(channel)
        if not path.exists():
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(1000):
            aside = path.with_name(f"{path.stem}.refused-{stamp}{'' if n == 0 else f'-{n}'}.json")
            if not aside.exists():
                path.rename(aside)
                return aside
        raise DataError(f"cannot set {path} aside: too many refused copies beside it")
