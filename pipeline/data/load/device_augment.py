"""Batched decode + train/val transform on the device from drawn parameters (`aug_params.TrainParams`).

Ops (uint8 between ops, as PIL):
- decode: `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA, libjpeg on CPU) for RGB JPEGs;
  PNG, CMYK, grayscale and other bytes are decoded on the CPU with PIL (`decode_cpu`), as the CPU path.
- crop + antialiased bicubic resize per sample (torch's kernel, which implements PIL's filter; uint8
  on the CPU as `augment.resize`, float then rounded on CUDA).
- RandAugment: lookup-table ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd)
  build PIL's tables per sample and channel, so they are bit-exact; blend ops (Color, Contrast,
  Brightness, Sharpness) use PIL's degenerate images and float32 blend with truncation; affine ops
  (Rotate, ShearX/Y, TranslateX/YRel) are one batched `grid_sample` per interpolation mode over PIL's
  inverse matrices (pixel centres, fill outside, border neighbours, truncated to uint8 as PIL), in each
  sample's own mode (`TrainParams.modes`, else data.interpolation) as the CPU path's timm ops; bilinear
  is PIL's filter, bicubic uses a=-0.75 where PIL's transform uses a=-1.
Chosen over kornia: kornia's functional ops take per-sample tensors too, but its equalize,
autocontrast and posterize are float reimplementations that do not match PIL's tables.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_LUT_OPS = frozenset({"AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing",
                      "Solarize", "SolarizeIncreasing", "SolarizeAdd"})
_BLEND_OPS = frozenset({"Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness",
                        "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing"})
_AFFINE_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})


def on_device(img: Image.Image) -> bool:
    """Whether an opened (header-parsed) image is decoded on the device: RGB JPEG only."""
    return img.format == "JPEG" and img.mode == "RGB"


def decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB tensors of RGB JPEGs, one batched call (nvJPEG on CUDA, libjpeg on CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def decode_cpu(data, device: torch.device) -> torch.Tensor:
    """(3, H, W) uint8 RGB on `device` of a non-JPEG / CMYK / grayscale image (PIL, as the CPU path),
    or of an HWC uint8 array (an FFCV raw image)."""
    if not isinstance(data, np.ndarray):
        img = Image.open(io.BytesIO(data))
        data = img.convert("RGB") if img.mode != "RGB" else img
    return torch.from_numpy(np.array(data, np.uint8)).permute(2, 0, 1).to(device)


def decode_batch(datas: list, device: torch.device, jpeg_mask=None) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB tensors on `device`; RGB JPEGs (`jpeg_mask`, else from the headers) batched
    on the device, the rest by PIL on the CPU."""
    if jpeg_mask is None:
        jpeg_mask = [on_device(Image.open(io.BytesIO(d))) for d in datas]
    jpeg = [j for j, m in enumerate(jpeg_mask) if m]
    out = dict(zip(jpeg, decode_jpegs([datas[j] for j in jpeg], device), strict=True))
    return [out[j] if j in out else decode_cpu(d, device) for j, d in enumerate(datas)]


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, *size) uint8, antialiased."""
    x = x.unsqueeze(0)
    if x.device.type == "cpu":
        return F.interpolate(x, size=size, mode=mode, antialias=True)[0]
    y = F.interpolate(x.float(), size=size, mode=mode, antialias=True)[0]
    return y.round_().clamp_(0, 255).to(torch.uint8)


def per_sample(mode, n: int) -> list[str]:
    """`mode` ("bilinear" | "bicubic", or a sequence of them) as one mode per sample of n."""
    return [mode] * n if isinstance(mode, str) else list(mode)


def crop_resize(images: list[torch.Tensor], boxes: np.ndarray, size: int, mode="bicubic"):
    """(B, 3, size, size) uint8 of each image's (top, left, h, w) box; `mode`: one, or one per image."""
    return torch.stack([_resize(x[:, t:t + h, l:l + w], (size, size), m) for x, (t, l, h, w), m
                        in zip(images, boxes.tolist(), per_sample(mode, len(images)), strict=True)])


def val_resize_crop(images: list[torch.Tensor], size: int, crop_pct: float, mode: str = "bicubic"):
    """timm's eval transform: shorter side to floor(size / crop_pct), center crop `size`."""
    scale = math.floor(size / crop_pct)
    out = []
    for x in images:
        h, w = x.shape[1:]
        nh, nw = (int(scale * h / w), scale) if w <= h else (scale, int(scale * w / h))
        y = _resize(x, (nh, nw), mode)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        out.append(y[:, top:top + size, left:left + size])
    return torch.stack(out)


def _lut(name: str, x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """(n, 3, 256) int64 PIL lookup tables for images x (n, 3, H, W) uint8 and arguments (n,)."""
    n = x.shape[0]
    i = torch.arange(256, device=x.device).expand(n, 3, 256)
    a = arg.view(n, 1, 1)
    if name == "Invert":
        return 255 - i
    if name.startswith("Posterize"):
        return i & ~((2 ** (8 - a.long())) - 1)
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return torch.where(i < a, i, 255 - i)
    if name == "SolarizeAdd":
        return torch.where(i < 128, (i + a.long()).clamp(max=255), i)
    hist = torch.zeros(n * 3, 256, dtype=torch.int64, device=x.device)
    flat = x.reshape(n * 3, -1).long()
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    hist = hist.view(n, 3, 256)
    nz = hist > 0
    lo = torch.where(nz, i, 256).amin(-1, keepdim=True)
    hi = torch.where(nz, i, -1).amax(-1, keepdim=True)
    if name == "AutoContrast":
        scale = 255.0 / (hi - lo).clamp(min=1).double()
        lut = (i.double() * scale - lo.double() * scale).trunc().clamp(0, 255).long()
        return torch.where(hi > lo, lut, i)
    # Equalize: step = (total - count of the last non-empty bin) // 255; lut = (step//2 + cum) // step
    last = hist.gather(-1, hi.clamp(min=0))
    step = (hist.sum(-1, keepdim=True) - last) // 255
    cum = torch.cumsum(hist, -1) - hist
    lut = ((step // 2 + cum) // step.clamp(min=1)).clamp(max=255)
    return torch.where(step > 0, lut, i)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L (ITU-R 601-2, 16-bit fixed point), (n, 1, H, W) int64."""
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _blend(name: str, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance `name` with per-sample `factor` (n,) on x (n, 3, H, W) uint8."""
    img = x.float()
    if name.startswith("Brightness"):
        deg = torch.zeros_like(img)
    elif name.startswith("Color"):
        deg = _gray(x).float().expand_as(img)
    elif name.startswith("Contrast"):
        mean = (_gray(x).double().mean((1, 2, 3)) + 0.5).floor().float()
        deg = mean.view(-1, 1, 1, 1).expand_as(img)
    else:  # Sharpness: PIL's SMOOTH 3x3 filter, borders copied
        k = torch.ones(3, 1, 3, 3, device=x.device)
        k[:, :, 1, 1] = 5
        smooth = (F.conv2d(img, k / 13, groups=3) + 0.5).floor().clamp(0, 255)
        deg = img.clone()
        deg[:, :, 1:-1, 1:-1] = smooth
    f = factor.float().view(-1, 1, 1, 1)
    return (deg + f * (img - deg)).clamp(0, 255).trunc().to(torch.uint8)


def _affine_matrices(names: list[str], args: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, 2, 3) PIL inverse affine matrices (output pixel centre -> input position), float64."""
    n = len(names)
    m = torch.zeros(n, 2, 3, dtype=torch.float64)
    m[:, 0, 0] = m[:, 1, 1] = 1
    for j, (name, a) in enumerate(zip(names, args.tolist(), strict=True)):
        if name == "ShearX":
            m[j, 0, 1] = a
        elif name == "ShearY":
            m[j, 1, 0] = a
        elif name == "TranslateXRel":
            m[j, 0, 2] = a * w
        elif name == "TranslateYRel":
            m[j, 1, 2] = a * h
        else:  # Rotate: Image.rotate's matrix about the centre
            t = -math.radians(a % 360.0)
            c, s = round(math.cos(t), 15), round(math.sin(t), 15)
            cx, cy = w / 2.0, h / 2.0
            m[j] = torch.tensor([[c, s, c * -cx + s * -cy + cx], [-s, c, -s * -cx + c * -cy + cy]])
    return m


def _affine(names: list[str], x: torch.Tensor, args: torch.Tensor, fill: torch.Tensor, mode: str):
    """Affine ops `names` with arguments `args` (n,) on x (n, 3, H, W) uint8, one `grid_sample` in `mode`."""
    n, _, h, w = x.shape
    m = _affine_matrices(names, args, h, w).to(x.device)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float64) + 0.5,
                            torch.arange(w, device=x.device, dtype=torch.float64) + 0.5, indexing="ij")
    base = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    src = (base @ m.transpose(1, 2)).view(n, h, w, 2)
    outside = (src[..., 0] < 0) | (src[..., 0] >= w) | (src[..., 1] < 0) | (src[..., 1] >= h)
    grid = torch.stack([src[..., 0] * 2 / w - 1, src[..., 1] * 2 / h - 1], -1).float()
    y = F.grid_sample(x.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    y = torch.where(outside.unsqueeze(1), fill.view(1, 3, 1, 1).float(), y)
    return y.clamp_(0, 255).trunc_().to(torch.uint8)  # PIL's filters truncate too


def rand_augment(x: torch.Tensor, ops: np.ndarray, args: np.ndarray, op_names, fill, modes) -> torch.Tensor:
    """Apply each sample's RandAugment layers (ops, args from `aug_params`) to x (B, 3, S, S) uint8; the
    affine ops interpolate with `modes` ("bilinear" | "bicubic": one, or one per sample)."""
    x = x.clone()
    fill = torch.as_tensor(fill, device=x.device)
    modes = per_sample(modes, len(x))
    for layer in range(ops.shape[1]):
        groups: dict[str, list[int]] = {}
        for j, i in enumerate(ops[:, layer].tolist()):
            if i >= 0:
                groups.setdefault(op_names[i], []).append(j)
        affine = [j for name, js in groups.items() if name in _AFFINE_OPS for j in js]
        for mode in sorted({modes[j] for j in affine}):  # at most two batched calls per layer
            js = [j for j in affine if modes[j] == mode]
            names = [op_names[ops[j, layer]] for j in js]
            sel = torch.as_tensor(js, device=x.device)
            x[sel] = _affine(names, x[sel], torch.as_tensor(args[js, layer]), fill, mode)
        for name, js in groups.items():
            if name in _AFFINE_OPS:
                continue
            sel = torch.as_tensor(js, device=x.device)
            arg = torch.as_tensor(args[js, layer], device=x.device)
            xs = x[sel]
            if name in _LUT_OPS:
                lut = _lut(name, xs, arg)
                x[sel] = lut.gather(2, xs.reshape(len(js), 3, -1).long()).view_as(xs).to(torch.uint8)
            elif name in _BLEND_OPS:
                x[sel] = _blend(name, xs, arg)
            else:
                raise ValueError(f"RandAugment op {name!r} has no device implementation")
    return x
