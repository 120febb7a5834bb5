"""The paper study's shared pieces: frame preparation, coarse-only ablation, tile edges."""

from __future__ import annotations

import numpy as np
import torch

from localisation.configs import get_config
from localisation.models import build_paper_model
from localisation.models.cyclegan import Denoiser, GeneratorSpec, ResnetGenerator
from localisation.paper_eval import CoarseOnly, StudyPlan, study_config, study_image, tile_edges
from localisation.postprocess import detections

torch.set_num_threads(1)


def test_study_image_resizes_normalises_and_maps_labels() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 4000, size=(512, 512)).astype(np.uint16)
    img, rs = study_image(frame, 0.5, size=128, denoiser=None)
    assert img.shape == (128, 128) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert rs.sx == rs.sy == 0.25
    tips = np.array([[0.0, 0.0], [511.0, 255.5]])
    np.testing.assert_allclose(rs.to_input(rs.to_model(tips)), tips)
    np.testing.assert_allclose(rs.to_model(tips)[1], [127.375, 63.5])
    gen = ResnetGenerator(ngf=4, n_blocks=1)
    den_img, den_rs = study_image(frame, 0.5, size=128, denoiser=Denoiser(gen, GeneratorSpec(4, 1)))
    assert den_img.shape == (128, 128) and den_rs == rs
    assert not np.allclose(den_img, img)


def test_the_study_localiser_runs_its_denoiser_in_locate() -> None:
    """The "+gan" rows of the study must see denoised frames in ``locate`` too."""
    from localisation.paper_eval import StudyLocaliser

    cfg = get_config("paper-small")
    calls: list[tuple[int, ...]] = []

    class CountingDenoiser(Denoiser):
        def denoise(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(x.shape))
            return super().denoise(x)

    model = build_paper_model(n_max=cfg.n_max, vit_depth=1, vit_dim=32, vit_heads=2, image_size=cfg.input_size)
    loc = StudyLocaliser(model, cfg, denoiser=CountingDenoiser(ResnetGenerator(ngf=4, n_blocks=1), GeneratorSpec(4, 1)))
    frame = np.random.default_rng(1).integers(0, 4000, size=(256, 256)).astype(np.uint16)
    loc.locate(frame, 0.5)
    assert calls == [(1, 1, 256, 256)]


def test_coarse_only_reports_heatmap_peaks() -> None:
    model = build_paper_model(n_max=3, vit_depth=1, vit_dim=32, vit_heads=2, image_size=64)
    coarse = CoarseOnly(model)
    out = coarse(torch.rand(1, 1, 64, 64))
    assert set(out) == {"heatmap"}
    with torch.no_grad():  # force one clear peak through the head's bias and a flat map
        coarse.encoder.head.conv1x1.weight.zero_()
        coarse.encoder.head.conv1x1.bias.fill_(-5.0)
    heat = coarse(torch.rand(1, 1, 64, 64))["heatmap"]
    heat[0, 0, 20, 30] = 5.0
    xy, scores = detections({"heatmap": heat}, score_threshold=0.5, n_max=3)[0]
    np.testing.assert_allclose(xy, [[30.0, 20.0]])
    assert scores[0] > 0.99


def test_study_configs_and_tile_edges() -> None:
    plan = StudyPlan()
    paper = study_config(plan, "paper-small")
    assert [s.epochs for s in paper.stages] == list(plan.paper_stages)
    assert [s.trainable for s in paper.stages] == [("encoder",), ("decoder",), None]
    assert paper.input_size == 128 and paper.sigma_px == 5.0 and paper.n_max == 6
    assert paper.model_kwargs == get_config("paper-small").model_kwargs
    assert study_config(plan, "baseline-vgg16").model_kwargs["width"] == 0.25
    assert tile_edges(256, 80, 0) == [80, 160, 176, 240]
    assert tile_edges(256, 80, 16) == [64, 80, 128, 144, 176, 208]
