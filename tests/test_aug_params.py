"""aug_params: drawn parameters applied with timm's PIL ops give today's TrainAugment output, bit for bit."""

import numpy as np
import pytest
from PIL import Image

from pipeline.data.errors import DataError
from pipeline.data.load.aug_params import SKIP, ParamSource
from pipeline.data.load.augment import RRC_LOG_RATIO, RRC_SCALE, TrainAugment, rrc_box, seeded_pil_rngs
from pipeline.data.load.config import DataConfig


def test_params_reproduce_the_cpu_path_bit_for_bit():
    cfg = DataConfig(img_size=32)
    params, today = ParamSource(cfg), TrainAugment(cfg)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    idx = np.arange(600)
    rep = idx % 3
    heights, widths = rng.integers(40, 900, 600), rng.integers(40, 900, 600)
    p = params.draw(1, idx, rep, heights, widths)
    us, keys = today.crop_boxes(1, idx, rep), today.pil_keys(1, idx, rep).tolist()
    with seeded_pil_rngs() as seed:
        for j in range(600):
            assert tuple(p.boxes[j]) == rrc_box(int(heights[j]), int(widths[j]), us[j], *RRC_SCALE,
                                                *RRC_LOG_RATIO)
            ref = today.pil_stage(imgs[j % 4], us[j, 22], keys[j], seed)
            ours = np.asarray(params.apply_pil(imgs[j % 4], p.flips[j], p.ops[j], p.args[j]))
            assert np.array_equal(ref, ours), j
    # every op of rand-m9-mstd0.5-inc1 was drawn, about half the layers were skipped (prob 0.5)
    assert set(np.unique(p.ops)) == {SKIP, *range(len(params.op_names))}
    assert 0.4 < (p.ops == SKIP).mean() < 0.6
    assert 0.4 < p.flips.mean() < 0.6


def test_color_jitter_is_refused_on_the_device_path_and_auto_picks_cpu_for_it():
    jitter = DataConfig(rand_augment="", color_jitter=0.4)
    with pytest.raises(DataError, match="data.decode='device': color jitter"):
        DataConfig(rand_augment="", color_jitter=0.4, decode="device").validate()
    assert jitter.decode_on("cuda:0") == "cpu" and DataConfig().decode_on("cuda:0") == "device"
    assert DataConfig().decode_on("cpu") == "cpu" and DataConfig(decode="device").decode_on("cpu") == "device"
    with pytest.raises(DataError, match="data.decode='gpu': must be one of auto, cpu, device"):
        DataConfig(decode="gpu").validate()
