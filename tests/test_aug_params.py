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


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_random_interpolation_is_drawn_per_sample_from_its_key(tiny_shards, decode):
    """data.interpolation=random: each entry's mode comes from its crop key (the same on every call, so
    resume stays exact), and its image is the bilinear or the bicubic run's image of that entry, which
    differ for every entry (the crop resize and RandAugment's geometric ops follow data.interpolation)."""
    import torch

    from pipeline.data.load.loader import TrainLoader

    def epoch(mode):
        cfg = DataConfig(root=str(tiny_shards), batch_size=16, workers=0, img_size=32, mixup=0.0, cutmix=0.0,
                         interpolation=mode, decode=decode).validate()
        loader = TrainLoader(cfg, 0, 1, torch.device("cpu"))
        return [(x, loader.last_samples) for x, _ in loader]

    params = ParamSource(DataConfig(interpolation="random"))
    idx = np.arange(64)
    def modes(source):
        return source.draw(0, idx, idx * 0, [100] * 64, [120] * 64).modes

    assert modes(params) == modes(params) and set(modes(params)) == {"bilinear", "bicubic"}
    assert modes(ParamSource(DataConfig())) == ()
    runs = {mode: epoch(mode) for mode in ("random", "bilinear", "bicubic")}
    seen = set()
    for (x, (i, r)), (xl, _), (xc, _) in zip(*runs.values(), strict=True):
        drawn = params.draw(0, i, r, [1] * len(i), [1] * len(i)).modes  # the mode does not use the size
        for j, mode in enumerate(drawn):
            assert torch.equal(x[j], (xl if mode == "bilinear" else xc)[j]), (j, mode)
            assert not torch.equal(xl[j], xc[j]), j
            seen.add(mode)
    assert seen == {"bilinear", "bicubic"}
