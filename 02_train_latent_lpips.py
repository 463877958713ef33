"""
LatentLPIPS (§3.2, App. B): a VGG16-bn in the diffusion model's own space (4
latent channels, first three max-pools removed), trained in two phases:

  phase 1  classifier: ImageNet-style, on latents (sd15/sdxl: an ImageFolder tree
           encoded once by the teacher's VAE and cached in shards) or on the toy
           worlds' own labels: the toy's 10 shapes; toy_sd's one head per attribute
           its captions name (shape, colour, background, size, place). Reports
           held-out top-1 per head (paper: 68.26%, Table A2).
  phase 2  linear calibration on 2AFC triplets (ref, p0, p1, judgment), LPIPS-style:
           non-negative 1x1 heads on the 5 taps plus a small ranking net, BCE.
           BAPPS layout with --bapps DIR; synthetic distortions of the toy data
           otherwise (DISTORTIONS). Reports 2AFC agreement (Table A3) against plain
           L2, on the toy per distortion kind.

Extras: --reconstruct runs the single-image reconstruction of Fig. 5 / A1 (MSE vs
LatentLPIPS vs E-LatentLPIPS); --speed times E-LatentLPIPS against decode +
pixel LPIPS on SD1.5 shapes (Fig. 4). SD users can skip both phases with an
official tuned checkpoint: pass it to 03/04 as --lpips_ckpt.

Output: <out_dir>/lpips/{latent_lpips.pt, metrics.json, reconstruction.png}

Toy (CPU, ~2 min):   python 02_train_latent_lpips.py
SD1.5 (1 GPU):       python 02_train_latent_lpips.py --preset sd15 --images /data/imagenet/train --bapps /data/bapps
SD1.5 (8 GPUs):      torchrun --nproc_per_node=8 02_train_latent_lpips.py --preset sd15 --images /data/imagenet/train --bapps /data/bapps
Reconstruction:      python 02_train_latent_lpips.py --reconstruct
Speed (Fig. 4):      python 02_train_latent_lpips.py --speed
"""
import functools
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

import common as C

POS = C.checked_type(float, lambda x: x > 0, "a number > 0", "0")
FLAGS = {
    "run": C.RUN_FLAGS + [
        ("teacher", None, None, "sd15/sdxl: the diffusers folder (or hub id) whose VAE defines the latent space"),
    ],
    "F, the network (App. B)": [
        ("lpips_width", None, POS, "channel width of VGG16-bn (1.0 = the paper's; toy 0.25)"),
        ("lpips_pools_removed", None, C.INT_NONNEG, "how many of the first max-pools are removed (paper: 3)"),
    ],
    "phase 1: classifier (Table A2)": [
        ("images", None, None, "sd15/sdxl/cifar10: an ImageFolder root (class subfolders of images)"),
        ("image_size", 256, C.INT_POS, "images are resized and centre-cropped to this before encoding"),
        ("num_images", 24_000, C.INT_POS, "toy/toy_sd: images of the built-in world for phase 1"),
        ("val_frac", 0.05, C.FRACTION, "held-out fraction for the top-1 accuracy"),
        ("cls_steps", None, C.INT_POS, "training steps"),
        ("cls_batch", None, C.INT_POS, "global batch"),
        ("cls_lr", None, POS, "learning rate (one-cycle)"),
        ("cls_ckpt_every", 5000, C.INT_POS, "save the resumable phase-1 state (<out_dir>/lpips/classifier_latest.pt) this often"),
        ("resume", False, None, "continue phase 1 from that state (refused if a CLS_RESUME_KEYS setting changed)"),
        ("max_steps_this_run", 0, C.INT_NONNEG, "stop phase 1 after this many steps (0: run to --cls_steps), for time-limited jobs"),
    ],
    "phase 2: 2AFC calibration (Table A3)": [
        ("bapps", None, None, "BAPPS root holding 2afc/{train,val}/<subset>/{ref,p0,p1,judge} (required for sd15/sdxl)"),
        ("num_triplets", 10_000, C.INT_POS, "toy/toy_sd: synthetic triplets (20%% held out)"),
        ("cal_steps", 2000, C.INT_POS, "calibration steps (cheap: the heads are linear in cached distances)"),
        ("calibrate_only", False, None, "phase 2 alone, on the phase-1 classifier saved in <out_dir>/lpips/classifier.pt"),
    ],
    "experiments (exit when done)": [
        ("reconstruct", False, None, "Fig. 5 / A1: reconstruct one image under MSE, LatentLPIPS and E-LatentLPIPS"),
        ("recon_steps", 400, C.INT_POS, "its optimisation steps"),
        ("lpips_augment", None, C.AUGMENT, "its E-LatentLPIPS augmentation (letters b, g, c, o, or bg+cutout)"),
        ("pixels", False, None, "toy_sd: learn it on the decoded images instead (3 channels): the pixel LPIPS of "
                                "03/04 --loss lpips --lpips_ckpt, the Table 1 baseline"),
        ("speed", False, None, "Fig. 4: time and memory of E-LatentLPIPS vs decode + pixel LPIPS (SD1.5 shapes)"),
    ],
}


# --- phase 1: the classifier -----------------------------------------------------
def phase1_data(cfg, device):
    """(x_train, y_train, x_val, y_val, heads) in the model's space: y is (N, len(heads)),
    one label per head, and heads names each with its class count (ImageFolder: the
    class; toy: its shape; toy_sd: C.TOY_SCENE's attributes)."""
    if cfg["arch"] == "cifar10" and cfg["images"] is None:
        C.fail("cifar10: pass --images with an ImageFolder tree of CIFAR10/ImageNet images for phase 1")
    if cfg.get("data") == "toy" and cfg["images"] is None:
        render, to_space, _ = toy_data(cfg, device)
        x, y = render(range(0, cfg["num_images"]))
        x, n_val = to_space(x), int(len(x) * cfg["val_frac"])
        heads = {"shape": 10} if cfg["family"] == "edm" else {k: len(v) for k, v in C.TOY_SCENE.items()}
    else:
        x, y, n_val, heads = cached_image_latents(cfg, device)
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val], heads


def toy_data(cfg, device):
    """The toy worlds' own data in the model's space: render(seeds) -> (images, labels)
    (toy: the shape; toy_sd: one label per C.TOY_SCENE attribute, so that F must see
    colour, background, size and place as well as shape), to_space(images) (toy and
    --pixels: the pixels as they are; toy_sd: the teacher VAE's latents), and decode
    (None in pixels)."""
    def render(seeds):
        if cfg["family"] == "edm":
            imgs, shape = C.toy_images(seeds)
            return imgs, shape[:, None]
        imgs, _, attributes = C.toy_scene(seeds, cfg["resolution"])
        return imgs, attributes
    if cfg["family"] == "edm" or cfg["pixels"]:
        return render, lambda x: x, None
    vae, scaling = load_ldm_vae(cfg["teacher"], device)
    return render, lambda x: encode_images(vae, scaling, x, device, 500), lambda z: vae.decode(z / scaling).sample.clamp(-1, 1)


# settings a phase-1 --resume must not change (world: each process keeps its own sampling generator)
CLS_RESUME_KEYS = ("cls_steps", "cls_batch", "cls_lr", "lpips_width", "lpips_pools_removed", "seed", "world", "images", "image_size",
                   "val_frac", "pixels", "num_images")
PHASE1_STATE_KEYS = ("net", "opt", "sched", "rng", "step", "settings")  # what lpips/classifier_latest.pt holds


def train_classifier(cfg, x, y, xv, yv, heads, device, rank, world, state_path, stop):
    """Phase 1: one linear head per label column (`heads`: their class counts), the
    loss the sum of their cross-entropies. Returns (net, held-out top-1 of each head),
    or (None, None) when --max_steps_this_run stopped it early (its state is saved at
    `state_path`; --resume continues it). A signal (`stop`, C.StopSignal) saves that
    state after the step, then exits."""
    torch.manual_seed(cfg["seed"])
    net = C.LatentVGG(x.shape[1], cfg["lpips_width"], cfg["lpips_pools_removed"], sum(heads)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["cls_lr"], weight_decay=1e-4)
    steps, B = cfg["cls_steps"], cfg["cls_batch"] // world
    # 10% warm-up; OneCycleLR divides by zero when pct_start * total_steps is exactly 1
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["cls_lr"], total_steps=steps, pct_start=0.1 if steps != 10 else 0.15)
    g = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    start, settings = 0, dict({k: cfg.get(k) for k in CLS_RESUME_KEYS}, world=world)
    if len(heads) > 1:  # one head's class count follows from --images, already a resume key
        settings["heads"] = list(heads)
    if cfg["resume"] and os.path.isfile(state_path):
        ck = C.load_checkpoint(state_path, "phase-1 state", keys=PHASE1_STATE_KEYS)
        C.check_resume(ck["settings"], settings, f"use those settings, or delete '{state_path}' to start phase 1 again")
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        g.set_state(ck["rng"][rank])
        start = ck["step"]
        C.print0(f"phase 1: resumed from '{state_path}' at step {start}")
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    end = steps if not cfg["max_steps_this_run"] else min(steps, start + cfg["max_steps_this_run"])
    bar = tqdm(range(start, end), initial=start, total=steps, desc="phase 1: classifier", disable=rank != 0)
    for step in bar:
        idx = torch.randint(len(x), (B,), generator=g)
        xb = x[idx].float()
        if cfg["family"] == "ldm" and not (cfg.get("data") == "toy" and not cfg["images"]):  # ImageNet's flips; a toy scene's place is a label
            xb = torch.where(torch.rand(B, 1, 1, 1, generator=g) < 0.5, xb.flip(3), xb)
        logits, yb = model(xb.to(device)).split(heads, 1), y[idx].to(device)
        loss = sum(F.cross_entropy(lg, yb[:, h]) for h, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        stopping = stop.requested(device) and step + 1 < end  # SIGTERM/SIGUSR1 on any rank: save the state, then exit
        if (step + 1) % cfg["cls_ckpt_every"] == 0 or step + 1 == end or stopping:  # the resumable state, with every rank's generator
            rng = [g.get_state()] * world
            if world > 1:
                torch.distributed.all_gather_object(rng, g.get_state())
            if rank == 0:
                state = dict(net=net.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), rng=rng, step=step + 1,
                             settings=settings)
                C.atomic(state_path, lambda f: torch.save(state, f))
        if stopping:
            stop.exit(step + 1)
    stop.restore()
    if end < steps:
        return None, None
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(xv[i:i + 256].float().to(device)).cpu() for i in range(0, len(xv), 256)])
    pred = torch.stack([lg.argmax(1) for lg in logits.split(heads, 1)], 1)
    return net, pred.eq(yv).float().mean(0).tolist()


# --- phase 2: 2AFC calibration ---------------------------------------------------
def _background(x, tol=0.1):
    """Which pixels show the background: those within `tol` of the median colour of
    the image's border (the toy worlds' backgrounds are flat; a shape covers at most
    part of the border). (B, 1, H, W) in {0, 1}."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], 2)
    bg = border.median(2).values[:, :, None, None]
    return ((x - bg).abs().amax(1, keepdim=True) < tol).float()


def toy_distort(x, kind, s, g):
    """One synthetic distortion kind (DISTORTIONS[kind]) at strength s in [0, 1] (per image)."""
    s4 = s.view(-1, 1, 1, 1)
    name = DISTORTIONS[kind]
    if name == "noise":
        return x + 0.35 * s4 * torch.randn(x.shape, generator=g)
    if name == "blur":  # a 3x3 box blur mixed in by s
        return x + s4 * (F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1) - x)
    if name == "shift":  # by up to 2 pixels
        k = (s * 2).round().long()
        return torch.stack([torch.roll(xi, (int(ki), int(ki)), (1, 2)) for xi, ki in zip(x, k)])
    if name == "colour cast":  # one RGB offset over the whole image
        d = F.normalize(torch.randn(len(x), 3, generator=g), dim=1).view(-1, 3, 1, 1)
        return x + 0.5 * s4 * d
    if name == "contrast":
        m = x.mean((1, 2, 3), keepdim=True)
        return m + (x - m) * (1 - 0.7 * s4)
    if name == "hue":  # rotate every colour about the grey axis by up to 60 degrees (one named colour to the next)
        theta = (s * torch.where(torch.rand(len(x), generator=g) < 0.5, -1.0, 1.0) * math.pi / 3).view(-1, 1, 1, 1)
        k = x.mean(1, keepdim=True)  # the grey component stays; the rest turns in the plane normal to (1, 1, 1)
        v = x - k
        cross = torch.stack([v[:, 2] - v[:, 1], v[:, 0] - v[:, 2], v[:, 1] - v[:, 0]], 1) / math.sqrt(3)
        return k + v * theta.cos() - cross * theta.sin()
    # background: its grey level moved by up to 0.8 (of the range's 2), toward the far end
    bg = _background(x)
    lighter = torch.where((x * bg).sum((1, 2, 3)) / (3 * bg.sum((1, 2, 3)) + 1e-6) < 0, 1.0, -1.0).view(-1, 1, 1, 1)
    return x + bg * lighter * 0.8 * s4


# The synthetic 2AFC's kinds of distortion, each touching what a toy scene is made of
# (its colours, background, sharpness, place), and the observer's perceived magnitude
# per unit strength of each: like people, and unlike L2, it counts small translations
# and global contrast changes little, colour casts and the background's level more,
# and noise, blur and a turn of the shape's hue (a caption's colour) most.
DISTORTIONS = ("noise", "blur", "shift", "colour cast", "contrast", "hue", "background")
KIND_WEIGHT = torch.tensor([1.0, 1.0, 0.4, 0.8, 0.5, 1.0, 0.8])


def toy_triplets(n, seed, render=C.toy_images):
    """Synthetic 2AFC in pixels: p0 and p1 are distortions of ref (random kinds k0, k1)
    of strengths s0, s1; their perceived magnitudes are m = KIND_WEIGHT[k] * s, and
    judge = P(p1 judged closer) = sigmoid((m0 - m1) / 0.1). Returns ref, p0, p1,
    judge and the kinds (n, 2)."""
    g = torch.Generator().manual_seed(seed)
    ref, _ = render(range(90_000_000 + seed * n, 90_000_000 + seed * n + n))
    s0, s1 = torch.rand(n, generator=g), torch.rand(n, generator=g)
    k0, k1 = (torch.randint(len(DISTORTIONS), (n,), generator=g) for _ in range(2))
    p0, p1 = ref.clone(), ref.clone()
    for k in range(len(DISTORTIONS)):
        for p, m, s in ((p0, k0 == k, s0), (p1, k1 == k, s1)):
            if m.any():
                p[m] = toy_distort(ref[m], k, s[m], g)
    return ref, p0, p1, torch.sigmoid((KIND_WEIGHT[k0] * s0 - KIND_WEIGHT[k1] * s1) / 0.1), torch.stack([k0, k1], 1)


@torch.no_grad()
def layer_distances(lp, a, b, device, batch=256):
    """Per-layer, per-channel mean squared differences of unit-normalised taps:
    d = sum_l <w_l, v_l>, so the heads are linear in these (cached once)."""
    out = [[] for _ in lp.net.chns]
    for i in range(0, len(a), batch):
        fa, fb = lp.net.taps(a[i:i + batch].float().to(device)), lp.net.taps(b[i:i + batch].float().to(device))
        for l, (u, v) in enumerate(zip(fa, fb)):
            out[l].append(((C.unit_normalize(u) - C.unit_normalize(v)) ** 2).mean((2, 3)).cpu())
    return [torch.cat(o) for o in out]


class RankNet(nn.Module):
    """LPIPS' small ranking network: (d0, d1) -> P(p1 judged closer)."""

    def __init__(self, mid=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, mid), nn.LeakyReLU(0.2), nn.Linear(mid, mid), nn.LeakyReLU(0.2), nn.Linear(mid, 1))

    def forward(self, d0, d1, eps=0.1):
        return self.net(torch.stack([d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)], 1)).squeeze(1)


def two_afc(d0, d1, judge):
    """2AFC agreement: credit judge when d1 < d0, 1 - judge when d0 < d1."""
    return ((d1 < d0).float() * judge + (d0 < d1).float() * (1 - judge) + (d0 == d1).float() * 0.5).mean().item()


def calibrate(lp, train, val, cfg, device, kinds=None):
    """Fit the heads (and RankNet) on `train` = (ref, p0, p1, judge); report 2AFC
    agreement on `val` before and after, and plain L2's. With `kinds` ((n_val, 2), the
    DISTORTIONS index of p0's and p1's), also per kind: the held-out triplets with that
    kind on either side."""
    (r, p0, p1, j), (rv, p0v, p1v, jv) = train, val
    v0, v1 = layer_distances(lp, r, p0, device), layer_distances(lp, r, p1, device)
    v0v, v1v = layer_distances(lp, rv, p0v, device), layer_distances(lp, rv, p1v, device)

    def dist(vs, ws):
        return sum((v * w.clamp(min=0)).sum(1) for v, w in zip(vs, ws))
    ws = [nn.Parameter(torch.ones(v.shape[1])) for v in v0]
    rank = RankNet()
    opt = torch.optim.Adam([*ws, *rank.parameters()], lr=1e-2)
    d_before = dist(v0v, ws).detach(), dist(v1v, ws).detach()
    for _ in tqdm(range(cfg["cal_steps"]), desc="phase 2: 2AFC calibration"):
        logit = rank(dist(v0, ws), dist(v1, ws))
        loss = F.binary_cross_entropy_with_logits(logit, j)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for w in ws:  # the heads stay non-negative
                w.clamp_(min=0)
    with torch.no_grad():
        for lin, w in zip(lp.lins, ws):
            lin.weight.copy_(w.view(1, -1, 1, 1))
    d_after = dist(v0v, ws).detach(), dist(v1v, ws).detach()
    d_l2 = (rv - p0v).pow(2).mean((1, 2, 3)), (rv - p1v).pow(2).mean((1, 2, 3))

    def agreement(m=slice(None)):
        return {name: two_afc(d0[m], d1[m], jv[m]) for name, (d0, d1) in
                (("l2", d_l2), ("uncalibrated", d_before), ("calibrated", d_after))}
    out = agreement()
    res = dict(two_afc_uncalibrated=out["uncalibrated"], two_afc_calibrated=out["calibrated"], two_afc_l2=out["l2"])
    if kinds is not None:
        res["two_afc_by_kind"] = {name: agreement((kinds == k).any(1)) for k, name in enumerate(DISTORTIONS)}
    return res


# --- the reconstruction experiment (Fig. 5 / A1) -----------------------------------
def reconstruct(cfg, lp, device, target, decode=None):
    """Optimise a random x toward one target under MSE, LatentLPIPS, E-LatentLPIPS."""
    curves, finals = {}, {}
    for mode in ("mse", "latent", "elatent"):
        torch.manual_seed(cfg["seed"])
        loss_fn = C.RegressionLoss(mode, lp, cfg["lpips_augment"] or "bgc+cutout").to(device)
        x = (torch.randn_like(target) * target.std()).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.02)
        curves[mode] = []
        for step in tqdm(range(cfg["recon_steps"]), desc=f"reconstruct ({mode})"):
            # E-LatentLPIPS is an expectation over T (Eq. 3): average a few draws per step
            loss = sum(loss_fn(x, target).mean() for _ in range(4 if mode == "elatent" else 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curves[mode].append(min(psnr(x.detach(), target), 60.0))  # capped: MSE reaches the target exactly
        finals[mode] = x.detach()
    imgs = [target] + [finals[m] for m in ("mse", "latent", "elatent")]
    if decode is not None:
        imgs = [decode(i) for i in imgs]
    out = C.save_image_grid(torch.cat(imgs), os.path.join(cfg["out_dir"], "lpips", "reconstruction.png"), ncol=4)
    # the final PSNRs, and each curve every 10 steps (capped at 60 dB: MSE reaches the target exactly)
    return {**{f"psnr_{m}": round(c[-1], 2) for m, c in curves.items()},
            "psnr_curves_every_10": {m: [round(v, 2) for v in c[::10]] for m, c in curves.items()}}, out


def psnr(a, b, peak=2.0):
    """PSNR in dB for signals whose range is `peak` (2 for [-1, 1] images)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(peak ** 2 / max(mse, 1e-12))


# --- Fig. 4: speed and memory of E-LatentLPIPS vs decode + LPIPS ---------------------
def _peak_mem(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS (bytes, Linux)


@torch.enable_grad()  # callers may run under no_grad; this benchmark times backward passes
def benchmark_lpips_speed(device, repeats=3, augment="bg+cutout", latent_size=64):
    """Fig. 4: one forward+backward at batch 1 on SD1.5 shapes, random weights.
      pixel:  latent 4x64x64 -> SD1.5 VAE decoder -> 3x512x512 -> VGG16-bn LPIPS
      latent: latent 4x64x64 -> E-LatentLPIPS (our VGG16-bn, 4 channels, 3 pools removed)
    Time is the median of `repeats` after a warm-up. Memory is the peak allocated
    on CUDA; on CPU it is the growth of the process' peak RSS (latent path runs first)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    target, x0 = (torch.randn(1, 4, latent_size, latent_size, device=device) for _ in range(2))
    latent = C.RegressionLoss("elatent", C.LatentLPIPS(4, 1.0, 3).to(device), augment)
    vae = AutoencoderKL.from_config(json.load(open(os.path.join(C.SD_CONFIGS, "sd15", "vae.json"))))  # SD1.5's VAE, random weights
    vae = vae.to(device).eval().requires_grad_(False)
    pixel = C.RegressionLoss("lpips", decode=lambda z: vae.decode(z / 0.18215).sample, pixel_lpips=C.LatentLPIPS(3, 1.0, 0).to(device))
    res = {}
    for name, fn in (("e_latent_lpips", latent), ("pixel_lpips", pixel)):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        base = _peak_mem(device) if device.type != "cuda" else torch.cuda.memory_allocated(device)
        step = lambda: fn(x0.clone().requires_grad_(True), target).sum().backward()
        step()  # warm-up
        sec, _ = C.timed(step, device, repeats)
        res[name] = dict(ms=round(1000 * sec, 1), mem_gb=round((_peak_mem(device) - base) / 2 ** 30, 3))
    res["time_ratio"] = round(res["pixel_lpips"]["ms"] / res["e_latent_lpips"]["ms"], 2)
    res["mem_ratio"] = round(res["pixel_lpips"]["mem_gb"] / max(res["e_latent_lpips"]["mem_gb"], 1e-3), 2)
    res["device"] = str(device)
    return res


IMG_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@functools.lru_cache(maxsize=1)
def load_ldm_vae(teacher, device):
    """The teacher's VAE, which defines the latent space (loaded once per run)."""
    from diffusers import AutoencoderKL
    path = C.resolve_pretrained(teacher, parts=["vae"])
    with C.or_fail(f"teacher '{teacher}': its vae does not load", "pass a complete diffusers folder with --teacher"):
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    vae = vae.to(device).eval().requires_grad_(False)
    return vae, vae.config.scaling_factor


def space_of(cfg, channels, device):
    """The latent space this run's LatentLPIPS learns (recorded in its checkpoint):
    pixels, or the teacher VAE's latents."""
    if cfg["family"] == "edm" or cfg["pixels"]:
        return C.latent_space("edm", channels)
    return C.latent_space("ldm", channels, load_ldm_vae(cfg["teacher"], device)[1])


def image_folder(root):
    """ImageFolder layout: root/<class>/<image>. Returns [(path, label)], classes."""
    if root is None or not os.path.isdir(root):
        C.fail(f"image folder '{root}' does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMG_EXTS)]
    if not items:
        C.fail(f"no images found in '{root}' (expected root/<class>/<image>{'|'.join(IMG_EXTS)})")
    return items, classes


@torch.no_grad()
def encode_images(vae, scaling, imgs, device, batch=32):
    """Images in [-1, 1] -> diffusion-space latents (posterior mean x scaling factor)."""
    return torch.cat([vae.encode(imgs[i:i + batch].to(device)).latent_dist.mean.cpu() * scaling
                      for i in range(0, len(imgs), batch)])


def cached_image_latents(cfg, device, shard=1024):
    """Encode an ImageFolder once with the teacher's VAE, cached in atomic shards
    (ranks take shards[rank::world]; a rerun skips finished ones). Returns
    (x, y (N, 1), n_val, heads): the first n_val of a fixed shuffle are held out."""
    import torch.distributed as dist
    items, classes = image_folder(cfg["images"])
    g = torch.Generator().manual_seed(cfg["seed"])
    items = [items[i] for i in torch.randperm(len(items), generator=g)]
    cache = os.path.join(cfg["out_dir"], "lpips", "latents")
    manifest = dict(images=os.path.abspath(cfg["images"]), n=len(items), image_size=cfg["image_size"], teacher=cfg["teacher"])
    mpath = os.path.join(cache, "manifest.json")
    if os.path.isfile(mpath):
        with C.or_fail(f"latent cache manifest '{mpath}' is corrupt", f"delete '{cache}' to re-encode"):
            found = dict(json.load(open(mpath)))
        diff = [k for k in manifest if found.get(k) != manifest[k]]
        if diff:
            C.fail(f"latent cache '{cache}' was made from other images/settings (differs in {diff}); use another --out_dir")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == 0:
        C.save_json(manifest, mpath)
    n_shards = (len(items) + shard - 1) // shard
    todo = [k for k in range(n_shards)[rank::world] if not os.path.isfile(os.path.join(cache, f"shard_{k:06d}.safetensors"))]
    if todo:
        vae, scaling = load_ldm_vae(cfg["teacher"], device)
        from tqdm import tqdm
        for k in tqdm(todo, desc="encoding images", disable=rank != 0):
            part = items[k * shard:(k + 1) * shard]
            imgs = torch.stack([C.load_image(p, cfg["image_size"]) for p, _ in part])
            shard_k = dict(x=encode_images(vae, scaling, imgs, device).half().contiguous(), y=torch.tensor([l for _, l in part]))
            C.atomic(os.path.join(cache, f"shard_{k:06d}.safetensors"), lambda f: save_file(shard_k, f))
    C.barrier()
    x, y = [], []
    for k in range(n_shards):
        d = C.load_shard(os.path.join(cache, f"shard_{k:06d}.safetensors"), what="latent cache shard",
                         remedy="rerun 02_train_latent_lpips.py to re-encode it")
        x.append(d["x"])
        y.append(d["y"])
    x, y = torch.cat(x), torch.cat(y)
    return x, y.view(-1, 1), max(1, int(len(x) * cfg["val_frac"])), {"class": len(classes)}


def first_cached_latent(cfg, device):
    """The reconstruction target for sd15/sdxl: the first cached image latent."""
    path = os.path.join(cfg["out_dir"], "lpips", "latents", "shard_000000.safetensors")
    if not os.path.isfile(path):
        C.fail(f"no cached latents at '{path}'; run phase 1 with --images first")
    vae, scaling = load_ldm_vae(cfg["teacher"], device)
    return C.load_shard(path)["x"][:1].float().to(device), lambda z: vae.decode(z / scaling).sample.clamp(-1, 1)


def load_bapps(cfg, split, device, files=None):
    """BAPPS 2AFC: root/2afc/<split>/<subset>/{ref,p0,p1}/*.png and judge/*.npy,
    brought into the model's space (VAE-encoded for sd15/sdxl; resized for toy).
    `files`: that split's `bapps_files`, when the up-front check has read them."""
    refs, p0s, p1s, judges = files or bapps_files(cfg, split)
    if cfg["family"] == "ldm":
        vae, scaling = load_ldm_vae(cfg["teacher"], device)
        conv = lambda paths: encode_images(vae, scaling, torch.stack([C.load_image(p, 64) for p in paths]), device)
    else:
        conv = lambda paths: torch.stack([C.load_image(p, cfg["resolution"]) for p in paths])
    return conv(refs), conv(p0s), conv(p1s), torch.tensor(judges)


def bapps_files(cfg, split):
    """The triplets' files and judgments of one BAPPS split; checks the layout (cheap:
    called before phase 1, so a wrong --bapps stops the run before hours of training)."""
    root = os.path.join(cfg["bapps"], "2afc", split)
    if not os.path.isdir(root):
        C.fail(f"BAPPS folder '{root}' does not exist (expected <bapps>/2afc/{{train,val}}/<subset>/...)")
    subsets = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not subsets:
        C.fail(f"BAPPS folder '{root}' has no subsets")
    refs, p0s, p1s, judges = [], [], [], []
    for sub in subsets:
        for part in ("ref", "p0", "p1", "judge"):
            if not os.path.isdir(os.path.join(root, sub, part)):
                C.fail(f"BAPPS subset '{os.path.join(root, sub)}' is missing its '{part}' folder")
        names = sorted(f[:-4] for f in os.listdir(os.path.join(root, sub, "judge")) if f.endswith(".npy"))
        for nm in names:
            refs.append(os.path.join(root, sub, "ref", nm + ".png"))
            p0s.append(os.path.join(root, sub, "p0", nm + ".png"))
            p1s.append(os.path.join(root, sub, "p1", nm + ".png"))
            judge = os.path.join(root, sub, "judge", nm + ".npy")
            with C.or_fail(f"BAPPS judgment '{judge}' is unreadable"):
                judges.append(float(np.load(judge).reshape(-1)[0]))
    missing = [p for p in refs + p0s + p1s if not os.path.isfile(p)]
    if missing or not judges:
        C.fail(f"BAPPS split '{root}' is incomplete: " + (f"'{missing[0]}' is missing" if missing else "no judge/*.npy files"))
    return refs, p0s, p1s, judges


def validate(cfg):
    """Every file this run will read, before any work (the flags' types checked the
    values). Returns the BAPPS file lists (read once here)."""
    lp_dir = os.path.join(cfg["out_dir"], "lpips")
    if cfg["pixels"] and (cfg["family"] != "ldm" or cfg.get("data") != "toy"):
        C.fail("--pixels learns toy_sd's pixel LPIPS from its rendered images: use --preset toy_sd")
    if cfg["speed"]:
        return None
    if cfg["reconstruct"]:
        if not os.path.isfile(os.path.join(lp_dir, "latent_lpips.pt")):
            C.fail(f"--reconstruct needs '{lp_dir}/latent_lpips.pt': run 02_train_latent_lpips.py first")
        return None
    if cfg["calibrate_only"] and not os.path.isfile(os.path.join(lp_dir, "classifier.pt")):
        C.fail(f"--calibrate_only needs the phase-1 classifier '{lp_dir}/classifier.pt' (run 02 once without it)")
    state = os.path.join(lp_dir, "classifier_latest.pt")
    if cfg["resume"] and not cfg["calibrate_only"] and os.path.isfile(state):
        C.load_checkpoint(state, "phase-1 state (delete it to start phase 1 again)", mmap=True, keys=PHASE1_STATE_KEYS)
    needs_images = cfg.get("data") != "toy" and not cfg["calibrate_only"]
    if needs_images and not os.path.isfile(os.path.join(lp_dir, "latents", "manifest.json")):
        image_folder(cfg["images"])  # a missing or empty --images stops here
    if cfg["family"] == "ldm" and cfg.get("data") != "toy" and not cfg["bapps"]:
        C.fail("phase 2 for sd15/sdxl needs 2AFC judgments: pass --bapps DIR (the BAPPS 2afc layout)")
    return {split: bapps_files(cfg, split) for split in ("train", "val")} if cfg["bapps"] else None


def main(argv=None):
    cfg, _ = C.parse_config(__doc__, FLAGS, argv)
    bapps = validate(cfg)
    rank, _, world, device = C.setup_distributed(cfg["dist_timeout_min"])
    if cfg["speed"]:
        C.print0(json.dumps(benchmark_lpips_speed(device), indent=2))
        return C.cleanup()
    lp_dir = os.path.join(cfg["out_dir"], "lpips")
    ckpt = os.path.join(lp_dir, "latent_lpips.pt")
    metrics_path = os.path.join(lp_dir, "metrics.json")
    if cfg["reconstruct"]:
        lp = C.load_latent_lpips(ckpt, space=space_of(cfg, 3 if cfg["pixels"] else cfg["channels"], device)).to(device)
        if cfg.get("data") == "toy":
            render, to_space, decode = toy_data(cfg, device)
            target = to_space(render([123])[0]).to(device)
        else:
            target, decode = first_cached_latent(cfg, device)
        res, png = reconstruct(cfg, lp, device, target, decode)
        if rank == 0:
            try:  # add to phase 1-2's metrics; an unreadable file is replaced, and said so
                m = json.load(open(metrics_path)) if os.path.isfile(metrics_path) else {}
            except ValueError:
                print(f"warning: '{metrics_path}' is unreadable; rewriting it with the reconstruction's metrics only")
                m = {}
            C.save_json({**m, **res}, metrics_path)
            print(json.dumps({k: v for k, v in res.items() if k.startswith("psnr_") and not isinstance(v, dict)}),
                  f"\nwrote {png}: target | MSE | LatentLPIPS | E-LatentLPIPS; the PSNR curves are in {metrics_path}")
        return C.cleanup()

    cls_path = os.path.join(lp_dir, "classifier.pt")
    t0 = time.time()
    if cfg["calibrate_only"]:  # phase 1 was run before: its classifier is saved on its own
        ck = C.load_checkpoint(cls_path, "phase-1 classifier (run 02 once without --calibrate_only)",
                               keys=("state_dict", "top1", "num_classes", "in_ch"))
        net, acc, ncls, in_ch = None, ck["top1"], ck["num_classes"], ck["in_ch"]
        top1_by_head = ck.get("top1_by_head", {"class": acc})
        C.print0(f"phase 2 only: classifier '{cls_path}' (held-out top-1 {acc:.4f})")
    else:
        stop = C.StopSignal(lp_dir)  # SIGTERM/SIGUSR1, from here on (encoding an image set's latents takes long)
        x, y, xv, yv, heads = phase1_data(cfg, device)
        C.print0(f"phase 1: {len(x)} train / {len(xv)} held-out samples of shape {tuple(x.shape[1:])}, "
                 + ", ".join(f"{name}: {count} classes" for name, count in heads.items()))
        net, accs = train_classifier(cfg, x, y, xv, yv, tuple(heads.values()), device, rank, world,
                                     os.path.join(lp_dir, "classifier_latest.pt"), stop)
        if net is None:
            C.print0("phase 1 stopped early (--max_steps_this_run); rerun with --resume to continue it")
            return C.cleanup()
        acc, top1_by_head = accs[0], dict(zip(heads, accs))
        C.print0("phase 1: held-out top-1 " + ", ".join(f"{n} {a:.4f}" for n, a in top1_by_head.items()))
        ncls, in_ch = sum(heads.values()), x.shape[1]
        if rank == 0:
            cls = dict(state_dict=net.state_dict(), top1=acc, top1_by_head=top1_by_head, num_classes=ncls, in_ch=in_ch,
                       width=cfg["lpips_width"], pools_removed=cfg["lpips_pools_removed"])
            C.atomic(cls_path, lambda f: torch.save(cls, f))
    metrics = dict(top1=acc, top1_by_head=top1_by_head, phase1_seconds=round(time.time() - t0, 1))
    if rank == 0:
        lp = C.LatentLPIPS(in_ch, cfg["lpips_width"], cfg["lpips_pools_removed"], ncls)
        with C.or_fail(f"'{cls_path}' does not match --lpips_width/--lpips_pools_removed"):
            lp.net.load_state_dict(net.state_dict() if net is not None else ck["state_dict"])
        lp = lp.to(device)
        t1 = time.time()
        if cfg["bapps"]:
            (train, val), kinds = (load_bapps(cfg, split, device, bapps[split]) for split in ("train", "val")), None
        else:
            n, (render, to_space, _) = cfg["num_triplets"], toy_data(cfg, device)
            tr, va = toy_triplets(n - n // 5, cfg["seed"] + 1, render), toy_triplets(n // 5, cfg["seed"] + 2, render)
            train, val, kinds = (*map(to_space, tr[:3]), tr[3]), (*map(to_space, va[:3]), va[3]), va[4]
        metrics.update(calibrate(lp, train, val, cfg, device, kinds), phase2_seconds=round(time.time() - t1, 1))
        C.atomic(ckpt, lambda f: torch.save(dict(config=lp.config, state_dict=lp.state_dict(), metrics=metrics, preset=cfg["preset"],
                                                 latent_space=space_of(cfg, in_ch, device)), f))
        C.save_json(metrics, metrics_path)
        print(json.dumps({k: v for k, v in metrics.items() if k != "two_afc_by_kind"}, indent=2))
        if "two_afc_by_kind" in metrics:
            print("2AFC agreement by distortion kind (held-out triplets with it on either side):\n"
                  f"{'kind':>12} {'L2':>6} {'uncal.':>6} {'calib.':>6}")
            for kind, a in metrics["two_afc_by_kind"].items():
                print(f"{kind:>12} {a['l2']:6.3f} {a['uncalibrated']:6.3f} {a['calibrated']:6.3f}")
        print(f"wrote {ckpt}")
    C.cleanup()


if __name__ == "__main__":
    main()
