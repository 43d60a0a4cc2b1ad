"""TokenLabelCrossEntropy against a reference written from the formulas, and with the model's MixToken."""

import math

import pytest
import timm
import torch

import pipeline.models  # noqa: F401
from pipeline.models.rmt import TokenLabelOutput, swap_box
from pipeline.train.token_label_loss import TokenLabelCrossEntropy, mix_token_lambda


def reference(logits, aux, box, t_cls, t_dense, dense_weight=0.5, cls_weight=1.0):
    """Loops over samples and tokens: cls CE against the lam-mixed target, mean dense CE over B x N."""
    b, n, c = aux.shape
    r0, c0, r1, c1 = box
    lam = 1 - (r1 - r0) * (c1 - c0) / n
    cls, dense = 0.0, 0.0
    for i in range(b):
        mixed = [lam * t_cls[i][k] + (1 - lam) * t_cls[b - 1 - i][k] for k in range(c)]
        log_z = math.log(sum(math.exp(v) for v in logits[i].tolist()))
        cls -= sum(mixed[k] * (logits[i][k].item() - log_z) for k in range(c)) / b
        for j in range(n):
            log_z = math.log(sum(math.exp(v) for v in aux[i, j].tolist()))
            dense -= sum(t_dense[i, j, k].item() * (aux[i, j, k].item() - log_z) for k in range(c)) / (b * n)
    return cls_weight * cls + dense_weight * dense


def _soft(g, *shape):
    return torch.softmax(torch.randn(*shape, generator=g) * 2, -1)


@pytest.mark.parametrize("box", [(0, 0, 0, 0), (1, 0, 3, 2), (0, 0, 4, 3)])
def test_loss_equals_the_formulas(box):
    g = torch.Generator().manual_seed(sum(box))
    b, h, w, c = 3, 4, 3, 6
    logits, aux = torch.randn(b, c, generator=g, dtype=torch.float64), torch.randn(b, h * w, c, generator=g,
                                                                                      dtype=torch.float64)
    t_cls, t_dense = _soft(g, b, c).double(), _soft(g, b, h * w, c).double()
    got = TokenLabelCrossEntropy()(TokenLabelOutput(logits, aux, box), t_cls, t_dense)
    assert got.item() == pytest.approx(reference(logits, aux, box, t_cls, t_dense), rel=1e-6)
    dense_only = TokenLabelCrossEntropy(dense_weight=2.0, cls_weight=0.0)
    w2 = dense_only(TokenLabelOutput(logits, aux, box), t_cls, t_dense)
    assert w2.item() == pytest.approx(reference(logits, aux, box, t_cls, t_dense, 2.0, 0.0), rel=1e-6)
    assert mix_token_lambda(box, h * w) == 1 - (box[2] - box[0]) * (box[3] - box[1]) / (h * w)


def test_with_the_model_mix_token_the_dense_term_sees_each_samples_own_tokens():
    """rmt_s_tl (5 classes, 128 px: a 4 x 4 token grid) in train mode: aux logits come back un-swapped,
    so the loss equals the reference on the box-swapped (mixed-image) view: swapped logits against
    swapped dense targets."""
    torch.manual_seed(2)
    model = timm.create_model("rmt_s_tl", num_classes=5).train()
    x = torch.randn(4, 3, 128, 128)
    out = model(x)
    b, n, c = out.aux_logits.shape
    assert (b, n, c) == (4, 16, 5) and 0 < mix_token_lambda(out.box, n) < 1, out.box  # a real box
    g = torch.Generator().manual_seed(0)
    t_cls, t_dense = _soft(g, b, c), _soft(g, b, n, c)
    got = TokenLabelCrossEntropy()(out, t_cls, t_dense)
    grid = lambda t: t.reshape(b, 4, 4, c)  # noqa: E731
    mixed_aux = swap_box(grid(out.aux_logits), out.box, 1).reshape(b, n, c)
    mixed_dense = swap_box(grid(t_dense), out.box, 1).reshape(b, n, c)
    ref = reference(out.logits.detach().double(), mixed_aux.detach().double(), out.box, t_cls.double(),
                    mixed_dense.double())
    assert got.item() == pytest.approx(ref, rel=1e-5)
    got.backward()
    assert model.aux_head.weight.grad is not None and torch.isfinite(model.aux_head.weight.grad).all()


def test_mismatched_targets_and_weights_are_refused():
    out = TokenLabelOutput(torch.zeros(2, 3), torch.zeros(2, 4, 3), (0, 0, 0, 0))
    with pytest.raises(ValueError, match=r"expected \(2, 3\) / \(2, 4, 3\)"):
        TokenLabelCrossEntropy()(out, torch.zeros(2, 3), torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="not both 0"):
        TokenLabelCrossEntropy(0.0, 0.0)


def _tl_config(root, loss="token_label", **model):
    from pipeline.train.config import config_from_dict

    return config_from_dict({"data": {"root": str(root), "mixup": 0.0, "cutmix": 0.0},
                             "train": {"loss": loss},
                             "model": {"name": "rmt_s_tl", "num_classes": 5, **model}})


def _manifest(root, with_maps: bool):
    import json

    train = {"label_maps": {"member": "tlm", "encoding": "TLM1"}} if with_maps else {}
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"format_version": 1, "splits": {"train": train}}))
    return root


def test_the_token_label_loss_builds_targets_from_the_batch_on_the_token_grid(tmp_path):
    """`train.loss=token_label`: batch[2] (the loader's LabelTargets) -> label_maps.targets on the model's
    final-stage grid (here 2 x 3 for a 64 x 96 input) -> TokenLabelCrossEntropy."""
    from pipeline.data import label_maps
    from pipeline.data.load.label_targets import LabelTargets
    from pipeline.train.losses import build_loss

    loss = build_loss(_tl_config(_manifest(tmp_path / "shards", True)))
    g = torch.Generator().manual_seed(1)
    b, c, k = 2, 5, 3
    scores = torch.randn(b, k, 6, 8, generator=g).half()
    indices = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b * 48)]).reshape(b, 6, 8, k)
    theta = torch.from_numpy(label_maps.sample_affine((0, 0, 60, 80), True, [("ShearX", 0.2)], (60, 80),
                                                      (64, 96), (6, 8))).expand(b, 2, 3, 3)
    targets = LabelTargets(scores, indices.permute(0, 3, 1, 2), theta)
    out = TokenLabelOutput(torch.randn(b, c, generator=g), torch.randn(b, 6, c, generator=g), (0, 1, 1, 3))
    got = loss(out, (torch.zeros(b, 3, 64, 96), torch.zeros(b, dtype=torch.long), targets))
    t_cls, t_dense = label_maps.targets(*targets, (2, 3), c, 0.1)
    assert got.item() == pytest.approx(TokenLabelCrossEntropy()(out, t_cls, t_dense).item(), rel=1e-6)
    # the wrong grid (3 x 2) gives other targets: the grid is read off the input and the aux logits
    wrong = TokenLabelCrossEntropy()(out, *label_maps.targets(*targets, (3, 2), c, 0.1))
    assert abs(wrong.item() - got.item()) > 1e-4


def test_token_label_needs_a_token_label_model_and_shards_with_maps(tmp_path):
    from pipeline.train.config import ConfigError, config_from_dict
    from pipeline.train.losses import build_loss

    with_maps, without = _manifest(tmp_path / "a", True), _manifest(tmp_path / "b", False)
    with pytest.raises(ConfigError, match="'train.loss': token_label needs a token-labeling model, but "
                                          "model.name='rmt_s' .* use rmt_s_tl"):
        build_loss(_tl_config(with_maps, name="rmt_s"))
    with pytest.raises(ConfigError, match=r"needs label maps in the shards, but data.root=.*b' has none: "
                                          r"rebuild them with make shards LABELS="):
        build_loss(_tl_config(without))
    with pytest.raises(ConfigError, match="has no manifest.json"):
        build_loss(_tl_config(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="'rmt_s_tl' is a token-labeling model and trains with "
                                          "train.loss=token_label, not 'cross_entropy'"):
        build_loss(_tl_config(with_maps, loss="cross_entropy"))
    with pytest.raises(ConfigError, match="'data.mixup' / 'data.cutmix' are 0.8 / 0.0, but .* set both to 0"):
        build_loss(config_from_dict({"data": {"root": str(with_maps), "cutmix": 0.0},
                                     "train": {"loss": "token_label"}, "model": {"name": "rmt_s_tl"}}))
    # a tiny token-labeling RMT-T through model.kwargs counts as one
    assert build_loss(_tl_config(with_maps, name="rmt_t", kwargs={"token_label": True})) is not None
