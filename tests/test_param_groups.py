"""The no-decay parameter sets of RMT-T/S/B/L equal the official rule's, checked on the official shapes."""

import json
from pathlib import Path

import pytest
import timm

import pipeline.models  # noqa: F401  (registers rmt_*)
from pipeline.train.param_groups import official_no_decay_names, official_param_groups

KEYS_FILE = Path(__file__).parent / "data" / "official_rmt_keys.json"
OFFICIAL_SHAPES = json.loads(KEYS_FILE.read_text())["models"]
# (no-decay tensors, decayed tensors) under the official rule; RMT-B/L decay their 66 layer scales
COUNTS = {"rmt_t": (207, 135), "rmt_s": (402, 270), "rmt_b": (610, 480), "rmt_l": (610, 480)}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_no_decay_set_is_official(name):
    model = timm.create_model(name)
    params = dict(model.named_parameters())
    skip = official_no_decay_names(model)
    assert (len(skip), len(params) - len(skip)) == COUNTS[name]
    # the rule applied to the official state_dict's shapes (buffers are not parameters)
    official = {n for n in params if len(OFFICIAL_SHAPES[name][n]) <= 1 or n.endswith(".bias")}
    assert skip == official
    gammas = {n for n in params if n.rsplit(".", 1)[-1] in ("gamma_1", "gamma_2")}
    assert len(gammas) == (66 if name in ("rmt_b", "rmt_l") else 0) and not gammas & skip
    no_decay, decay = official_param_groups(model, 0.05)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)
    assert {id(p) for p in no_decay["params"]} == {id(params[n]) for n in skip}
    assert len(no_decay["params"]) + len(decay["params"]) == len(params)


def test_frozen_parameters_are_left_out():
    model = timm.create_model("rmt_t")
    model.head.weight.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    assert "head.bias" not in official_no_decay_names(model)
    groups = official_param_groups(model, 0.05)
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_the_trainers_optimizer_uses_the_official_groups():
    """build.build_optimizer: the layer scales of RMT-B are decayed, biases and norms are not."""
    from pipeline.train.build import build_model, build_optimizer
    from pipeline.train.config import config_from_dict

    cfg = config_from_dict({"model": {"name": "rmt_b", "num_classes": 10, "kwargs": {
        "embed_dims": [16, 32, 64, 64], "depths": [1, 1, 1, 1], "num_heads": [2, 2, 4, 4]}}})
    model = build_model(cfg)
    groups = build_optimizer(cfg, model).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert undecayed == official_no_decay_names(model)
    assert any("gamma_1" in n for n in decayed) and not any("gamma" in n for n in undecayed)
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05} and {g["lr"] for g in groups} == {2e-3}
