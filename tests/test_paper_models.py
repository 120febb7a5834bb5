"""The paper's models and baselines: shapes, heads, coordinate scaling, local pretrained weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.vision_transformer import VisionTransformer

from localisation.models import (
    BASELINES,
    ResNetCoords,
    ViTHeatmap,
    build_baseline,
    build_paper_model,
)
from rig.errors import DataError

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def tiny_paper(**kw: object) -> nn.Module:
    args = {"n_max": 3, "vit_depth": 1, "vit_dim": 32, "vit_heads": 2, "image_size": 64}
    args.update(kw)
    return build_paper_model(**args)  # type: ignore[arg-type]


def test_paper_model_output_shapes() -> None:
    torch.manual_seed(0)
    model = tiny_paper(presence=True).eval()
    out = model(torch.rand(2, 1, 64, 64))
    assert out["heatmap"].shape == (2, 1, 64, 64)
    assert out["coords"].shape == (2, 3, 2)
    assert out["presence"].shape == (2, 3)
    assert "presence" not in tiny_paper()(torch.rand(1, 1, 64, 64))


def test_paper_defaults_are_vit_b16_and_resnet18() -> None:
    model = build_paper_model()
    vit = model.encoder.vit
    assert len(vit.encoder.layers) == 12 and vit.hidden_dim == 768 and vit.patch_size == 16
    assert vit.encoder.pos_embedding.shape == (1, 16 * 16 + 1, 768)  # learnable, 256x256 input
    assert vit.encoder.pos_embedding.requires_grad
    assert isinstance(vit.heads, nn.Identity)
    assert model.decoder.fc.out_features == 4 * 2
    assert model.decoder.backbone.conv1.in_channels == 1
    assert sum(p.numel() for p in model.decoder.backbone.parameters()) == pytest.approx(11.17e6, rel=0.01)


def test_heatmap_head_structure_and_order_invariance() -> None:
    torch.manual_seed(0)
    head = ViTHeatmap(image_size=64, depth=1, dim=32, heads=2).head
    assert head.conv3x3.kernel_size == (3, 3) and head.conv3x3.out_channels == 256
    assert isinstance(head.relu, nn.ReLU)
    assert head.upsample.mode == "bilinear" and head.upsample.scale_factor == 16
    assert head.conv1x1.kernel_size == (1, 1) and head.conv1x1.out_channels == 1
    features = torch.randn(2, 32, 4, 4)
    fast, literal = head(features), head.forward_paper_order(features)
    assert fast.shape == literal.shape == (2, 1, 64, 64)
    torch.testing.assert_close(fast, literal, atol=1e-5, rtol=1e-5)


def test_encoder_rejects_wrong_input() -> None:
    enc = ViTHeatmap(image_size=64, depth=1, dim=32, heads=2)
    with pytest.raises(ValueError, match=r"\(B, 1, 64, 64\)"):
        enc(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError):
        enc(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple"):
        ViTHeatmap(image_size=60)


def test_coordinates_are_sigmoid_times_input_size() -> None:
    dec = ResNetCoords(n_max=2, image_size=64)
    with torch.no_grad():
        dec.fc.weight.zero_()
        dec.fc.bias.copy_(torch.tensor([0.0, 0.0, 20.0, -20.0]))  # sigmoid: 0.5, 0.5, ~1, ~0
    coords = dec(torch.rand(1, 1, 64, 64))["coords"]
    # pixel-centre convention: sigmoid * S - 0.5, covering (-0.5, S - 0.5)
    torch.testing.assert_close(coords[0, 0], torch.tensor([31.5, 31.5]))
    torch.testing.assert_close(coords[0, 1], torch.tensor([63.5, -0.5]), atol=1e-4, rtol=0)
    random_coords = ResNetCoords(n_max=5, image_size=64)(torch.rand(3, 1, 64, 64))["coords"]
    assert ((random_coords > -0.5) & (random_coords < 63.5)).all()


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_regress_coordinates_and_presence(name: str) -> None:
    torch.manual_seed(0)
    model = build_baseline(name, n_max=3, image_size=64, width=0.125, vit_depth=1, vit_dim=32, vit_heads=2)
    out = model.eval()(torch.rand(2, 1, 64, 64))
    assert set(out) == {"coords", "presence"}
    assert out["coords"].shape == (2, 3, 2) and out["presence"].shape == (2, 3)
    assert ((out["coords"] > -0.5) & (out["coords"] < 63.5)).all()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1


def test_unknown_baseline_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("alexnet", n_max=2)


def test_resnet_decoder_loads_local_torchvision_weights(tmp_path) -> None:
    torch.manual_seed(1)
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = tiny_paper(pretrained_resnet=path)
    backbone = model.decoder.backbone
    torch.testing.assert_close(backbone.conv1.weight, reference.conv1.weight.mean(1, keepdim=True))
    torch.testing.assert_close(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # the same file also serves the resnet18 baseline
    base = build_baseline("resnet18", n_max=2, image_size=64, pretrained=path)
    torch.testing.assert_close(base.backbone.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_vit_encoder_loads_local_weights_and_interpolates_positions(tmp_path) -> None:
    torch.manual_seed(2)
    # a tiny torchvision ViT trained at 32x32 (2x2 patches) with an RGB stem and a class head
    reference = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=128, num_classes=10)
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": reference.state_dict()}, path)  # wrapped dicts are accepted too
    model = tiny_paper(pretrained_vit=path)
    vit = model.encoder.vit
    torch.testing.assert_close(vit.conv_proj.weight, reference.conv_proj.weight.mean(1, keepdim=True))
    torch.testing.assert_close(vit.class_token, reference.class_token)
    assert vit.encoder.pos_embedding.shape == (1, 4 * 4 + 1, 32)  # 2x2 -> 4x4 patches
    torch.testing.assert_close(vit.encoder.pos_embedding[:, 0], reference.encoder.pos_embedding[:, 0])
    assert model(torch.rand(1, 1, 64, 64))["coords"].shape == (1, 3, 2)


def test_mismatched_or_missing_weights_fail_clearly_and_change_nothing(tmp_path) -> None:
    wrong = tmp_path / "resnet50.pth"
    torch.save(resnet50(weights=None).state_dict(), wrong)
    dec = ResNetCoords(n_max=2, image_size=64)
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    with pytest.raises(DataError, match=r"resnet50\.pth.*do not match") as info:
        dec.load_pretrained(wrong)
    assert "wrong shapes" in str(info.value) or "unexpected" in str(info.value)
    for k, v in dec.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(DataError, match="not found"):
        dec.load_pretrained(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read"):
        dec.load_pretrained(garbage)
    not_tensors = tmp_path / "list.pth"
    torch.save({"a": [1, 2]}, not_tensors)
    with pytest.raises(DataError, match="not a state dict"):
        dec.load_pretrained(not_tensors)
    vit_file = tmp_path / "vit_for_resnet.pth"
    torch.save(VisionTransformer(32, 16, 1, 2, 32, 64).state_dict(), vit_file)
    with pytest.raises(DataError, match="conv1.weight"):
        dec.load_pretrained(vit_file)


def test_vgg_baseline_loads_torchvision_layout(tmp_path) -> None:
    from localisation.models.baselines import VGGBackbone

    torch.manual_seed(3)
    state = VGGBackbone(width=0.125).state_dict()  # torchvision's VGG keys, minus classifier.6
    state["features.0.weight"] = state["features.0.weight"].repeat(1, 3, 1, 1)  # an RGB stem
    state["classifier.6.weight"] = torch.zeros(1000, 512)  # ImageNet head: dropped
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    model = build_baseline("vgg16", n_max=2, image_size=64, width=0.125, pretrained=path)
    torch.testing.assert_close(model.backbone.features[0].weight, state["features.0.weight"][:, :1])
    torch.testing.assert_close(model.backbone.classifier[3].weight, state["classifier.3.weight"])
