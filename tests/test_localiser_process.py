"""The model in a child process gives exactly what it gives in-process, and fails clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rig.errors import ConfigError
from rig.localiser_process import ProcessLocaliser


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from localisation.checkpoint import save_checkpoint
    from localisation.configs import build_model, get_config

    torch.manual_seed(0)
    cfg = get_config("fast")
    path = tmp_path_factory.mktemp("ckpt") / "untrained-fast.pt"
    save_checkpoint(path, build_model(cfg), cfg)
    return path


def test_child_process_matches_in_process_inference(checkpoint: Path) -> None:
    from localisation.inference import TipLocaliser

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 4000, size=(256, 256), dtype=np.uint16) for _ in range(3)]
    local = TipLocaliser.load(checkpoint, device="cpu", threads=1)
    remote = ProcessLocaliser.start(str(checkpoint), device="cpu", threads=1)
    try:
        assert remote.device == "cpu"
        for pixels in frames:
            expected = local.locate(pixels, 0.62)
            got = remote.locate(pixels, 0.62)
            assert [(d.x_px, d.y_px) for d in got] == pytest.approx([(d.x_px, d.y_px) for d in expected], abs=1e-4)
            assert [d.score for d in got] == pytest.approx([d.score for d in expected], abs=1e-5)
        assert isinstance(remote.locate(frames[0][:, :200].copy(), 0.5), list)  # any size
    finally:
        remote.close()
    remote.close()  # idempotent
    with pytest.raises(Exception, match="closed"):
        remote.locate(frames[0], 0.62)


def test_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load the localiser"):
        ProcessLocaliser.start(str(tmp_path / "nope.pt"), device="cpu", threads=1)
