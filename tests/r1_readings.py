"""R1's share of the discriminator loss under each reading of D(x) (04's --r1_reading),
at stage 2's start: D as 04 builds it from the teacher, one real sample for R1, and
L_D (Eq. 5) on a batch of real pairs against G's fakes.

  toy, trained teacher, real pairs and the stage-1 student of a quick start:
      python tests/r1_readings.py --out_dir runs/toy
  SD1.5 shapes (64x64 latents, 12 readouts), random weights, random latents (~2 min, 12 GB on CPU):
      python tests/r1_readings.py --preset sd15 --teacher random --out_dir runs/r1_sd15

Prints one JSON line: loss_d and, per reading, R1 and r1_term / loss_d with
r1_term = gamma / 2 * R1 (04's amortised share, gamma = 0.01 of Table A1).
"""
import argparse
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

S4 = importlib.import_module("04_gan_finetune")


def r1_under_each_reading(D, x, z, cond):
    """R1 of one real sample under every reading, from one first-order gradient per
    readout (which reading makes gamma = 0.01 a real term of L_D)."""
    x = x.detach().requires_grad_(True)
    logits = D(x, z, cond)
    grads = [torch.autograd.grad(l.sum(), x, retain_graph=True)[0].double() for l in logits]
    n = [l[0].numel() for l in logits]
    R = len(logits)
    g = dict(sum=sum(grads), sum_pos=sum(grads) / R, mean=sum(gr / k for gr, k in zip(grads, n)) / R)
    return {k: v.pow(2).sum().item() / len(x) for k, v in g.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gamma", type=float, default=0.01)
    a = ap.parse_args()
    argv = ["--preset", a.preset, "--out_dir", a.out_dir] + (["--teacher", a.teacher] if a.teacher else [])
    cfg, _ = S4.get_config(argv)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    teacher = C.load_teacher(cfg, cpu)
    D = S4.Discriminator(teacher, cfg["z_cond"], cfg["multiscale"], cfg["d_t"], cfg["noise_aug"])
    if a.teacher == "random":  # no pairs: random latents of the pairs' shape for real and fake
        z, x, fake = (torch.randn(a.batch, *teacher.z_shape) for _ in range(3))
        cond = teacher.encode_prompts(["a photo of a cat"] * a.batch)
    else:  # the quick start's pairs, and its stage-1 student's fakes
        data = C.PairDataset(os.path.join(a.out_dir, "pairs"), teacher, cfg)
        b = data.get(list(range(a.batch)))
        z, x, cond = b["z"], b["x"], C.student_cond(teacher, b["cond"], cpu)
        G = C.Student(teacher, cfg)
        G.load_state_dict(C.load_student_file(os.path.join(a.out_dir, "distill", "student_ema.pt"), "stage-1 student")["ema"])
        with torch.no_grad():
            fake = G(z, cond)
    with torch.no_grad():
        loss_d = S4.gan_loss_d(D(x, z, cond), D(fake, z, cond)).item()
    r1 = r1_under_each_reading(D, x[:1], z[:1], C.map_cond(lambda t: t[:1], cond))
    out = dict(preset=a.preset, teacher=a.teacher or cfg["teacher"], readouts=len(D.heads), loss_d=round(loss_d, 4),
               **{k: dict(r1=float(f"{v:.4g}"), r1_term_over_loss_d=float(f"{0.5 * a.gamma * v / loss_d:.3g}")) for k, v in r1.items()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
