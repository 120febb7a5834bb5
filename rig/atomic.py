"""Atomic file writes: nothing half-written is ever seen under the final name.

Every writer goes to a temporary file in the destination's folder, flushes and fsyncs it, makes
it readable by everyone (0644), ``os.replace``s it over the destination and fsyncs the folder.
On any error the temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


def _fsync_dir(directory: Path) -> None:
    with suppress(OSError):  # some filesystems refuse fsync on folders: the rename still stands
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) for writers that want a file name
    (matplotlib, tifffile); it replaces ``path`` when the block ends without error."""
    final = Path(path).expanduser()
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{final.suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` (``mode`` "wb" or "w"); it replaces ``path`` when
    the block ends without error."""
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open writes only: mode 'wb' or 'w'")
    encoding = None if mode == "wb" else "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh
        fh.flush()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def keep_jsonl_records(path: str | Path, keep: Callable[[Any], bool]) -> None:
    """Rewrite the JSON-lines file ``path`` atomically with only the records ``keep`` accepts
    (unreadable lines, such as one torn by a crash, are dropped); untouched if nothing is
    dropped or the file does not exist. For logs of a resumed run: the records of the work
    it does again go."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if keep(json.loads(line)):
                kept.append(line)
        except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not the record kept
            continue
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def write_json_atomic(
    path: str | Path, obj: Any, *, indent: int | None = 1, allow_nan: bool = False
) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (NaN/inf refused unless ``allow_nan``)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")
