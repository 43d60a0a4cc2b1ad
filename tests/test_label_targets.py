"""label_targets: with the parameters ParamSource draws, a map lands where the CPU path puts its pixels."""

import io

import numpy as np
import pytest
import torch

from pipeline.data import label_maps
from pipeline.data.errors import DataError
from pipeline.data.load.aug_params import SKIP, ParamSource
from pipeline.data.load.augment import TrainAugment
from pipeline.data.load.config import DataConfig
from pipeline.data.load.label_targets import batch_targets
from tests.test_label_maps import _position_image, _position_map

OUT, GRID = 64, 8


def test_drawn_crop_flip_and_geometric_ops_move_map_and_pixels_alike():
    cfg = DataConfig(img_size=OUT, interpolation="bilinear")
    params, cpu = ParamSource(cfg), TrainAugment(cfg)
    h, w = 300, 400
    buf = io.BytesIO()
    _position_image(h, w).save(buf, "PNG")
    data = buf.getvalue()
    scores, idx = _position_map(15, 20)
    member = label_maps.encode(scores[0].half().numpy(), idx[0].numpy().astype(np.uint16))
    n = 80
    indices, repeats = np.arange(n), np.zeros(n, np.int64)
    p = params.draw(2, indices, repeats, [h] * n, [w] * n)
    us = cpu.crop_boxes(2, indices, repeats)
    t = batch_targets(p, params.op_names, [(h, w)] * n, [member] * n, "k{}".format, (OUT, OUT))
    got = label_maps.sample_grid(label_maps.dense_scores(t.scores, t.indices, 3), t.theta, (GRID, GRID), 4)
    geometric = set(label_maps.GEOMETRIC_OPS)
    checked, with_ops = 0, 0
    for j in range(n):
        names = [params.op_names[i] for i in p.ops[j] if i != SKIP]
        if not set(names) <= geometric:
            continue  # colour ops change the pixels that encode position
        img = params.apply_pil(cpu.decode_crop(data, us[j]), p.flips[j], p.ops[j], p.args[j])
        pix = np.asarray(img, np.float64).reshape(GRID, OUT // GRID, GRID, OUT // GRID, 3) / 255
        cells = pix.transpose(0, 2, 1, 3, 4).reshape(GRID, GRID, -1, 3)
        both = (cells[..., 2] > 0.99).all(-1) & (got[j, 2] > 0.999).numpy()
        err = np.abs(got[j, :2].permute(1, 2, 0).numpy() - cells[..., :2].mean(2))[both]
        assert both.sum() >= 8 and err.max() < 0.012, (j, names, err.max())
        checked += 1
        with_ops += bool(names)
    assert checked >= 20 and with_ops >= 6, (checked, with_ops)
    assert t.scores.dtype == torch.float16 and t.theta.shape == (n, 2, 3, 3)


def test_a_damaged_map_or_a_batch_of_two_map_sizes_names_the_samples():
    cfg = DataConfig(img_size=OUT)
    params = ParamSource(cfg)
    p = params.draw(0, np.arange(3), np.zeros(3, np.int64), [40] * 3, [50] * 3)
    small, large = (label_maps.encode(np.zeros((5, s, s), np.float16), np.zeros((5, s, s), np.uint16))
                    for s in (2, 3))
    names = "sample {}".format
    with pytest.raises(DataError, match=r"label map of sample 1 in the shards is not a map"):
        batch_targets(p, params.op_names, [(40, 50)] * 3, [small, b"junk", small], names, (OUT, OUT))
    with pytest.raises(DataError, match=r"shapes \(5, 2, 2\) \(sample 0\) and \(5, 3, 3\) \(sample 2\)"):
        batch_targets(p, params.op_names, [(40, 50)] * 3, [small, small, large], names, (OUT, OUT))
