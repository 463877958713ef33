"""
Evaluation (§4, Tables 1-5, Fig. 1-3): realism, diversity, fidelity to the
teacher and speed of the teacher and the one-step students, plus side-by-side
grids of the teacher and the students from the same noise.

  toy      FID-toy (features of a classifier trained on the toy data, never the
           loss network), precision/recall (k=3), class accuracy, diversity
           (mean within-class pairwise feature distance), fidelity to the teacher
           from the same z (pixel MSE, and feature cosine distance as a toy
           DreamSim), time per image, NFE.
  cifar10  FID-50k against the training set's Inception statistics, as EDM's fid.py
           (Table 6): --fid_ref is EDM's reference .npz (mu, sigma) or a folder
           of real images; fidelity to the teacher (pixel MSE), time, NFE.
  sd/sdxl  --protocol coco2014 (Table 3): FID-30k against all 40,504 val2014
           images, CLIP-30k, precision/recall on 10k. --protocol coco2017
           (Tables 4-5): FID-5k and CLIP-5k on the 5,000 val2017 image-text pairs,
           DreamDiv-5k (8 seeds per prompt), DreamSim-5k to the teacher; no P/R.
           Inception: clean-fid (or torch-fidelity), 512 -> 256 -> 299 bicubic
           antialiased; CLIP: open_clip ViT-g-14; dreamsim. Each column is named
           by its count (fid_30k, clip_5k, ...); optional packages load when used.
  toy_sd   the same text-to-image protocol (--protocol toy) on 500 captions of the
           toy world, a toy classifier of shape and colour in every network's
           place: FID in its features of the decoded images, caption agreement
           (caption_500: shape and colour as the caption says) for CLIP score,
           DreamDiv / DreamSim as feature cosine distances. No download.

Output: <out_dir>/eval/{metrics.json, results.md, compare.png, diversity.png}, and the
teacher's samples (teacher_samples_*.pt: read back by later evaluations of the same setup)

Toy (CPU, ~1 min):   python 05_evaluate.py              (toy_sd, ~1.5 min: --preset toy_sd)
Extra rows:          python 05_evaluate.py --students "mse=runs/toy/distill_mse/student_ema.pt,latent=..."
Table 3 (8 GPUs):    torchrun --nproc_per_node=8 05_evaluate.py --preset sd15 --coco /data/coco2014
Tables 4-5:          torchrun --nproc_per_node=8 05_evaluate.py --preset sdxl --coco /data/coco2017   (sd15: --protocol coco2017)
Table 6 (1 GPU):     python 05_evaluate.py --preset cifar10 --teacher edm-cifar10-32x32-cond-vp.pkl --fid_ref cifar10-32x32.npz
Speed (Fig. 3):      python 05_evaluate.py --preset sd15 --speed      (without --teacher: the preset's U-Net, random weights)
"""
import hashlib
import json
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common as C

# §4's text-to-image protocols: the real images are every image of the split (40,504 for
# val2014, 5,000 for val2017); n prompts are sampled from its captions, one per image.
PROTOCOLS = {
    "coco2014": dict(split="val2014", n=30_000, pr=10_000, div=500,  # Table 3; DreamDiv beyond it
                     about="COCO2014 (Table 3): FID and CLIP on sampled val2014 captions, FID against every val2014 image, "
                           "precision/recall on 10k"),
    "coco2017": dict(split="val2017", n=5_000, pr=0, div=5_000,  # Tables 4-5: no precision/recall
                     about="COCO2017 (Tables 4-5): FID and CLIP on the val2017 image-text pairs, DreamDiv (8 seeds per "
                           "prompt), DreamSim to the teacher"),
}
PROTOCOLS["toy"] = dict(split="test", n=500, pr=500, div=10,  # toy_sd: the same protocol in toy features (n: the 15-min quick start)
                        about="toy_sd: FID, precision/recall, DreamSim and DreamDiv in a toy classifier's features of the "
                              "decoded images; caption agreement (shape and colour) in CLIP score's place")
DREAMSIM_N = 5_000  # DreamSim-5k: the first 5k samples' distance to the teacher's image from the same z

FLOATS = C.checked_type(lambda s: [float(v) for v in s.split(",")], bool, "comma-separated numbers", "1,x")
FLAGS = {
    "run": C.RUN_FLAGS + [
        ("teacher_dtype", None, C.DTYPES, "the teacher's precision while sampling, as 01's (the students run in float32; "
                                          "--speed times both in it)"),
        ("batch_per_device", None, C.INT_POS, "sampling batch per process"),
    ],
    "models": [
        ("teacher", None, None, "the teacher the students were distilled from"),
        ("num_steps", None, C.INT_POS, "the teacher's ODE steps (as in 01)"),
        ("resolution", None, C.INT_POS, "image size in pixels (sd15 512, sdxl 1024)"),
        ("guidance", None, C.NONNEG, "the teacher's guidance (default: the students' checkpoints; a contradiction is refused)"),
        ("students", None, None, "extra rows 'name=path,...' of student_ema.pt files; 'name=p1;p2;p3': seeds, + mean ± std"),
    ],
    "metrics (§4)": [
        ("num_samples", 0, C.INT_NONNEG, "samples per model (0: the protocol's: toy 1000, cifar10 50k, coco2014 30k, coco2017 5k)"),
        ("protocol", None, tuple(PROTOCOLS), "sd15/sdxl: coco2014 (Table 3) or coco2017 (Tables 4-5); toy_sd: toy"),
        ("coco", None, None, "sd15/sdxl: COCO root with val2014/ (or val2017/) and annotations/captions_val2014.json (_val2017)"),
        ("div_prompts", None, C.INT_NONNEG, "DreamDiv: prompts x 8 seeds each (default: the protocol's, coco2017 5000, "
                                            "coco2014 500; 0: off)"),
        ("fid_ref", None, None, "cifar10: the real statistics, EDM's reference .npz (mu, sigma) or a folder of real images"),
        ("classifier", None, None, "toy/toy_sd: the FID-toy feature classifier (default <out_dir>/eval/toy_classifier.pt, trained once); "
                                   "share one path across evaluations to compare their FID-toy"),
        ("classifier_seed", 0, C.INT_NONNEG, "toy/toy_sd: that classifier's seed (rerun with others to see FID-toy's spread)"),
        ("eval_w", None, FLOATS, "toy guidance sweep, e.g. '1,2,3': fidelity of each student to the teacher at each w"),
    ],
    "grids": [
        ("grid_rows", 10, C.INT_POS, "rows of compare.png (one seed each; columns: teacher | students)"),
        ("diversity_seeds", 16, C.INT_POS, "diversity.png: one condition, this many seeds"),
    ],
    "speed (Fig. 3)": [
        ("speed", False, None, "time the one-step student against the teacher's DDIM + CFG, per latent and per image, "
                               "and exit (without --teacher: the preset's architecture with random weights)"),
        ("speed_steps", 0, C.INT_NONNEG, "teacher steps to time (0: the preset's)"),
    ],
}

EVAL_SEED0 = 2_000_000_000  # evaluation seeds are disjoint from pair seeds and held-out grid seeds


# Metric maths. Our own code, tested against closed forms; the
# pretrained feature networks for SD come from optional packages.

def feature_stats(f):
    f = f.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (len(f) - 1)


def frechet_distance(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2). tr (S1 S2)^1/2 is the sum of the square
    roots of S1 S2's eigenvalues (real and >= 0 for covariances; round-off's are dropped), in float64."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def fid_from_features(a, b):
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _kth_nn_radius(f, k, chunk=1024):
    r = []
    for i in range(0, len(f), chunk):
        d = torch.cdist(f[i:i + chunk].double(), f.double())
        r.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(r)


def _coverage(query, ref, radii, chunk=1024):
    inside = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk].double(), ref.double())
        inside.append((d <= radii[None]).any(1))
    return torch.cat(inside).float().mean().item()


def precision_recall(real, fake, k=3):
    """Improved precision/recall (Kynkaanniemi et al. 2019): a sample is covered
    when it lies inside some k-NN ball of the other set (k = 3)."""
    precision = _coverage(fake, real, _kth_nn_radius(real, k))
    recall = _coverage(real, fake, _kth_nn_radius(fake, k))
    return precision, recall


def mean_pairwise_distance(f):
    """DreamDiv-style diversity of one condition's samples: mean distance over pairs."""
    n = len(f)
    d = torch.cdist(f.double(), f.double())
    return (d.sum() / (n * (n - 1))).item()


def diversity(features, groups):
    """Mean over conditions of the within-condition mean pairwise distance."""
    vals = [mean_pairwise_distance(features[groups == g]) for g in groups.unique() if (groups == g).sum() > 1]
    return float(np.mean(vals))


def fidelity(student, teacher_out, dist=None):
    """Fidelity to the teacher (the DreamSim-5k idea): the mean distance between
    student and teacher outputs from the same z (lower is closer)."""
    if dist is None:
        return (student.float() - teacher_out.float()).pow(2).flatten(1).mean(1).mean().item()
    return dist(student, teacher_out).float().mean().item()


def gather_by_rank(local, n, world):
    """Undo a seeds[rank::world] split: every rank's rows, back in seed order."""
    import torch.distributed as dist
    if world == 1:
        return local
    parts = [None] * world
    dist.all_gather_object(parts, local.cpu())
    out = torch.empty(n, *local.shape[1:], dtype=local.dtype)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out


# ----------------------------------------------------------------------------
# The toy's judge: a classifier trained on the toy data (never the loss network).

SPLITS = {"train": 0, "val": 50_000_000, "test": 60_000_000, "judge": 70_000_000}  # disjoint seed ranges


def toy_dataset(n, split="train", scene=False):
    """n toy images and their labels: the class (toy), or shape and colour (toy_sd's
    captioned world, scene=True: (n, 2))."""
    seeds = range(SPLITS[split], SPLITS[split] + n)
    if scene:
        x, _, a = C.toy_scene(seeds)
        return x, a[:, :2]
    return C.toy_images(seeds)


class ToyClassifier(nn.Module):
    """A small CNN on toy images, one head per attribute (toy: the class; toy_sd:
    shape and colour). It judges teacher/student samples (accuracy, caption
    agreement) and gives FID-toy features; it is never the training loss network."""

    def __init__(self, heads=(10,), ch=32):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())
        self.body = nn.Sequential(block(3, ch), nn.AvgPool2d(2), block(ch, 2 * ch), nn.AvgPool2d(2),
                                  block(2 * ch, 4 * ch), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = tuple(heads)
        self.head = nn.Linear(4 * ch, sum(heads))

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def train_toy_classifier(path, steps=300, batch=128, seed=0, log=print, scene=False):
    """Train (or load a cached) ToyClassifier (toy ~20 s, toy_sd ~1 min on 2 CPU cores)."""
    torch.manual_seed(seed)  # before the model: its initialisation is part of what the seed fixes
    model = ToyClassifier((10, len(C.TOY_SCENE["colour"])) if scene else (10,))
    if os.path.exists(path):
        with C.or_fail(f"toy classifier '{path}' is unreadable or of another shape", "delete it to retrain"):
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    x, y = toy_dataset(12_000, "judge", scene)
    y = y.view(len(y), -1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        xb = x[idx] + 0.05 * torch.randn(batch, *x.shape[1:], generator=g)  # robust to slight sample noise
        logits = model(xb).split(model.heads, 1)
        loss = sum(F.cross_entropy(lg, y[idx, h]) for h, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    xv, yv = toy_dataset(2000, "val", scene)
    acc = classify(model.eval(), xv).eq(yv).float().mean(0)
    log(f"toy classifier: held-out accuracy {' / '.join(f'{a:.4f}' for a in acc.view(-1).tolist())}")
    C.atomic(path, lambda f: torch.save(model.state_dict(), f))
    return model


@torch.no_grad()
def classify(model, x, batch=512):
    """The predicted label per head: (N,) for one head, else (N, heads)."""
    out = torch.cat([torch.stack([lg.argmax(1) for lg in model(x[i:i + batch].float()).split(model.heads, 1)], 1)
                     for i in range(0, len(x), batch)])
    return out[:, 0] if out.shape[1] == 1 else out


def caption_attributes(prompts):
    """(N, 2): the shape and colour that toy_sd captions name (longest shape name first)."""
    T = C.TOY_SCENE
    shapes = sorted(range(len(T["shape"])), key=lambda k: -len(T["shape"][k]))
    def find(p, names, order):
        k = next((k for k in order if f" {names[k]} " in f" {p} "), None)
        if k is None:
            C.fail(f"caption '{p}' names no toy {names}")
        return k
    return torch.tensor([[find(p, T["shape"], shapes), find(p, T["colour"], range(len(T["colour"])))] for p in prompts])


# ----------------------------------------------------------------------------
# Sampling every model from the same seeds.

def load_student(path, teacher, cfg, device, ck=None):
    ck = ck or C.load_student_file(path, "student (student_ema.pt of 03/04)")
    if ck["config"].get("num_steps", cfg["num_steps"]) != cfg["num_steps"]:
        C.fail(f"student '{path}' learned a {ck['config']['num_steps']}-step teacher but --num_steps is {cfg['num_steps']}; "
               f"pass --num_steps {ck['config']['num_steps']}")
    return C.load_student(ck, teacher, dict(cfg, dropout=0.0), path, device).eval().requires_grad_(False)


@torch.no_grad()
def sample_batches(cfg, teacher, models, batches, device, tag, w=None, secs=None):
    """The one sampling path of every protocol: each model on each of this rank's
    (seeds, conditions) batches, from the same noise; yields {name: x (float32)} per batch.
    The teacher's outputs are cached in eval/teacher_samples_<tag>_*.pt, keyed by what
    made them: teacher, solver, guidance, dtype, device type, torch and the batches
    themselves (their seeds and conditions name this rank's share, and the batching
    changes float rounding). So they are solved once (toy: 1000 x 35 NFE; SD: 30k x 100
    NFE, about 20 minutes on 8 H100s) and read back by later evaluations. `secs`, when
    given, receives each model's seconds per image, the teacher's as cached with its samples."""
    cond_list = lambda c: c.tolist() if torch.is_tensor(c) else list(c)
    key = dict(teacher=teacher.teacher_id, solver=teacher.solver_name(), guidance=cfg["guidance"] if w is None else w,
               dtype=cfg["teacher_dtype"], device=device.type, torch=torch.__version__,
               batches=[(list(map(int, s)), cond_list(c)) for s, c in batches])
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cfg["out_dir"], "eval", f"teacher_samples_{tag}_{h}.pt")
    cached = None
    if "teacher" in models and os.path.isfile(path):
        C.print0(f"teacher samples: read from '{path}' (same teacher, solver, guidance, seeds, dtype, device, batches)")
        cached = C.load_checkpoint(path, "cached teacher samples (delete it to re-solve)", keys=("x", "sec"))
    total, done, solved = dict.fromkeys(models, 0.0), 0, []
    for seeds, cond in tqdm(batches, desc=tag, disable=not C.is_main() or len(batches) < 2):
        z, out = C.seed_noise(seeds, teacher.z_shape).to(device), {}
        for name, fn in models.items():
            if name == "teacher" and cached:
                out[name] = cached["x"][done:done + len(seeds)].to(device)
                continue
            sec, x = C.timed(lambda: fn(z, cond, w), device)  # GPU synchronised: the time of the work
            total[name] += sec
            out[name] = x.float()
            if name == "teacher":
                solved.append(out[name].cpu())
        done += len(seeds)
        yield out
    if "teacher" in models:
        if cached:
            total["teacher"] = cached["sec"]
        elif solved:
            C.atomic(path, lambda f: torch.save(dict(x=torch.cat(solved), sec=total["teacher"]), f))
    if secs is not None:
        secs.update({name: s / max(1, done) for name, s in total.items()})


def collect(stream):
    """{name: x} of every batch of a sample_batches stream, concatenated on the CPU."""
    outs = {}
    for out in stream:
        for name, x in out.items():
            outs.setdefault(name, []).append(x.cpu())
    return {name: torch.cat(v) for name, v in outs.items()}


def rank_batches(seeds, conds, rank, world, B):
    """This rank's share (seeds[rank::world]) in batches of B: [(seeds, conditions)]."""
    mine = list(range(len(seeds)))[rank::world]
    pick = lambda part: conds[part] if torch.is_tensor(conds) else [conds[j] for j in part]
    return [([seeds[j] for j in mine[i:i + B]], pick(mine[i:i + B])) for i in range(0, len(mine), B)]


def model_table(cfg, teacher, device, students):
    """name -> callable(z, cond) -> x, plus NFE per model; `students` is validate's {name: (path, checkpoint)}."""
    models = {"teacher": lambda z, c, w=None: teacher.solve(z, c, guidance=w)}
    nfe = {"teacher": teacher.nfe}
    found = {}
    for name, (path, ck) in students.items():
        G = load_student(path, teacher, cfg, device, ck)
        if not G.w_cond:
            found[name] = G.cfg["guidance"]
        # a guidance-conditioned student takes w; a fixed-w student ignores it
        models[name] = (lambda G: lambda z, c, w=None: G(z, C.student_cond(teacher, c, device),
                                                         (w if w is not None else cfg["guidance"]) if G.w_cond else None))(G)
        nfe[name] = 1
    teacher_guidance_from_students(cfg, found)
    nfe["teacher"] = teacher.nfe
    return models, nfe


def teacher_guidance_from_students(cfg, found):
    """The teacher row is solved at the guidance the students were distilled at
    (their checkpoints), not at the preset's: an SD-CFG-8 student is compared with
    a CFG-8 teacher. A contradicting --guidance, or students of different
    guidance in one evaluation, is refused."""
    values = sorted(set(found.values()))
    if len(values) > 1:
        C.fail(f"these students were distilled at different guidance scales ({found}); evaluate each group on its own")
    if not values:
        return
    g = values[0]
    if cfg["guidance_flag"] is not None and cfg["guidance_flag"] != g:
        C.fail(f"--guidance {cfg['guidance_flag']} contradicts the students' checkpoints (guidance {g}); drop the flag")
    if g != cfg["guidance"]:
        C.print0(f"teacher guidance {g}: taken from the students' checkpoints (the preset says {cfg['guidance']})")
    cfg["guidance"] = g


def classifier_path(cfg):
    seed = cfg["classifier_seed"]
    return cfg["classifier"] or os.path.join(cfg["out_dir"], "eval", "toy_classifier.pt" if seed == 0 else f"toy_classifier_s{seed}.pt")


def toy_classifier(cfg, device):
    return train_toy_classifier(classifier_path(cfg), seed=cfg["classifier_seed"], log=C.print0,
                                scene=cfg["family"] == "ldm").to(device)


def sample_class_conditional(cfg, teacher, models, device, rank, world):
    """Every model's samples from the evaluation seeds (with their class labels),
    gathered in seed order, and each model's seconds per image."""
    seeds = list(range(EVAL_SEED0, EVAL_SEED0 + cfg["num_samples"]))
    _, labels = teacher.noise_and_condition(seeds)
    secs = {}
    outs = collect(sample_batches(cfg, teacher, models, rank_batches(seeds, labels, rank, world, cfg["batch_per_device"]),
                                  device, "eval", secs=secs))
    return {name: gather_by_rank(x, len(seeds), world) for name, x in outs.items()}, secs, labels


def evaluate_toy(cfg, teacher, models, nfe, clf, device, rank, world):
    eval_dir, n = os.path.join(cfg["out_dir"], "eval"), cfg["num_samples"]
    outs, secs, labels = sample_class_conditional(cfg, teacher, models, device, rank, world)
    if rank != 0:
        return None
    real, real_y = toy_dataset(n, "test")
    feats = lambda x: torch.cat([clf.features(x[i:i + 500].to(device)).cpu() for i in range(0, len(x), 500)])
    with torch.no_grad():
        x_teacher = outs["teacher"].clamp(-1, 1)
        f_real, f_teacher = feats(real), feats(x_teacher)
        rows = {}
        for name, x in outs.items():
            x = x.clamp(-1, 1)
            f = feats(x)
            p, r = precision_recall(f_real, f)
            # fidelity to the teacher, same z: MSE in pixels, and (the DreamSim idea) cosine distance in features
            rows[name] = dict(fid_toy=fid_from_features(f_real, f), precision=p, recall=r,
                              class_acc=classify(clf, x.to(device)).cpu().eq(labels).float().mean().item(),
                              diversity=diversity(f, labels), fidelity_mse=fidelity(x, x_teacher),
                              fidelity_feat=fidelity(f, f_teacher, lambda a, b: 1 - F.cosine_similarity(a, b, dim=1)),
                              sec_per_img=secs[name], nfe=nfe[name])
        rows["real data"] = dict(fid_toy=fid_from_features(f_real, feats(toy_dataset(n, "val")[0])), precision=None,
                                 recall=None, class_acc=classify(clf, real.to(device)).cpu().eq(real_y).float().mean().item(),
                                 diversity=diversity(f_real, real_y), fidelity_mse=None, fidelity_feat=None,
                                 sec_per_img=None, nfe=None)
    write_grids(outs, teacher, eval_dir, labels, cfg, models, device)
    return rows


@torch.no_grad()
def write_grids(outs, teacher, eval_dir, conds, cfg, models, device):
    """compare.png: rows of seeds, columns teacher | stage 1 | stage 2 | ... (same z);
    diversity.png: one condition, many seeds, a row per model (Fig. A5)."""
    k = min(cfg["grid_rows"], len(next(iter(outs.values()))))
    if torch.is_tensor(conds):  # one row per class where possible
        picks = [int((conds == c).nonzero()[0]) for c in conds.unique()[:k]]
    else:
        picks = list(range(k))
    cols = list(outs)
    imgs = torch.stack([teacher.to_images(outs[c][i:i + 1].to(device))[0].cpu() for i in picks for c in cols])
    C.save_image_grid(imgs, os.path.join(eval_dir, "compare.png"), ncol=len(cols))
    seeds = list(range(EVAL_SEED0 + 10_000_000, EVAL_SEED0 + 10_000_000 + cfg["diversity_seeds"]))
    one = conds[picks[0]].repeat(len(seeds)) if torch.is_tensor(conds) else [conds[picks[0]]] * len(seeds)
    out = collect(sample_batches(cfg, teacher, models, [(seeds, one)], device, "diversity"))
    rows = [teacher.to_images(x.to(device)).cpu() for x in out.values()]
    C.save_image_grid(torch.cat(rows), os.path.join(eval_dir, "diversity.png"), ncol=len(seeds))
    C.save_text("compare.png columns: " + " | ".join(cols) + "\ndiversity.png rows: " + " | ".join(models) + "\n",
                        os.path.join(eval_dir, "grids.txt"))


def count_name(n):
    """30000 -> '30k' (the paper's column names: FID-30k, CLIP-5k, ...)."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


@torch.no_grad()
def real_statistics(cfg, paths, extract, device, rank, world, load, keep=0, net="inception"):
    """Inception mean and covariance of every real image in `paths` (split across ranks),
    plus `keep` of their features (a fixed random subset) for precision/recall.
    Computed once, then read back from <out_dir>/eval/real_stats_*.pt."""
    key = dict(n=len(paths), first=paths[0], last=paths[-1], net=net, keep=keep)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cfg["out_dir"], "eval", f"real_stats_{h}.pt")
    if os.path.isfile(path):
        C.print0(f"real statistics: read from '{path}' ({len(paths)} images)")
        return C.load_checkpoint(path, "cached real statistics (delete it to recompute)", keys=("mu", "sigma", "feats"))
    mine, B = list(range(len(paths)))[rank::world], cfg["batch_per_device"]
    f = [extract(torch.stack([load(paths[j]) for j in mine[i:i + B]]).to(device)).cpu()
         for i in tqdm(range(0, len(mine), B), desc="real images", disable=rank != 0)]
    f = gather_by_rank(torch.cat(f), len(paths), world)
    mu, sigma = feature_stats(f)
    pick = torch.randperm(len(f), generator=torch.Generator().manual_seed(0))[:keep]
    out = dict(mu=mu, sigma=sigma, feats=f[pick])
    if rank == 0:
        C.atomic(path, lambda fh: torch.save(out, fh))
    return out


def evaluate_text_to_image(cfg, teacher, models, nfe, coco, device, rank, world):
    """§4's protocol (PROTOCOLS) for every model on COCO captions, seeds split across
    ranks: FID against every real image of the split, CLIP score, precision/recall
    (coco2014), DreamSim-5k to the teacher and DreamDiv."""
    nets = load_feature_nets(cfg, device)
    proto = PROTOCOLS[cfg["protocol"]]
    n, B = cfg["num_samples"], cfg["batch_per_device"]
    prompts, real_paths, load = coco
    k = min(proto["div"] if cfg["div_prompts"] is None else cfg["div_prompts"], n)
    real = real_statistics(cfg, real_paths, nets["inception"], device, rank, world, load, keep=min(n, proto["pr"]),
                           net=nets.get("name", "inception"))
    with torch.no_grad():  # the feature nets are trained (toy) or loaded above, with gradients
        acc, keep, secs = {name: dict(inc=[], clip=[], dsim=[]) for name in models}, {}, {}
        batches = rank_batches([EVAL_SEED0 + j for j in range(n)], prompts, rank, world, B)
        for i, imgs in enumerate(sample_batches(cfg, teacher, models, batches, device, "eval", secs=secs)):
            seeds, cond = batches[i]
            keep = keep or imgs  # the first batch, for the grids
            imgs = {name: teacher.to_images(x) for name, x in imgs.items()}
            ds = [q for q, s in enumerate(seeds) if s - EVAL_SEED0 < DREAMSIM_N]  # DreamSim-5k: to the teacher's image, same z
            for name, img in imgs.items():
                acc[name]["inc"].append(nets["inception"](img).cpu())
                acc[name]["clip"].append(nets["clip"](img, cond).cpu())
                acc[name]["dsim"].append(nets["dreamsim"](img[ds], imgs["teacher"][ds]).cpu() if ds else torch.zeros(0))
        div = {name: [] for name in models}  # DreamDiv: 8 seeds per prompt, the 28 pairs of its images in one batch
        div_batches = [([EVAL_SEED0 + 50_000_000 + 8 * p + s for s in range(8)], [prompts[p]] * 8)
                       for p in range(k)[rank::world]]
        a, b = torch.triu_indices(8, 8, 1)
        for imgs in sample_batches(cfg, teacher, models, div_batches, device, "dreamdiv"):
            for name, x in imgs.items():
                img = teacher.to_images(x)
                div[name].append(nets["dreamsim"](img[a], img[b]).mean().cpu().view(1))
    rows, m, c = {}, min(n, proto["pr"]), count_name(n)
    for name in models:
        f = gather_by_rank(torch.cat(acc[name]["inc"]), n, world)
        row = {f"fid_{c}": frechet_distance(real["mu"], real["sigma"], *feature_stats(f)),
               f"{nets.get('score', 'clip')}_{c}": gather_by_rank(torch.cat(acc[name]["clip"]), n, world).mean().item()}
        if m:  # precision/recall on 10k, as in the paper (coco2014 only)
            row[f"precision_{count_name(m)}"], row[f"recall_{count_name(m)}"] = precision_recall(real["feats"][:m], f[:m])
        row[f"dreamdiv_{count_name(k)}"] = gather_by_rank(torch.cat(div[name]), k, world).mean().item() if k else None
        dsim = gather_by_rank(torch.cat(acc[name]["dsim"]), min(n, DREAMSIM_N), world)
        rows[name] = dict(row, **{f"dreamsim_{count_name(len(dsim))}": dsim.mean().item()},
                          sec_per_img=secs[name], nfe=nfe[name])
    if rank == 0:
        keep = {name: x.cpu() for name, x in keep.items()}
        write_grids(keep, teacher, os.path.join(cfg["out_dir"], "eval"), batches[0][1], cfg, models, device)
        C.save_text("\n".join(f"{i}: {p}" for i, p in enumerate(batches[0][1][:cfg["grid_rows"]])) + "\n",
                    os.path.join(cfg["out_dir"], "eval", "prompts.txt"))
    return rows


def evaluate_cifar10(cfg, teacher, models, nfe, ref, device, rank, world):
    """Table 6: FID-50k of each model against the training set's Inception statistics,
    as EDM's fid.py computes it (random class labels, uint8 images, the TF Inception's
    2048 pool features), and fidelity to the teacher from the same z."""
    n, inception = cfg["num_samples"], load_cifar_inception(device)  # first: a missing package stops before sampling
    dim = inception(torch.zeros(1, *teacher.z_shape, dtype=torch.uint8, device=device)).shape[1]
    if isinstance(ref, dict) and len(ref["mu"]) != dim:
        C.fail(f"--fid_ref: its statistics have {len(ref['mu'])} features, the Inception's {dim}")
    outs, secs, labels = sample_class_conditional(cfg, teacher, models, device, rank, world)
    if isinstance(ref, list):  # a folder of real images: its statistics, computed once (all ranks) and cached
        ref = real_statistics(cfg, ref, inception, device, rank, world, read_cifar_image,
                              net="inception-tf-uint8")
    if rank != 0:
        return None
    feats = lambda x: torch.cat([inception(to_uint8(x[i:i + 500]).to(device)).cpu() for i in range(0, len(x), 500)])
    c = count_name(n)
    rows = {name: {f"fid_{c}": frechet_distance(ref["mu"], ref["sigma"], *feature_stats(feats(x))),
                   "fidelity_mse": fidelity(x.clamp(-1, 1), outs["teacher"].clamp(-1, 1)),
                   "sec_per_img": secs[name], "nfe": nfe[name]} for name, x in outs.items()}
    write_grids(outs, teacher, os.path.join(cfg["out_dir"], "eval"), labels, cfg, models, device)
    return rows


def to_uint8(x):
    """[-1, 1] -> uint8 in [0, 255], as EDM's generate.py saves its PNGs."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def read_cifar_image(path):
    """A real image as uint8 (3, H, W)."""
    from PIL import Image
    with C.or_fail(f"--fid_ref image '{path}' is unreadable", "replace or remove it"):
        return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def read_fid_ref(path, size):
    """--fid_ref: EDM's reference statistics (.npz with mu (2048,) and sigma (2048, 2048)),
    or a folder of real size x size images (returned as its sorted image paths, each
    header checked here, before any sampling)."""
    if path and os.path.isdir(path):
        found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith((".png", ".jpg", ".jpeg")))
        if not found:
            C.fail(f"--fid_ref folder '{path}' holds no .png/.jpg images")
        from PIL import Image
        for p in found:  # the headers only; the pixels are read once the statistics are computed
            with C.or_fail(f"--fid_ref image '{p}' is unreadable", "replace or remove it"):
                w, h = Image.open(p).size
            if (w, h) != (size, size):
                C.fail(f"--fid_ref image '{p}' is {w}x{h}, not {size}x{size} as the training set")
        return found
    if not path:
        C.fail("--fid_ref: cifar10's FID needs the real statistics: EDM's reference .npz or a folder of real images")
    if not os.path.isfile(path):
        C.fail(f"--fid_ref '{path}' does not exist: pass EDM's reference statistics (e.g. cifar10-32x32.npz) or a folder of real images")
    with C.or_fail(f"--fid_ref '{path}' is not a .npz file with mu and sigma"):
        with np.load(path) as f:
            mu, sigma = torch.from_numpy(f["mu"]).double(), torch.from_numpy(f["sigma"]).double()
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        C.fail(f"--fid_ref '{path}': mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} are not a finite mean and covariance")
    return dict(mu=mu, sigma=sigma)


@torch.no_grad()
def guidance_sweep(cfg, teacher, models, clf, device, n=500):
    """Beyond the paper: fidelity to the teacher (MSE, same z) and class accuracy
    at each guidance scale w, for every student; grid rows w, columns alternate
    teacher | student for a few classes (guidance.png)."""
    eval_dir = os.path.join(cfg["out_dir"], "eval")
    seeds = list(range(EVAL_SEED0 + 20_000_000, EVAL_SEED0 + 20_000_000 + n))
    _, labels = teacher.noise_and_condition(seeds)
    table, rows = {}, []
    for w in cfg["eval_w"]:
        out = collect(sample_batches(cfg, teacher, models, rank_batches(seeds, labels, 0, 1, 250), device, "guidance", w=w))
        table[f"w={w:g}"] = {name: dict(fidelity_mse=fidelity(x.clamp(-1, 1), out["teacher"].clamp(-1, 1)),
                                        class_acc=classify(clf, x.clamp(-1, 1).to(device)).cpu().eq(labels).float().mean().item())
                             for name, x in out.items()}
        picks = [int((labels == c).nonzero()[0]) for c in range(5)]
        rows.append(torch.stack([out[name][i] for i in picks for name in out]))
    C.save_image_grid(torch.cat(rows).clamp(-1, 1), os.path.join(eval_dir, "guidance.png"), ncol=len(rows[0]))
    return table


def seed_groups(rows):
    """Rows 'name #1', 'name #2', ... (one --students entry with several
    checkpoints, e.g. seeds) -> {name: {metric: {mean, std, n}}}; std is the
    sample standard deviation over the checkpoints."""
    groups = {}
    for name, r in rows.items():
        m = re.fullmatch(r"(.*) #\d+", name)
        if m:
            groups.setdefault(m[1], []).append(r)
    out = {}
    for g, rs in groups.items():
        cols = [c for c in rs[0] if all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rs)]
        out[g] = {c: dict(mean=float(np.mean([r[c] for r in rs])), std=float(np.std([r[c] for r in rs], ddof=min(1, len(rs) - 1))),
                          n=len(rs)) for c in cols}
    return out


def markdown_table(rows):
    cols = list(next(iter(rows.values())))
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(fmt(r[c]) for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def benchmark_speed(cfg, device, teacher_given):
    """Fig. 3: one-step student vs the teacher's full solver on the same device.
    It times --teacher (a diffusers folder or hub id) when given; otherwise the
    preset's real architecture with random weights (--teacher random), for
    benchmarking only. Reports time per latent, the achieved ratio, and that ratio
    over the ideal ratio from per-call U-Net times (1.0 = no overhead); then, with
    the VAE decode that both need added, per image, as Fig. 3 times them (0.09 s vs
    2.59 s for SD1.5 on an A100). (Fig. 4's loss benchmark: 02 --speed.)"""
    steps = cfg.get("speed_steps") or cfg["num_steps"]
    if cfg["family"] != "ldm":
        C.fail("--speed measures the SD1.5/SDXL student vs DDIM teacher; use --preset sd15 or sdxl")
    teacher = C.LDMTeacher(dict(cfg, num_steps=steps, teacher=cfg["teacher"] if teacher_given else "random"), device,
                           cfg["teacher_dtype"])
    unet, encode = teacher.unet, (lambda n: teacher.encode_prompts(["a photo"] * n))
    dt = next(unet.parameters()).dtype
    z = torch.randn(1, *teacher.z_shape, device=device)
    T, alpha_bar = teacher.T, teacher.alphas_cumprod[teacher.T].to(device)

    def student():  # Eq. 8: one U-Net call
        eps = unet(z.to(dt), T, **encode(1)).sample.float()
        return C.x0_from_model_output(eps, z, alpha_bar, teacher.prediction_type)
    teacher_solve = lambda: teacher.solve(z, ["a photo"])  # DDIM + CFG, exactly as 01 makes the pairs
    cfg_on = C.guided(cfg["guidance"])  # then the teacher's U-Net calls carry cond and uncond (batch 2)
    text = lambda: teacher.encode_prompts(["a photo"], with_uncond=cfg_on)
    cond1, cond_t = encode(1), text()
    x0, _ = student(), teacher_solve()  # warm-up (x0: the latent the decode below is timed on)
    (t_student, _), (t_teacher, _) = C.timed(student, device, 3), C.timed(teacher_solve, device, 1)
    (t_text1, _), (t_text_t, _) = C.timed(lambda: encode(1), device, 3), C.timed(text, device, 3)
    u1, _ = C.timed(lambda: unet(z.to(dt), T, **cond1), device, 3)
    u_t, _ = C.timed(lambda: unet(torch.cat([z] * (2 if cfg_on else 1)).to(dt), T, **cond_t), device, 3)
    t_decode, _ = C.timed(lambda: teacher.decode(x0), device, 3)
    ideal = (steps * u_t + t_text_t) / (u1 + t_text1)
    out = dict(student_s_per_img=round(t_student, 4), teacher_s_per_img=round(t_teacher, 4), teacher_steps=steps,
               speedup=round(t_teacher / t_student, 2), ideal_speedup_from_unet_calls=round(ideal, 2),
               achieved_over_ideal=round(t_teacher / t_student / ideal, 3),
               teacher_overhead_over_unet_calls=round((t_teacher - t_text_t) / (steps * u_t) - 1, 4),
               student_overhead_over_unet_call=round((t_student - t_text1) / u1 - 1, 4),
               unet_call_s=dict(batch1=round(u1, 4), teacher=round(u_t, 4)), text_encode_s=round(t_text1, 4), device=str(device),
               vae_decode_s=round(t_decode, 4), with_decode=dict(
                   student_s_per_img=round(t_student + t_decode, 4), teacher_s_per_img=round(t_teacher + t_decode, 4),
                   speedup=round((t_teacher + t_decode) / (t_student + t_decode), 2)))
    return out


def _need(pkg, pip_name, what):
    import importlib
    try:
        return importlib.import_module(pkg)
    except ImportError:
        C.fail(f"{what} needs the optional package '{pip_name}': pip install {pip_name}")


def _resize(x, size):
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def clean_resize(img, size):
    """clean-fid's "clean" resize of one uint8 (H, W, 3) image (its make_resizer("PIL",
    False, "bicubic", (size, size))): each channel a float32 PIL image, bicubic, clipped to
    [0, 255], not quantised after."""
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(img[:, :, k].astype(np.float32)).resize((size, size), Image.BICUBIC)).clip(0, 255)
                     for k in range(3)], 2).astype(np.float32)


def inception_input(x, via=256, size=299):
    """FID's input as GigaGAN's protocol and clean-fid make it (§4): [-1, 1] images (N, 3, H, W),
    generated or real, become uint8 (as saved PNGs), then PIL bicubic (antialiased) to `via` px
    as uint8 (512 -> 256), then clean-fid's own resizer to 299 when clean-fid is installed
    (clean_resize, the same PIL calls, otherwise). Returns (N, 3, size, size) float in [0, 255]."""
    from PIL import Image
    try:
        from cleanfid.resize import make_resizer
        resize = make_resizer("PIL", False, "bicubic", (size, size))
    except ImportError:
        resize = lambda im: clean_resize(im, size)
    out = []
    for im in C.to_uint8(x):
        if im.shape[0] != via:
            im = np.asarray(Image.fromarray(im).resize((via, via), Image.BICUBIC))
        out.append(resize(im))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device)


def load_feature_nets(cfg, device):
    """dict(inception=f(imgs) -> (N, 2048), clip=f(imgs, prompts) -> (N,) cosine,
    dreamsim=f(a, b) -> (N,) distance). FID's input follows the paper's protocol
    (inception_input: uint8, 512 -> 256 -> 299, clean-fid's bicubic; Parmar et al.). The toy protocol
    puts a toy classifier in each role (its features; caption agreement)."""
    if cfg["protocol"] == "toy":
        clf = toy_classifier(cfg, device)
        agree = lambda x, prompts: classify(clf, x).eq(caption_attributes(prompts).to(x.device)).all(1).float()
        dist = lambda a, b: 1 - F.cosine_similarity(clf.features(a), clf.features(b), dim=1)
        return dict(inception=clf.features, clip=agree, dreamsim=dist, name=f"toy-classifier:{classifier_path(cfg)}",
                    score="caption")
    nets = {}
    try:
        feats = _need("cleanfid.features", "clean-fid", "FID")
        # no DataParallel (clean-fid's default): under torchrun each rank extracts its own shard on its own GPU
        model = feats.build_feature_extractor("clean", device, use_dataparallel=False)
        nets["inception"], nets["name"] = lambda x: model(inception_input(x)), "clean-fid:uint8-256-299"
    except SystemExit:
        tf_inception = load_cifar_inception(device, "FID (clean-fid or torch-fidelity)")  # the same TF Inception, fed 299 px
        nets["inception"] = lambda x: tf_inception(inception_input(x).round())
        nets["name"] = "torch-fidelity:uint8-256-299"  # the preprocessing is part of the cached statistics' key
    oc = _need("open_clip", "open_clip_torch", "the CLIP score")
    clip, _, _ = oc.create_model_and_transforms("ViT-g-14", pretrained="laion2b_s34b_b88k", device=device)
    tok = oc.get_tokenizer("ViT-g-14")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)

    def clip_score(x, prompts):
        img = clip.encode_image(((_resize(x, 224) + 1) / 2 - mean) / std)
        txt = clip.encode_text(tok(prompts).to(device))
        return F.cosine_similarity(img, txt).float()
    nets["clip"] = clip_score
    ds = _need("dreamsim", "dreamsim", "DreamDiv / DreamSim-5k")
    dmodel, _ = ds.dreamsim(pretrained=True, device=device)
    nets["dreamsim"] = lambda a, b: dmodel((_resize(a, 224) + 1) / 2, (_resize(b, 224) + 1) / 2).flatten().float()
    return nets


def load_cifar_inception(device, what="CIFAR10 FID"):
    """CIFAR10's FID features as EDM's fid.py takes them: uint8 images at their own size
    into TF's 2015-12-05 Inception, which resizes to 299 itself (torch-fidelity's port
    of that network): (N, 3, H, W) uint8 -> (N, 2048)."""
    tf = _need("torch_fidelity.feature_extractor_inceptionv3", "torch-fidelity", what)
    model = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).to(device).eval()
    return lambda x: model(x.to(device, torch.uint8))[0]


def load_coco(root, n, seed, split="val2014"):
    """COCO captions of `split`: n captions sampled deterministically (one per image),
    and the paths of every image of the split (the real set of FID). Layout:
    <root>/annotations/captions_<split>.json, <root>/<split>/."""
    ann = os.path.join(root or "", "annotations", f"captions_{split}.json")
    if not os.path.isfile(ann):
        C.fail(f"COCO captions not found at '{ann}' (pass --coco ROOT with annotations/ and {split}/)")
    with C.or_fail(f"'{ann}' is not a COCO captions file"):
        data = json.load(open(ann))
        files = {im["id"]: os.path.join(root, split, im["file_name"]) for im in data["images"]}
        caps = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], a["caption"].strip())
    ids = sorted(caps)
    if n > len(ids):
        C.fail(f"--num_samples {n}: '{ann}' has captions for only {len(ids)} images")
    missing = [files[i] for i in sorted(files) if not os.path.isfile(files[i])]
    if missing:
        C.fail(f"{len(missing)} COCO images are missing, e.g. '{missing[0]}'")
    g = torch.Generator().manual_seed(seed)
    pick = [ids[i] for i in torch.randperm(len(ids), generator=g)[:n].tolist()]
    return [caps[i] for i in pick], [files[i] for i in sorted(files)], lambda p: C.load_image(p, 256)


def toy_captions(n):
    """The toy protocol's COCO: the captions of n test seeds of toy_sd's world, and
    those seeds as the real set, with their images rendered once."""
    seeds = list(range(SPLITS["test"], SPLITS["test"] + n))
    imgs, captions, _ = C.toy_scene(seeds)
    return captions, seeds, lambda s: imgs[s - SPLITS["test"]]


def student_paths(cfg, explicit_only=False):
    """The rows: stage 1 and stage 2 (when present), then --students ('name=path', or
    'name=p1;p2;p3' for several seeds of one row: 'name #k')."""
    paths = {} if explicit_only else {"stage 1": os.path.join(cfg["out_dir"], "distill", "student_ema.pt"),
                                      "stage 2": os.path.join(cfg["out_dir"], "gan", "student_ema.pt")}
    for item in filter(None, (cfg["students"] or "").split(",")):
        name, _, path = item.rpartition("=")  # names may contain "=", paths rarely do
        runs = [p.strip() for p in path.split(";") if p.strip()]
        if not name.strip() or not runs:
            C.fail(f"--students entry '{item}' is not 'name=path' (or 'name=p1;p2;p3')")
        paths.update({name.strip(): runs[0]} if len(runs) == 1 else {f"{name.strip()} #{k}": p for k, p in enumerate(runs, 1)})
    return paths


def validate(cfg):
    """Every file this evaluation reads, before any sampling (the flags' types checked
    the values), read once: returns {name: (path, checkpoint)} of the students that
    exist, and what the metrics compare with: the COCO captions and image paths
    (sd15/sdxl), the real statistics or images (cifar10), or the toy's cached
    evaluation classifier (None when it is still to be trained)."""
    explicit, students = student_paths(cfg, explicit_only=True), {}
    for name, path in student_paths(cfg).items():
        if name not in explicit and not os.path.isfile(path):
            C.print0(f"note: no {name} student at '{path}'; skipping that row")  # stage 1 / 2 appear when their runs exist
            continue
        students[name] = path, C.load_student_file(path, f"student of 03/04 ({name})")
    if cfg["speed"]:
        return students, None
    if cfg["family"] == "ldm":
        if cfg["protocol"] == "toy":
            return students, toy_captions(cfg["num_samples"])
        return students, load_coco(cfg["coco"], cfg["num_samples"], cfg["seed"], PROTOCOLS[cfg["protocol"]]["split"])
    if cfg["arch"] != "toy":
        return students, read_fid_ref(cfg["fid_ref"], cfg["resolution"])
    cached = os.path.exists(classifier_path(cfg))
    return students, toy_classifier(cfg, torch.device("cpu")) if cached else None


def main(argv=None):
    cfg, given = C.parse_config(__doc__, FLAGS, argv)
    cfg["guidance_flag"] = cfg["guidance"] if "guidance" in given else None  # else the students' checkpoints decide
    proto = PROTOCOLS.get(cfg.get("protocol"))
    if cfg["family"] == "ldm" and proto is None and not cfg["speed"]:
        C.fail(f"--protocol: the preset sets none; pass one of {', '.join(PROTOCOLS)}")
    cfg["num_samples"] = cfg["num_samples"] or (1000 if cfg["arch"] == "toy" else 50_000 if cfg["family"] == "edm"
                                                else proto["n"] if proto else 0)
    about = ("toy: FID-toy and the rest in the features of a toy classifier" if cfg["arch"] == "toy" else
             "CIFAR10 (Table 6): FID against --fid_ref, as EDM's fid.py" if cfg["family"] == "edm" else
             proto["about"] if proto else "") + f"; {cfg['num_samples']} samples per model"
    students, real = validate(cfg)
    rank, _, world, device = C.setup_distributed(cfg["dist_timeout_min"])
    if cfg["speed"]:
        res = benchmark_speed(cfg, device, "teacher" in given)
        if rank == 0:
            C.save_json(res, os.path.join(cfg["out_dir"], "eval", "speed.json"))
            print(json.dumps(res, indent=2))
        return C.cleanup()
    teacher = C.load_teacher(cfg, device, cfg["teacher_dtype"])
    models, nfe = model_table(cfg, teacher, device, students)
    if cfg["arch"] == "toy":
        clf = (real or toy_classifier(cfg, device)).to(device)
        rows = evaluate_toy(cfg, teacher, models, nfe, clf, device, rank, world)
        if cfg["eval_w"] and rank == 0:
            sweep = guidance_sweep(cfg, teacher, models, clf, device)
            C.save_json(sweep, os.path.join(cfg["out_dir"], "eval", "guidance.json"))
            print("guidance sweep (fidelity MSE to the teacher at each w):\n" + markdown_table(
                {w: {name: r["fidelity_mse"] for name, r in t.items()} for w, t in sweep.items()}))
    elif cfg["family"] == "edm":
        rows = evaluate_cifar10(cfg, teacher, models, nfe, real, device, rank, world)
    else:
        rows = evaluate_text_to_image(cfg, teacher, models, nfe, real, device, rank, world)
    if rank == 0:
        eval_dir = os.path.join(cfg["out_dir"], "eval")
        table = f"protocol: {about}\n\n" + markdown_table(rows)
        groups = seed_groups(rows)
        if groups:
            C.save_json(groups, os.path.join(eval_dir, "groups.json"))
            table += "\nmean ± std over each row's checkpoints (groups.json):\n\n" + markdown_table(
                {g: {c: f"{v['mean']:.4g} ± {v['std']:.2g}" for c, v in m.items()} | {"n": next(iter(m.values()))["n"]}
                 for g, m in groups.items()})
        C.save_json(rows, os.path.join(eval_dir, "metrics.json"))
        C.save_text(table, os.path.join(eval_dir, "results.md"))
        print(table + f"wrote {eval_dir}/metrics.json, results.md, compare.png, diversity.png")
    C.cleanup()


if __name__ == "__main__":
    main()
