"""localisation.soup: the weight soup of first stages (element-wise mean of their weights)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from localisation.checkpoint import DEFAULT_CHECKPOINT, load_model, read_checkpoint, save_checkpoint
from localisation.configs import build_model, get_config
from localisation.soup import average_first_stages, main, write_soup
from rig.errors import DataError


def _ingredient(path: Path, seed: int, **overrides: object) -> Path:
    """A fast-tiny first stage with random weights and BatchNorm statistics drawn from ``seed``."""
    cfg = get_config("fast-tiny").with_overrides(**overrides)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "running_mean" in name:
                buf.normal_()
            elif "running_var" in name:
                buf.uniform_(0.5, 2.0)
    save_checkpoint(path, model.eval(), cfg)
    return path


def test_the_soup_is_the_elementwise_mean_and_runs(tmp_path: Path) -> None:
    a, b, c = (_ingredient(tmp_path / f"{n}.pt", seed) for n, seed in (("a", 1), ("b", 2), ("c", 3)))
    states = [load_model(p)[0].state_dict() for p in (a, b, c)]
    model, cfg, record = average_first_stages([a, b, c])
    soup = model.state_dict()
    floating = [k for k, v in soup.items() if v.is_floating_point()]
    assert any("running_mean" in k for k in floating) and any("weight" in k for k in floating)
    for key in floating:
        expected = (states[0][key].double() + states[1][key].double() + states[2][key].double()) / 3
        torch.testing.assert_close(soup[key], expected.float(), rtol=0, atol=1e-6)
    assert sum(not torch.equal(soup[k], states[0][k]) for k in floating) > len(floating) // 2
    for key in soup.keys() - set(floating):  # BatchNorm's step counter: the first ingredient's
        assert torch.equal(soup[key], states[0][key])
    assert cfg.name == "fast-tiny" and not model.training
    assert [i["path"] for i in record["ingredients"]] == [str(a), str(b), str(c)]
    assert record["ingredients"][1]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        out1, out2 = model(x), model(x)
    assert torch.isfinite(out1["center_logits"]).all()
    assert torch.equal(out1["center_logits"], out2["center_logits"])


def test_a_soup_of_one_is_that_network(tmp_path: Path) -> None:
    a = _ingredient(tmp_path / "a.pt", 7)
    model, _, _ = average_first_stages([a])
    original = load_model(a)[0]
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["center_logits"], original(x)["center_logits"])


def test_write_soup_makes_a_run_directory_that_loads(tmp_path: Path) -> None:
    a, b = _ingredient(tmp_path / "a.pt", 1), _ingredient(tmp_path / "b.pt", 2)
    best = write_soup(tmp_path / "soup", [a, b])
    assert best == tmp_path / "soup" / "best.pt"
    payload = read_checkpoint(best, expect_config="fast-tiny")
    assert [i["path"] for i in payload["metrics"]["soup"]["ingredients"]] == [str(a), str(b)]
    assert json.loads((tmp_path / "soup" / "soup.json").read_text()) == payload["metrics"]["soup"]
    assert (tmp_path / "soup" / "metrics.jsonl").read_text() == ""
    assert "verifier" not in payload


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_um_per_px": 2.5}, "model_um_per_px"),
        ({"n_max": 3}, "n_max"),
        ({"name": "fast-other"}, "configuration 'fast-other'"),
    ],
)
def test_incompatible_ingredients_are_refused_and_nothing_is_written(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    a = _ingredient(tmp_path / "a.pt", 1)
    b = _ingredient(tmp_path / "b.pt", 2, **overrides)
    with pytest.raises(DataError, match=message):
        write_soup(tmp_path / "soup", [a, b])
    assert not (tmp_path / "soup").exists()


def test_other_tensors_are_refused(tmp_path: Path) -> None:
    a = _ingredient(tmp_path / "a.pt", 1)
    payload = torch.load(a, weights_only=False)
    payload["model_state"] = {k: v for k, v in payload["model_state"].items() if "head" not in k}
    # the same configuration, but not the same network: a checkpoint that lacks tensors does not load
    trimmed = tmp_path / "trimmed.pt"
    torch.save(payload, trimmed)
    with pytest.raises(DataError, match="do not fit"):
        average_first_stages([a, trimmed])


def test_a_cascade_an_empty_list_and_a_used_directory_are_refused(tmp_path: Path) -> None:
    a = _ingredient(tmp_path / "a.pt", 1)
    with pytest.raises(DataError, match="cascade with a verifier"):
        average_first_stages([a, DEFAULT_CHECKPOINT])
    with pytest.raises(DataError, match="at least one"):
        average_first_stages([])
    used = tmp_path / "run"
    used.mkdir()
    (used / "best.pt").write_bytes(b"a training run's checkpoint")
    with pytest.raises(DataError, match="not empty"):
        write_soup(used, [a])
    assert (used / "best.pt").read_bytes() == b"a training run's checkpoint"


def test_cli_writes_the_soup_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _ingredient(tmp_path / "a.pt", 1), _ingredient(tmp_path / "b.pt", 2)
    assert main([str(a), str(b), "--out", str(tmp_path / "soup")]) == 0
    assert "the mean of 2 first stages" in capsys.readouterr().out
    assert (tmp_path / "soup" / "best.pt").is_file()
    assert main([str(a), str(tmp_path / "missing.pt"), "--out", str(tmp_path / "soup2")]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "soup2").exists()
