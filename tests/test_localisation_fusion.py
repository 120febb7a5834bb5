"""Folding BatchNorm into convolutions for inference: same outputs, fewer layers, and the
caller's model is never changed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from localisation.checkpoint import DEFAULT_CHECKPOINT, load_model
from localisation.configs import build_model, get_config
from localisation.fusion import fuse_conv_batchnorm_
from localisation.inference import TipLocaliser, model_input
from localisation.verifier import TipVerifier, VerifierConfig
from simulators.synth import sample_example

torch.set_num_threads(1)


def _randomise_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms (a fresh one is the
    identity, which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@torch.no_grad()
def test_fast_model_outputs_unchanged_and_no_batchnorm_left() -> None:
    model = _randomise_batchnorm(build_model(get_config("fast-tiny")), seed=1)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    before = model(x)
    n_bn = _batchnorms(model)
    assert n_bn > 0
    assert fuse_conv_batchnorm_(model) == n_bn  # every BatchNorm of the fast net follows a conv
    assert _batchnorms(model) == 0
    after = model(x)
    for key in ("center_logits", "offset"):
        assert torch.allclose(before[key], after[key], atol=1e-4), key


@torch.no_grad()
def test_verifier_outputs_unchanged() -> None:
    model = _randomise_batchnorm(TipVerifier(VerifierConfig(widths=(4, 8, 8, 8))), seed=3)
    crops = torch.rand(5, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    logits = torch.linspace(-3, 3, 5)
    before = model(crops, logits)
    assert fuse_conv_batchnorm_(model) == 8
    assert torch.allclose(before, model(crops, logits), atol=1e-5)


def test_only_a_convolution_directly_followed_by_batchnorm_is_folded() -> None:
    seq = nn.Sequential(
        nn.BatchNorm2d(3),  # no convolution before it
        nn.Conv2d(3, 3, 3), nn.ReLU(), nn.BatchNorm2d(3),  # a ReLU in between
        nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3),  # folded
    ).eval()
    assert fuse_conv_batchnorm_(seq) == 1
    assert [type(m).__name__ for m in seq] == ["BatchNorm2d", "Conv2d", "ReLU", "BatchNorm2d", "Conv2d", "Identity"]


def test_refuses_a_module_in_training_mode() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_batchnorm_(model)
    assert _batchnorms(model) == 1


def test_localiser_folds_a_copy_and_finds_the_same_tips() -> None:
    model, cfg, _ = load_model(DEFAULT_CHECKPOINT)
    original = copy.deepcopy(model.state_dict())
    loc = TipLocaliser(model, cfg, device=torch.device("cpu"), checkpoint="shipped")
    assert _batchnorms(loc.model) == 0
    # the copy's convolution weights are channels-last (faster on CPU), the caller's are not
    conv_weights = [p for p in loc.model.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    # the caller's module keeps its layers and weights
    assert _batchnorms(model) > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    # and the folded copy proposes the same peaks as the unfolded network
    ex = sample_example(30_000_100, n_tips=(2, 4))
    img, _ = loc.prepare(ex.pixels, ex.um_per_px)
    x = torch.from_numpy(model_input(img, cfg, model))[None, None]
    with torch.no_grad():
        folded, plain = loc.model(x), model(x)
    for key in ("center_logits", "offset"):
        assert torch.allclose(folded[key], plain[key], atol=1e-4), key


@torch.no_grad()
def test_localisers_verifier_copy_gives_the_same_outputs() -> None:
    """The verifier as ``TipLocaliser`` runs it (folded, channels-last) against the module it
    was given, on a batch of crops: the flatten before the fully connected layer must read the
    features in the same order whatever their memory layout."""
    model, cfg, _ = load_model(DEFAULT_CHECKPOINT)
    verifier = _randomise_batchnorm(TipVerifier(VerifierConfig()), seed=5)
    loc = TipLocaliser(model, cfg, device=torch.device("cpu"), checkpoint="x", verifier=(verifier, VerifierConfig()))
    assert loc.verifier is not None and loc.verifier is not verifier
    assert _batchnorms(verifier) == 8 and _batchnorms(loc.verifier) == 0  # the given module is not changed
    crops = torch.rand(7, 1, 64, 64, generator=torch.Generator().manual_seed(6))
    logits = torch.linspace(-4, 4, 7)
    assert torch.allclose(loc.verifier(crops, logits), verifier(crops, logits), atol=1e-4)
