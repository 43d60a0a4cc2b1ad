"""Token-labeling RMT (rmt_{s,b,l}_tl): official keys and counts, eval output, MixToken, timm conventions."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import pipeline.models  # noqa: F401
from pipeline.models.rmt import TokenLabelOutput, default_drop_path, mix_token_box, swap_box

OFFICIAL = json.loads((Path(__file__).parent / "data" / "official_rmt_tl_keys.json").read_text())["models"]
# S*: the released code gives 27,480,240; the official S* log says 27,992,240 (aux_head as if 1024 inputs)
PARAMS = {"rmt_s_tl": 27_480_240, "rmt_b_tl": 54_667_896, "rmt_l_tl": 96_105_864}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count_and_official_keys(name):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == OFFICIAL[name]
    assert model.pretrained_cfg["crop_pct"] == 0.96


def test_eval_output_is_class_plus_half_max_aux():
    torch.manual_seed(0)
    model = timm.create_model("rmt_s_tl", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        tokens = feats.flatten(2).transpose(1, 2)  # (B, 6, 512)
        proj = model.proj(tokens).transpose(1, 2).unsqueeze(-1)  # (B, 1024, 6, 1)
        plain = model.head(torch.nn.functional.silu(model.norm(proj)).mean(dim=(2, 3)))
        expected = plain + 0.5 * (tokens @ model.aux_head.weight.T + model.aux_head.bias).max(dim=1).values
        assert torch.allclose(model(x), expected, atol=1e-5)


def official_box(grid_h, grid_w, rng):
    """The official rand_bbox (RMT.py) from its formulas, with numpy as there."""
    cut = np.sqrt(1.0 - rng.beta(1.0, 1.0))
    ch, cw = int(grid_h * cut), int(grid_w * cut)
    cy, cx = rng.integers(grid_h), rng.integers(grid_w)
    return (np.clip(cy - ch // 2, 0, grid_h), np.clip(cx - cw // 2, 0, grid_w),
            np.clip(cy + ch // 2, 0, grid_h), np.clip(cx + cw // 2, 0, grid_w))


def test_mix_token_box_distribution_matches_official():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 20000
    sides = lambda b: (int(b[2] - b[0]), int(b[3] - b[1]))  # noqa: E731
    ours = [sides(mix_token_box(7, 5)) for _ in range(n)]
    ref = [sides(official_box(7, 5, rng)) for _ in range(n)]
    keys = set(ours) | set(ref)
    tv = 0.5 * sum(abs(ours.count(k) - ref.count(k)) for k in keys) / n
    assert tv < 0.03, tv
    torch.manual_seed(5)
    first = mix_token_box(7, 7)
    torch.manual_seed(5)
    assert mix_token_box(7, 7) == first  # per-step determinism from torch's RNG


def test_mix_token_swaps_tokens_and_unswaps_aux():
    x = torch.arange(4 * 16 * 8 * 2, dtype=torch.float).view(4, 16, 8, 2)
    box = (1, 0, 2, 1)
    mixed = swap_box(x, box, 8)
    assert torch.equal(mixed[0, 8:16, 0:8], x[3, 8:16, 0:8])
    assert torch.equal(mixed[0, 0:8], x[0, 0:8]) and torch.equal(mixed[1, :, 0:8][8:], x[2, 8:16, 0:8])
    assert torch.equal(swap_box(mixed, box, 8), x)


def test_training_output_and_lam():
    torch.manual_seed(0)
    model = timm.create_model("rmt_b_tl", num_classes=7, drop_path_rate=0.0).train()
    out = model(torch.randn(4, 3, 64, 64))
    assert isinstance(out, TokenLabelOutput)
    assert out.logits.shape == (4, 7) and out.aux_logits.shape == (4, 4, 7)
    r0, c0, r1, c1 = out.box
    assert 0 <= r0 <= r1 <= 2 and 0 <= c0 <= c1 <= 2
    no_mix = timm.create_model("rmt_b_tl", num_classes=7, mix_token=False).train()
    assert no_mix(torch.randn(2, 3, 64, 64)).box == (0, 0, 0, 0)


def test_token_label_timm_conventions():
    model = timm.create_model("rmt_s_tl", num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 1024)
    model.reset_classifier(3)
    assert model.aux_head.out_features == 3 and model(x).shape == (1, 3)
    model.reset_classifier(0)
    assert model.aux_head is None and model(x).shape == (1, 1024)
    backbone = timm.create_model("rmt_s_tl", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert [o.shape[1] for o in backbone(x)] == [64, 128, 256, 512]
    assert not hasattr(backbone, "aux_head") or backbone.aux_head is None


def test_unpooled_head_gives_per_position_logits():
    model = timm.create_model("rmt_t", num_classes=6, global_pool="").eval()
    feats = model.forward_features(torch.randn(2, 3, 64, 96))
    assert model.forward_head(feats).shape == (2, 6, 2, 3)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 1024, 2, 3)


def test_default_drop_path_per_variant():
    assert [default_drop_path(n) for n in ("rmt_t", "rmt_s", "rmt_b", "rmt_l")] == [0.1, 0.15, 0.4, 0.5]
    assert default_drop_path("rmt_l_tl") == 0.5
    assert timm.create_model("rmt_b").layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.4)
    with pytest.raises(ValueError, match="unknown RMT model"):
        default_drop_path("rmt_x")
