"""label_maps: TokenLabeling's .pt maps validated and encoded; a map lands where its image's pixels land."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align

from pipeline.data import label_maps
from pipeline.data.errors import DataError
from pipeline.data.load.aug_params import ParamSource
from pipeline.data.load.augment import resize
from pipeline.data.load.config import DataConfig

KEY = "n01440764_10026"


def _save(root, key, m):
    path = label_maps.map_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(m, path)


def test_read_encode_decode_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    m = torch.stack([torch.randn(5, 18, 18, generator=g),
                     torch.randint(0, 1000, (5, 18, 18), generator=g)]).half()
    _save(tmp_path, KEY, m)
    scores, idx = label_maps.read_pt(tmp_path, KEY, 1000)
    data = label_maps.encode(scores, idx)
    assert len(data) == 10 + 4 * 5 * 18 * 18
    s2, i2 = label_maps.decode(data, KEY)
    assert torch.equal(torch.from_numpy(s2.copy()), m[0]) and np.array_equal(i2, m[1].long().numpy())


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(5, 4, 4), r"label map of n01440764_10026 \(.*\) is \(5, 4, 4\), not a tensor \[2, k, H"),
    (torch.stack([torch.full((5, 2, 2), float("nan")), torch.zeros(5, 2, 2)]), "non-finite scores"),
    (torch.stack([torch.zeros(5, 2, 2), torch.full((5, 2, 2), 1000.0)]), r"class indices outside 0\.\.999"),
    ({"not": "a tensor"}, r"is dict, not a tensor"),
])
def test_malformed_maps_are_one_line_errors_naming_the_image(tmp_path, bad, match):
    _save(tmp_path, KEY, bad)
    with pytest.raises(DataError, match=match):
        label_maps.read_pt(tmp_path, KEY, 1000)


def test_missing_and_damaged_maps_name_the_image(tmp_path):
    with pytest.raises(DataError, match=f"no label map for {KEY}: .*{KEY}.pt is missing"):
        label_maps.read_pt(tmp_path, KEY, 1000)
    path = label_maps.map_path(tmp_path, KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match=f"label map of {KEY} .* cannot be read"):
        label_maps.read_pt(tmp_path, KEY, 1000)
    with pytest.raises(DataError, match=f"label map of {KEY} in the shards has 17 bytes, expected 14"):
        label_maps.decode(label_maps.encode(np.zeros((1, 1, 1), np.float16), np.zeros((1, 1, 1), np.uint16))
                          + b"xyz", KEY)


def test_a_plain_crop_is_torchvision_roi_align_as_tokenlabeling_calls_it():
    """TokenLabeling: roi_align(maps, coords * W - 0.5, output 7x7) with coords the crop's fractions."""
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 4, 18, 18, generator=g)
    boxes = [(10, 20, 150, 200), (0, 0, 240, 320), (100, 37, 60, 41)]  # (top, left, h, w) on 240x320
    theta = torch.tensor(np.stack([label_maps.sample_affine(b, False, [], (240, 320), (224, 224), (18, 18))
                                   for b in boxes]))
    ours = label_maps.sample_grid(maps, theta, (7, 7), samples=3)
    rois = torch.tensor([[i, l / 320 * 18 - 0.5, t / 240 * 18 - 0.5, (l + w) / 320 * 18 - 0.5,
                          (t + h) / 240 * 18 - 0.5] for i, (t, l, h, w) in enumerate(boxes)])
    ref = roi_align(maps, rois, (7, 7), spatial_scale=1.0, sampling_ratio=3, aligned=False)
    assert torch.allclose(ours, ref, atol=1e-5)


def _position_image(h, w):
    """R, G: x and y of each pixel centre as a fraction of the width / height; B = 255 (inside)."""
    x = (np.arange(w) + 0.5) / w
    y = (np.arange(h) + 0.5) / h
    rgb = np.stack([np.broadcast_to(x * 255, (h, w)), np.broadcast_to(y[:, None] * 255, (h, w)),
                    np.full((h, w), 255.0)], -1)
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def _position_map(h, w):
    """A map whose classes 0, 1, 2 score x, y (fractions, at cell centres) and 1 (inside) everywhere."""
    x = (torch.arange(w) + 0.5) / w
    y = (torch.arange(h) + 0.5) / h
    scores = torch.stack([x.expand(h, w), y[:, None].expand(h, w), torch.ones(h, w)])
    return scores[None], torch.arange(3).view(1, 3, 1, 1).expand(1, 3, h, w)


OUT, GRID = 64, 8
CASES = {"crop": [], "flip": [], "Rotate": [("Rotate", 25.0)], "ShearX": [("ShearX", -0.25)],
         "ShearY": [("ShearY", 0.2)], "TranslateXRel": [("TranslateXRel", 0.3)],
         "TranslateYRel": [("TranslateYRel", -0.2)],
         "all": [("ShearX", 0.15), ("Rotate", -12.0), ("PosterizeIncreasing", 8.0), ("TranslateYRel", 0.1)]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_map_lands_where_its_pixels_land(case):
    """The image goes through the loader's own ops (crop+resize, flip, timm's RandAugment ops); the
    map through `sample_affine`; per grid cell fully inside the image, mean x and y agree."""
    src_h, src_w, box, flip = 300, 400, (40, 60, 200, 260), case in ("flip", "all")
    pil_box = (box[1], box[0], box[1] + box[3], box[0] + box[2])
    img = Image.fromarray(resize(_position_image(src_h, src_w), pil_box, (OUT, OUT), "bilinear"))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    ra = ParamSource(DataConfig(img_size=OUT)).rand_augment
    by_name = {op.name: op for op in ra.ops}
    for name, arg in CASES[case]:
        op = by_name[name]
        img = op.aug_fn(img, int(arg) if name.startswith("Posterize") else arg, **op.kwargs)
    pix = np.asarray(img, np.float64) / 255
    cells = pix.reshape(GRID, OUT // GRID, GRID, OUT // GRID, 3).transpose(0, 2, 1, 3, 4)
    cells = cells.reshape(GRID, GRID, -1, 3)
    img_inside = (cells[..., 2] > 0.99).all(-1)  # RandAugment fills with the mean colour (B = 104)
    img_xy = cells[..., :2].mean(2)

    scores, idx = _position_map(15, 20)
    theta = label_maps.sample_affine(box, flip, CASES[case], (src_h, src_w), (OUT, OUT), (15, 20))
    theta = torch.tensor(theta)
    got = label_maps.sample_grid(label_maps.dense_scores(scores, idx, 3), theta[None], (GRID, GRID), 4)[0]
    map_inside = got[2] > 0.999
    both = img_inside & map_inside.numpy()
    assert both.sum() >= GRID * GRID // 3, both.sum()
    assert (img_inside == map_inside.numpy()).mean() > 0.9  # the fill regions agree too
    err = np.abs(got[:2].permute(1, 2, 0).numpy() - img_xy)[both].max()
    assert err < 0.01, err  # of the image side: < 4 source pixels of 400, 3 of 300


def test_colour_ops_leave_the_map_alone():
    assert label_maps.op_matrix("SolarizeIncreasing", 100, 64, 64) is None
    assert np.allclose(label_maps.sample_affine((0, 0, 64, 64), False, [("ContrastIncreasing", 0.5)],
                                                (64, 64), (64, 64), (64, 64)),
                       [np.eye(3), np.diag([64, 64, 1.0])])


def test_targets_softmax_and_smoothing_as_tokenlabeling():
    """Cell = softmax over all C of the sampled top-k scores (0 for the other classes) * on + off."""
    scores = torch.tensor([[[[2.0]], [[1.0]]]])  # one position, top-2: class 3 -> 2.0, class 7 -> 1.0
    idx = torch.tensor([[[[3]], [[7]]]])
    theta = torch.tensor(label_maps.sample_affine((0, 0, 10, 10), False, [], (10, 10), (10, 10), (1, 1)))
    theta = theta[None]
    cls, dense = label_maps.targets(scores, idx, theta, (2, 2), num_classes=10, smoothing=0.1)
    logits = torch.zeros(10)
    logits[3], logits[7] = 2.0, 1.0
    expected = torch.softmax(logits, 0) * (0.9 + 0.01) + 0.01
    assert dense.shape == (1, 4, 10) and cls.shape == (1, 10)
    assert torch.allclose(dense[0], expected.expand(4, 10), atol=1e-6) and torch.allclose(cls[0], expected)
