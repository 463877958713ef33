"""Our E-LatentLPIPS augmentation T against the official package's (`elatentlpips` 0.2,
its StyleGAN2-ADA port) on the same parameters: ADA's debug_percentile q fixes every
draw (isotropic scale 2^(erfinv(2q-1) 0.2), one rotation (2q-1) pi, anisotropic scale,
fractional translation erfinv(2q-1) 0.125 of the size), and ours is given those values.
Ours warps once, bilinearly (kornia); ADA upsamples 2x with its sym6 wavelet filter,
warps, and filters down again. Prints the relative difference of the warped images and of
the LatentLPIPS distance computed on them, for smooth images, the toy's 16x16 images and
white noise (the worst case for a filter).

  pip install --no-deps elatentlpips==0.2 && python tests/ada_augment_compare.py
"""
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(HERE, "standins")]  # standins: pkg_resources where setuptools lacks it
import common as C  # noqa: E402

QS = (0.1, 0.3, 0.45, 0.55, 0.7, 0.9)


def ada_geometric():
    from elatentlpips.ada_aug import AdaAugment
    return AdaAugment(scale=1, rotate=1, aniso=1, xfrac=1).train()


def our_params(q, B, H, W):
    """Our parameters for ADA's draw at percentile q. With debug_percentile ADA rotates once
    (its second rotation is zeroed), by +theta in its convention, which is -theta in ours."""
    e = torch.erfinv(torch.tensor(2 * q - 1.0)).item()
    full = lambda v: torch.full((B,), float(v))
    return dict(scale=full(2 ** (0.2 * e)), rot1=full(-(2 * q - 1) * math.pi), aniso=full(2 ** (0.2 * e)), rot2=full(0.0),
                frac=torch.full((B, 2), 0.125 * e) * torch.tensor([H, W]).float())


def compare(x, y, lpips=None, qs=QS):
    """Mean over qs of ||T_ours(x) - T_ada(x)|| / ||T_ada(x)||, and of the relative
    difference of lpips(T(x), T(y)) under the two (when lpips is given)."""
    ada, ours, img, dist = ada_geometric(), C.Augment("g"), [], []
    B, _, H, W = x.shape
    for q in qs:
        ax, ay = ada(x, y, debug_percentile=q)
        ox, oy = ours(x, y, params=our_params(q, B, H, W))
        img.append(((ox - ax).norm() / ax.norm()).item())
        if lpips is not None:
            with torch.no_grad():
                a, o = lpips(ax, ay), lpips(ox, oy)
            dist.append(((o - a).abs() / a.abs()).mean().item())
    return sum(img) / len(img), (sum(dist) / len(dist) if dist else None)


def main():
    torch.manual_seed(0)
    toy, _ = C.toy_images(list(range(8)))
    toy2, _ = C.toy_images(list(range(8, 16)))
    lp3 = C.LatentLPIPS(3, 0.25, 2).eval()  # the toy's architecture (random weights: the distance's sensitivity, not its calibration)
    lp4 = C.LatentLPIPS(4, 0.25, 3).eval()
    noise, noise2 = torch.randn(8, 4, 32, 32), torch.randn(8, 4, 32, 32)
    smooth = lambda t: torch.nn.functional.interpolate(t, size=64, mode="bicubic", align_corners=False)
    for name, x, y, lp in [("smooth (toy images upsampled to 64 px)", smooth(toy), smooth(toy2), lp3),
                           ("toy images, 16 px", toy, toy2, lp3), ("white noise, 4x32x32", noise, noise2, lp4)]:
        d_img, d_lp = compare(x, y, lp)
        print(json.dumps(dict(input=name, warped_rel_diff=round(d_img, 4), latent_lpips_rel_diff=round(d_lp, 4))))


if __name__ == "__main__":
    main()
