"""RMT model: official compatibility, MaSA fast path vs the formula, timm conventions, bad input."""

import copy
import json
from pathlib import Path

import pytest
import timm
import torch

import pipeline.models
from pipeline.models.rmt import ManhattanSelfAttention, RetentionPositions
from tests.reference_rmt import reference_attend, use_reference

OFFICIAL_KEYS = json.loads((Path(__file__).parent / "data" / "official_rmt_keys.json").read_text())["models"]
PARAMS = {"rmt_t": 14_334_216, "rmt_s": 26_967_240, "rmt_b": 54_154_896, "rmt_l": 95_464_864}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Give BatchNorm statistics and layer scales non-trivial values so comparisons mean something."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count_and_official_keys(name):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    official = {k: v for k, v in OFFICIAL_KEYS[name].items() if not k.endswith("num_batches_tracked")}
    assert ours == official


def test_official_state_dict_loads_strict():
    shapes = OFFICIAL_KEYS["rmt_t"]
    official = {k: torch.zeros(s, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float)
                for k, s in shapes.items()}
    timm.create_model("rmt_t").load_state_dict(official, strict=True)


@pytest.mark.parametrize("decomposed", [False, True])
@pytest.mark.parametrize("size", [(7, 7), (8, 12), (14, 5)])
def test_masa_matches_formula_forward_and_backward(decomposed, size):
    torch.manual_seed(0)
    dim, heads = 32, 4
    attn = ManhattanSelfAttention(dim, heads, decomposed)
    positions = RetentionPositions(dim, heads, initial_value=2, heads_range=4)
    x = torch.randn(2, *size, dim, requires_grad=True)
    ref_attn = copy.deepcopy(attn)
    ref_attn.attend = lambda q, k, v, p: reference_attend(ref_attn, q, k, v, p)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = attn(x, positions), ref_attn(x_ref, positions)
    assert rel_err(out, ref) < 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert rel_err(x.grad, x_ref.grad) < 1e-5
    for (name, p), p_ref in zip(attn.named_parameters(), ref_attn.parameters(), strict=True):
        assert rel_err(p.grad, p_ref.grad) < 1e-5, name


@pytest.mark.parametrize("name,size", [("rmt_t", (64, 64)), ("rmt_t", (96, 160)), ("rmt_b", (64, 96))])
def test_model_logits_match_reference(name, size):
    torch.manual_seed(0)
    model = randomised(timm.create_model(name, num_classes=10)).eval()
    reference = use_reference(copy.deepcopy(model))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_backends_agree(backend):
    torch.manual_seed(0)
    model = timm.create_model("rmt_t", num_classes=4).eval()
    other = timm.create_model("rmt_t", num_classes=4, attn_backend=backend).eval()
    other.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert rel_err(other(x), model(x)) < 1e-5
    with pytest.raises(ValueError, match="attn_backend"):
        timm.create_model("rmt_t", attn_backend="fast")


def test_masks_are_cached_and_rebuilt_per_size():
    positions = RetentionPositions(32, 4, 2, 4)
    first = positions(7, 7, torch.float32, False)
    assert positions(7, 7, torch.float32, False) is first
    assert positions(7, 9, torch.float32, False) is not first
    positions.double()
    assert positions._cache == {}


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = timm.create_model("rmt_t", num_classes=10, drop_path_rate=0.0)
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in ckpt.layers)
    x = torch.randn(2, 3, 64, 64)
    model(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    ckpt.set_grad_checkpointing([True, False, False, True])
    assert [s.grad_checkpointing for s in ckpt.layers] == [True, False, False, True]


def test_timm_conventions():
    model = timm.create_model("rmt_t", num_classes=7, drop_path_rate=0.2, in_chans=1).eval()
    assert model.pretrained_cfg["crop_pct"] == 0.875
    assert model.pretrained_cfg["interpolation"] == "bicubic"
    x = torch.randn(2, 1, 64, 96)
    feats = model.forward_features(x)
    assert feats.shape == (2, 512, 2, 3)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 1024)
    assert model(x).shape == (2, 7)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 1024)
    assert model.no_weight_decay() == set()
    assert set(timm.create_model("rmt_b").no_weight_decay()) == {
        n for n, _ in timm.create_model("rmt_b").named_parameters() if "gamma" in n}
    assert set(model.group_matcher()) == {"stem", "blocks"}


def test_features_only_shapes_and_strides():
    backbone = timm.create_model("rmt_s", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert backbone.feature_info.channels() == [64, 128, 256, 512]
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 128, 96))
    shapes = [tuple(o.shape) for o in outs]
    assert shapes == [(1, 64, 32, 24), (1, 128, 16, 12), (1, 256, 8, 6), (1, 512, 4, 3)]
    two = timm.create_model("rmt_t", features_only=True, out_indices=(1, 2))
    assert len(two.model.layers) == 3
    assert [o.shape[1] for o in two(torch.randn(1, 3, 64, 64))] == [128, 256]


def test_bad_input_errors():
    model = timm.create_model("rmt_t", num_classes=4).eval()
    with pytest.raises(pipeline.models.InputShapeError, match="divisible by 32.*100x100"):
        model(torch.randn(1, 3, 100, 100))
    with pytest.raises(pipeline.models.InputShapeError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 4, 64, 64))


def test_compiles_without_graph_breaks():
    model = timm.create_model("rmt_t", num_classes=4).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


@pytest.mark.parametrize("layout", ["model", "model_ema", "plain", "module_prefix"])
def test_load_rmt_checkpoint_layouts(tmp_path, layout):
    model = timm.create_model("rmt_t", num_classes=5)
    sd = model.state_dict()
    obj = {
        "model": {"model": sd, "epoch": 3},
        "model_ema": {"model": {}, "model_ema": sd},
        "plain": sd,
        "module_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    loaded = pipeline.models.load_rmt_checkpoint(path, use_ema=layout == "model_ema")
    timm.create_model("rmt_t", num_classes=5).load_state_dict(loaded, strict=True)


def test_load_rmt_checkpoint_errors(tmp_path):
    with pytest.raises(pipeline.models.CheckpointError, match="does not exist"):
        pipeline.models.load_rmt_checkpoint(tmp_path / "missing.pth")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(pipeline.models.CheckpointError, match="drop --ema"):
        pipeline.models.load_rmt_checkpoint(weights, use_ema=True)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(pipeline.models.CheckpointError, match="cannot read"):
        pipeline.models.load_rmt_checkpoint(bad)


def test_model_info_command(capsys):
    from pipeline.cli import main

    assert main(["model-info", "rmt_t", "--size", "64", "96"]) == 0
    out = capsys.readouterr().out
    assert "14,334,216" in out and "3x64x96" in out
