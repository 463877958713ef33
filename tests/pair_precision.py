"""How far each teacher precision puts 01's pairs (and 05's teacher row) from a float32
teacher, for the same z, prompt, steps and guidance:

  float32            the reference
  bfloat16           bf16 weights (8-bit mantissa)
  float16            fp16 weights (11-bit mantissa; SD's usual inference precision)
  float32+autocast   fp32 weights under bf16 autocast (matmuls and convs in bf16)

  python tests/pair_precision.py                # toy_sd (trained), a medium random SD1.5 layout, the toy EDM
  python tests/pair_precision.py --n 16         # fewer pairs

For each: the relative error of x (||x - x_fp32|| / ||x_fp32||, mean and max over the
pairs) and, for the SD teachers, of the decoded uint8 images (mean |difference| in
levels, share of pixels that differ) through the float32 VAE. CPU only: speed is a GPU
question (docs/design.md: Precision).
"""
import argparse
import importlib
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import common as C  # noqa: E402

S1 = importlib.import_module("01_make_pairs")
MODES = ("float32", "bfloat16", "float16", "float32+autocast")


def solve(cfg, mode, seeds, prompts):
    weights = "float32" if mode.endswith("autocast") else mode
    teacher = C.load_teacher(cfg, torch.device("cpu"), weights)
    z, cond = teacher.noise_and_condition(seeds)
    cond = cond if prompts is None else prompts
    with C.autocast(torch.device("cpu"), "bfloat16" if mode.endswith("autocast") else "float32"):
        return teacher.solve(z, cond).float(), teacher


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32)
    a = ap.parse_args()
    seeds = list(range(a.n))
    with tempfile.TemporaryDirectory() as tmp:
        import tiny_sd
        medium = os.path.join(tmp, "medium_sd15")
        tiny_sd.make_tiny_sd15(medium, channels=(128, 256))
        setups = [("toy_sd", ["--preset", "toy_sd"]), ("medium SD1.5 layout (random)", ["--preset", "sd15", "--teacher", medium,
                  "--resolution", "16"]), ("toy EDM", ["--preset", "toy"])]
        for name, argv in setups:
            cfg, _ = C.parse_config(S1.__doc__, S1.FLAGS, argv + ["--out_dir", tmp])
            prompts = None
            if cfg["family"] == "ldm":
                lines = open(cfg["prompts"]).read().splitlines() if cfg.get("prompts") else ["a photo of a cat", "a red car"]
                prompts = [lines[i % len(lines)] for i in seeds]
            ref, teacher = solve(cfg, "float32", seeds, prompts)
            img = (lambda x: torch.from_numpy(C.to_uint8(teacher.to_images(x)))) if cfg["family"] == "ldm" else None
            ref_img = img(ref).float() if img else None
            for mode in MODES[1:]:
                x, _ = solve(cfg, mode, seeds, prompts)
                rel = ((x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1))
                row = dict(teacher=name, mode=mode, pairs=a.n, x_rel_err_mean=float(f"{rel.mean():.3g}"),
                           x_rel_err_max=float(f"{rel.max():.3g}"), finite=bool(torch.isfinite(x).all()))
                if img:
                    d = (img(x).float() - ref_img).abs()
                    row.update(img_abs_diff_levels=float(f"{d.mean():.3g}"), img_pixels_differ=float(f"{(d > 0).float().mean():.3g}"))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
