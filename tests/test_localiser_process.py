"""The model in a child process gives exactly what it gives in-process, and fails clearly."""

from __future__ import annotations

import threading
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


class _FakeChild:
    """A stand-in for the child process: a thread on the other end of a real pipe that answers
    x = the frame's first pixel, or never answers (``hang``). ``kill`` closes its pipe end, as
    the death of a real child does."""

    def __init__(self, *, hang: bool = False, crash: bool = False) -> None:
        import multiprocessing

        self.parent, self._child = multiprocessing.Pipe(duplex=True)
        self.hang = hang
        self.crash = crash  # ends (closing its pipe) on its first frame, as a child that crashed
        self.killed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import json

        try:
            while True:
                header = json.loads(self._child.recv_bytes())
                if header.get("stop"):
                    return
                pixels = np.frombuffer(self._child.recv_bytes(), dtype=header["dtype"]).reshape(header["shape"])
                if self.hang:
                    self.killed.wait()
                    return
                if self.crash:
                    return
                self._child.send_bytes(json.dumps({"ok": True, "seq": header.get("seq"),
                                                   "tips": [[float(pixels[0, 0]), 0.0, 0.9]]}).encode())
        except (EOFError, OSError):
            return
        finally:
            self._child.close()

    def kill(self) -> None:
        self.killed.set()
        self._thread.join(5.0)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()


def test_a_child_that_does_not_answer_is_killed_and_replaced(monkeypatch) -> None:
    """A frame is never sent to a child that stopped reading (the send would block for ever);
    the hung child is killed, the next frame goes to a new one, and no answer of the old one
    can come back as a later frame's tips."""
    import rig.localiser_process as lp

    hung = _FakeChild(hang=True)
    fresh = _FakeChild()
    spawned: list[tuple] = []

    def spawn(checkpoint, device, threads, started=None):  # noqa: ANN001, ANN202
        spawned.append((checkpoint, device, threads))
        started(fresh)
        return fresh, fresh.parent, {"ok": True}

    monkeypatch.setattr(ProcessLocaliser, "_spawn", staticmethod(spawn))
    monkeypatch.setattr(lp, "CALL_TIMEOUT_S", 0.2)
    remote = ProcessLocaliser(hung, hung.parent, "cpu", "fake", ("fake.pt", "cpu", 1))
    with pytest.raises(lp.PatchrigError, match="did not answer"):
        remote.locate(np.full((16, 16), 1, np.uint16), 0.5)
    assert hung.killed.is_set() and not spawned
    for value in (2, 3):
        assert [d.x_px for d in remote.locate(np.full((16, 16), value, np.uint16), 0.5)] == [float(value)]
    assert spawned == [("fake.pt", "cpu", 1)]
    remote.close()
    assert not fresh.is_alive()


def test_close_never_waits_behind_a_call_to_a_hung_child(monkeypatch) -> None:
    """Shutdown must not hang on the localiser: ``close`` kills a child that keeps a call
    longer than ``CLOSE_LOCK_WAIT_S``, and that call ends with an error."""
    import time

    import rig.localiser_process as lp

    hung = _FakeChild(hang=True)
    remote = ProcessLocaliser(hung, hung.parent, "cpu", "fake")
    errors: list[Exception] = []

    def call() -> None:
        try:
            remote.locate(np.full((16, 16), 1, np.uint16), 0.5)
        except lp.PatchrigError as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.2)  # the call is waiting for its answer (CALL_TIMEOUT_S: 30 s)
    t0 = time.monotonic()
    remote.close()
    assert time.monotonic() - t0 < lp.CLOSE_LOCK_WAIT_S + 3.0
    caller.join(5.0)
    assert not caller.is_alive() and len(errors) == 1 and "died" in str(errors[0])
    with pytest.raises(lp.PatchrigError, match="closed"):
        remote.locate(np.full((16, 16), 1, np.uint16), 0.5)


def test_a_restart_that_fails_is_not_tried_again_for_every_frame(monkeypatch) -> None:
    import rig.localiser_process as lp

    hung = _FakeChild(hang=True)
    tries: list[int] = []

    def spawn_fails(checkpoint, device, threads, started=None):  # noqa: ANN001, ANN202
        tries.append(1)
        raise ConfigError("cannot load the localiser: CUDA error")

    monkeypatch.setattr(ProcessLocaliser, "_spawn", staticmethod(spawn_fails))
    monkeypatch.setattr(lp, "CALL_TIMEOUT_S", 0.2)
    remote = ProcessLocaliser(hung, hung.parent, "cpu", "fake", ("fake.pt", "cpu", 1))
    frame = np.full((16, 16), 1, np.uint16)
    with pytest.raises(lp.PatchrigError, match="did not answer"):
        remote.locate(frame, 0.5)
    with pytest.raises(lp.PatchrigError, match="could not be restarted.*CUDA error"):
        remote.locate(frame, 0.5)
    for _ in range(5):  # frames keep coming: refused at once, no model load for each
        with pytest.raises(lp.PatchrigError, match="next try"):
            remote.locate(frame, 0.5)
    assert len(tries) == 1
    fresh = _FakeChild()
    monkeypatch.setattr(ProcessLocaliser, "_spawn",
                        staticmethod(lambda c, d, t, started=None: (started(fresh), (fresh, fresh.parent, {}))[1]))
    remote._next_respawn_s = 0.0  # the back-off has passed
    assert [d.x_px for d in remote.locate(np.full((16, 16), 3, np.uint16), 0.5)] == [3.0]
    remote.close()


def test_a_child_that_crashed_is_replaced_on_the_next_frame(monkeypatch) -> None:
    """A child that dies (out of memory, a fault) used to leave every later frame failing."""
    import rig.localiser_process as lp

    crashed, fresh = _FakeChild(crash=True), _FakeChild()
    monkeypatch.setattr(ProcessLocaliser, "_spawn",
                        staticmethod(lambda c, d, t, started=None: (started(fresh), (fresh, fresh.parent, {}))[1]))
    remote = ProcessLocaliser(crashed, crashed.parent, "cpu", "fake", ("fake.pt", "cpu", 1))
    with pytest.raises(lp.PatchrigError, match="died"):
        remote.locate(np.full((16, 16), 1, np.uint16), 0.5)
    assert [d.x_px for d in remote.locate(np.full((16, 16), 2, np.uint16), 0.5)] == [2.0]
    remote.close()
