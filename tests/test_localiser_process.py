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


def test_a_reply_that_comes_after_its_call_timed_out_is_never_taken_for_the_next_frame(monkeypatch) -> None:
    """Each answer must belong to its own frame: tips of an earlier frame (before a move) must
    never come back as a later frame's."""
    import json
    import multiprocessing
    import threading

    import rig.localiser_process as lp

    parent, child = multiprocessing.Pipe(duplex=True)
    first_may_answer = threading.Event()

    def fake_child() -> None:  # answers x = the frame's first pixel; holds its first answer
        n = 0
        while True:
            header = json.loads(child.recv_bytes())
            if header.get("stop"):
                return
            pixels = np.frombuffer(child.recv_bytes(), dtype=header["dtype"]).reshape(header["shape"])
            if n == 0:
                first_may_answer.wait(10.0)
            n += 1
            child.send_bytes(json.dumps({"ok": True, "seq": header.get("seq"),
                                         "tips": [[float(pixels[0, 0]), 0.0, 0.9]]}).encode())

    class NoProcess:
        def join(self, timeout=None) -> None:
            pass

        def is_alive(self) -> bool:
            return False

    threading.Thread(target=fake_child, daemon=True).start()
    remote = ProcessLocaliser(NoProcess(), parent, "cpu", "fake")
    monkeypatch.setattr(lp, "CALL_TIMEOUT_S", 0.2)
    with pytest.raises(lp.PatchrigError, match="did not answer"):
        remote.locate(np.full((16, 16), 1, np.uint16), 0.5)
    first_may_answer.set()  # frame 1's answer is now in the pipe, late
    monkeypatch.setattr(lp, "CALL_TIMEOUT_S", 30.0)
    for value in (2, 3, 4):
        got = remote.locate(np.full((16, 16), value, np.uint16), 0.5)
        assert [d.x_px for d in got] == [float(value)]
    remote.close()
