"""CycleGAN denoiser: generator/discriminator shapes, image pool, schedule, training step, tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from localisation.gan_train import CycleGanTrainer, GanConfig, ImagePool, crop_around, lr_factor
from localisation.models.cyclegan import (
    Denoiser,
    GeneratorSpec,
    PatchDiscriminator,
    ResnetGenerator,
    tile_starts,
)
from rig.errors import DataError

torch.set_num_threads(1)

TINY = GanConfig(ngf=4, n_blocks=1, ndf=4, batch_size=2, steps_constant=2, steps_decay=2, pool_size=3)


@pytest.mark.parametrize("size", [80, 256])
def test_generator_is_fully_convolutional(size: int) -> None:
    torch.manual_seed(0)
    gen = ResnetGenerator(ngf=4, n_blocks=1)
    out = gen(torch.rand(2, 1, size, size) * 2 - 1)
    assert out.shape == (2, 1, size, size)
    assert out.abs().max() <= 1.0  # tanh output
    with pytest.raises(ValueError, match="multiples of 4"):
        gen(torch.rand(1, 1, 82, 80))


def test_patch_discriminator_outputs_a_grid_of_patch_scores() -> None:
    disc = PatchDiscriminator(ndf=4)
    assert disc(torch.rand(3, 1, 80, 80)).shape == (3, 1, 8, 8)
    assert disc(torch.rand(1, 1, 256, 256)).shape == (1, 1, 30, 30)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    # 70x70 PatchGAN: five 4x4 convs, strides 2, 2, 2, 1, 1 -> receptive field 70 px
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    rf = 1
    for c in reversed(convs):
        rf = (rf - 1) * c.stride[0] + c.kernel_size[0]
    assert rf == 70


def test_image_pool_fills_then_mixes_history() -> None:
    pool = ImagePool(3, seed=0)
    first = torch.arange(3, dtype=torch.float32).reshape(3, 1, 1, 1)
    torch.testing.assert_close(pool.query(first), first)  # filling: the new images come back
    assert len(pool.images) == 3
    seen_old = seen_new = False
    for k in range(20):
        new = torch.full((2, 1, 1, 1), 100.0 + k)
        out = pool.query(new)
        assert out.shape == new.shape
        seen_new |= bool((out == new).any())
        seen_old |= bool((out < 100 + k).any())
        assert len(pool.images) == 3
    assert seen_old and seen_new
    passthrough = ImagePool(0)  # no history: the same images, detached from the generator's graph
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    out = passthrough.query(x)
    assert torch.equal(out, x) and not out.requires_grad


def test_learning_rate_is_constant_then_linear_to_zero() -> None:
    factors = [lr_factor(s, 100, 100) for s in range(0, 201, 25)]
    assert factors == [1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    trainer = CycleGanTrainer(TINY)
    batch = torch.rand(2, 1, 80, 80) * 2 - 1
    lrs = [trainer.lr]
    for _ in range(4):
        trainer.step(batch, batch)
        lrs.append(trainer.lr)
    assert lrs == pytest.approx([2e-4, 2e-4, 2e-4, 1e-4, 0.0])


def test_one_training_step_is_finite_and_updates_all_networks() -> None:
    torch.manual_seed(0)
    trainer = CycleGanTrainer(TINY)
    before = {k: v.clone() for k, v in trainer.nets.state_dict().items()}
    losses = trainer.step(torch.rand(2, 1, 80, 80) * 2 - 1, torch.rand(2, 1, 80, 80) * 2 - 1)
    assert set(losses) == {"g_adv", "cycle", "identity", "d_ex", "d_in"}
    assert all(np.isfinite(v) for v in losses.values())
    after = trainer.nets.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    for net in ("g", "g_inv", "d_ex", "d_in"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(net + ".")), net


def test_denoiser_whole_frame_and_tiles(tmp_path) -> None:
    torch.manual_seed(0)
    gen = ResnetGenerator(ngf=4, n_blocks=1)
    spec = GeneratorSpec(ngf=4, n_blocks=1)
    x = torch.rand(1, 1, 100, 130)
    whole = Denoiser(gen, spec).denoise(x)
    tiled = Denoiser(gen, spec, tile=80, overlap=16).denoise(x)
    for y in (whole, tiled):
        assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # without overlap on a frame of whole tiles, the output is exactly the generator per tile
    frame = torch.rand(1, 1, 160, 240)
    stitched = Denoiser(gen, spec, tile=80, overlap=0).denoise(frame)
    with torch.no_grad():
        tile = (gen(frame[..., 80:160, 160:240] * 2 - 1) + 1) / 2
    torch.testing.assert_close(stitched[..., 80:160, 160:240], tile)
    assert tile_starts(100, 80, 16) == [0, 20] and tile_starts(256, 80, 16) == [0, 64, 128, 176]
    # save / load round trip; a wrong file is a clear error
    path = tmp_path / "den.pt"
    Denoiser(gen, spec).save(path)
    torch.testing.assert_close(Denoiser.load(path).denoise(x), whole)
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="patchrig-denoiser/1"):
        Denoiser.load(tmp_path / "other.pt")
    with pytest.raises(DataError, match="not found"):
        Denoiser.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError):
        Denoiser(gen, spec, tile=80).denoise(torch.rand(1, 3, 80, 80))


def test_crop_around_pads_by_reflection_at_the_border() -> None:
    img = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)
    crop = crop_around(img, 100.2, 50.7, 80)
    assert crop.shape == (80, 80) and crop[40, 40] == img[51, 100]
    corner = crop_around(img, 2.0, 3.0, 80)
    assert corner.shape == (80, 80) and corner[40, 40] == img[3, 2]
    assert corner[40, 39] == img[3, 1] and corner[40, 37] == img[3, 1]  # mirrored about column 0


def test_train_cyclegan_writes_log_checkpoint_and_denoiser_and_resumes(tmp_path) -> None:
    from localisation.gan_train import train_cyclegan

    rng = np.random.default_rng(0)
    crops = (rng.random((6, 80, 80), dtype=np.float32), rng.random((5, 80, 80), dtype=np.float32))
    cfg = GanConfig(ngf=4, n_blocks=1, ndf=4, batch_size=2, steps_constant=1, steps_decay=1, checkpoint_every=1)
    den = train_cyclegan(cfg, tmp_path, crops=crops, progress=False)
    assert (tmp_path / "denoiser.pt").is_file() and (tmp_path / "cyclegan-train.pt").is_file()
    lines = (tmp_path / "cyclegan-log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"step": 2' in lines[0]  # logged at the last step
    x = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(Denoiser.load(tmp_path / "denoiser.pt").denoise(x), den.denoise(x))
    # a finished run resumes to the same generator without training further
    again = train_cyclegan(cfg, tmp_path, crops=crops, progress=False)
    torch.testing.assert_close(again.denoise(x), den.denoise(x))
    other = GanConfig(ngf=8, n_blocks=1, ndf=4, batch_size=2, steps_constant=1, steps_decay=1)
    with pytest.raises(DataError, match="another CycleGAN configuration"):
        train_cyclegan(other, tmp_path, crops=crops, progress=False)


def test_an_interrupted_cyclegan_run_resumes_exactly(tmp_path, monkeypatch) -> None:
    """Batches and the image pools' choices continue where they were: a run stopped at its
    step 4 checkpoint and resumed ends with the weights of an uninterrupted one (the samplers
    used to be re-seeded and the pools' random state lost: up to 1e-3 apart)."""
    from localisation.gan_train import train_cyclegan

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    crops = (rng.random((20, 32, 32), dtype=np.float32), rng.random((20, 32, 32), dtype=np.float32))
    cfg = GanConfig(ngf=4, n_blocks=1, ndf=4, crop=32, batch_size=2, steps_constant=4, steps_decay=4, pool_size=2,
                    checkpoint_every=4)
    train_cyclegan(cfg, tmp_path / "whole", crops=crops, progress=False)
    real_step = CycleGanTrainer.step

    def interrupted(self, *args):  # noqa: ANN001, ANN202
        if self.step_count == 4:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(CycleGanTrainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_cyclegan(cfg, tmp_path / "parts", crops=crops, progress=False)
    monkeypatch.setattr(CycleGanTrainer, "step", real_step)
    train_cyclegan(cfg, tmp_path / "parts", crops=crops, progress=False)
    whole = torch.load(tmp_path / "whole" / "cyclegan-train.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "cyclegan-train.pt", weights_only=True)
    assert whole["step"] == parts["step"] == 8
    for name, value in whole["nets"].items():
        torch.testing.assert_close(parts["nets"][name], value, rtol=0, atol=0)
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (tmp_path / "parts" / "cyclegan-log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step logged twice


def test_a_cyclegan_run_stopped_before_its_first_checkpoint_starts_its_log_again(tmp_path, monkeypatch) -> None:
    from localisation.gan_train import train_cyclegan

    rng = np.random.default_rng(0)
    crops = (rng.random((8, 32, 32), dtype=np.float32), rng.random((8, 32, 32), dtype=np.float32))
    cfg = GanConfig(ngf=2, n_blocks=1, ndf=2, crop=32, batch_size=1, steps_constant=30, steps_decay=0, pool_size=0,
                    checkpoint_every=50)
    real_step = CycleGanTrainer.step

    def stopped_at_27(self, *args):  # noqa: ANN001, ANN202
        if self.step_count == 27:  # logged step 25, no checkpoint yet
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(CycleGanTrainer, "step", stopped_at_27)
    with pytest.raises(KeyboardInterrupt):
        train_cyclegan(cfg, tmp_path, crops=crops, progress=False)
    monkeypatch.setattr(CycleGanTrainer, "step", real_step)
    train_cyclegan(cfg, tmp_path, crops=crops, progress=False)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (tmp_path / "cyclegan-log.jsonl").read_text().splitlines()]
    assert steps == [25, 30]


def test_gan_train_refuses_unusable_options_in_one_line(tmp_path, capsys) -> None:
    from localisation.gan_train import main

    assert main(["--out", str(tmp_path / "g"), "--frames", "0", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--frames must be at least 1" in err[0]
    assert not (tmp_path / "g").exists()


def test_denoiser_treats_each_image_of_a_batch_on_its_own() -> None:
    torch.manual_seed(1)
    gen = ResnetGenerator(ngf=4, n_blocks=1)
    batch = torch.rand(3, 1, 96, 120)
    for den in (Denoiser(gen, GeneratorSpec(4, 1)), Denoiser(gen, GeneratorSpec(4, 1), tile=80, overlap=16)):
        together = den.denoise(batch)
        alone = torch.cat([den.denoise(batch[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
