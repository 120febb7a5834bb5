"""Progress bars that cost nothing when switched off.

``tqdm`` starts a monitor thread on its first bar even when ``disable=True``; ``bar`` returns
the iterable itself in that case, so quiet runs (tests, the daemon) start no thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def bar(iterable: Iterable[T], *, enabled: bool, **kwargs: Any) -> Iterable[T]:
    """``tqdm(iterable, **kwargs)`` when ``enabled``, else ``iterable`` unchanged."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, **kwargs)
