"""
Evaluation (§4, Tables 1-5, Fig. 1-3): realism, diversity, fidelity to the
teacher and speed of the teacher and the one-step students, plus side-by-side
grids of the teacher and the students from the same noise.

  toy      FID-toy (features of a classifier trained on the toy data, never the
           loss network), precision/recall (k=3), class accuracy, diversity
           (mean within-class pairwise feature distance), fidelity to the teacher
           from the same z (pixel MSE, and feature cosine distance as a toy
           DreamSim), time per image, NFE.
  sd/sdxl  FID on COCO2014 val (clean-fid or torch-fidelity Inception features,
           bicubic antialiased resizing), CLIP score (open_clip ViT-g-14 or
           transformers CLIP), precision/recall, DreamDiv and DreamSim-5k
           (dreamsim); each optional package is imported only when used.

Output: <out_dir>/eval/{metrics.json, results.md, compare.png, diversity.png}

Toy (CPU, ~1 min):   python 05_evaluate.py
Extra rows:          python 05_evaluate.py --students "mse=runs/toy/distill_mse/student_ema.pt,latent=..."
SD1.5 (8 GPUs):      torchrun --nproc_per_node=8 05_evaluate.py --preset sd15 --coco /data/coco2014 --num_samples 30000
Speed (Fig. 3):      python 05_evaluate.py --preset sd15 --speed      (random-weight SD1.5 shapes when no checkpoint)
"""
import argparse
import json
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common as C

DEFAULTS = dict(
    preset="toy",
    out_dir=None,
    teacher=None,
    students=None,           # extra rows "name=path,..." of student_ema.pt files; "name=p1;p2;p3": seeds, + mean ± std
    num_samples=0,           # samples per model (0 = preset default) (toy 2000; paper 30k for FID, 10k for P/R, 5k for DreamSim)
    batch_per_device=None,
    grid_rows=10,
    diversity_seeds=16,      # diversity grid: one condition, this many seeds
    div_prompts=500,         # sd15/sdxl DreamDiv: prompts x 8 seeds each (paper: 5k COCO2017 prompts)
    coco=None,               # sd15/sdxl: COCO2014 root with val2014/ and annotations/captions_val2014.json
    dtype="float32",
    seed=0,
    classifier_seed=0,       # toy: seed of that classifier; rerun with others to see how much FID-toy depends on it
    classifier=None,         # toy: the feature classifier (default <out_dir>/eval/toy_classifier[_s<seed>].pt, trained once);
                             #      share one path across evaluations so that their FID-toy numbers are comparable
    eval_w=None,             # guidance sweep, e.g. "1,2,3": fidelity of each student to the teacher at each w
    speed=False,             # time one-step student vs teacher solver (and E-LatentLPIPS vs LPIPS) and exit
    speed_steps=0,           # teacher steps to time (0 = preset) (default: the preset's); the ratio is reported per full solver
)

EVAL_SEED0 = 2_000_000_000  # evaluation seeds are disjoint from pair seeds and held-out grid seeds


def load_student(path, teacher, cfg, device):
    ck = C.load_checkpoint(path, "student")
    if ck.get("teacher") != teacher.teacher_id:
        C.fail(f"student '{path}' was distilled from '{ck.get('teacher')}', not from this teacher '{teacher.teacher_id}'")
    G = C.Student(teacher, dict(cfg, dropout=0.0, cfg_range=ck["config"].get("cfg_range"))).to(device)
    G.load_state_dict(ck["ema"])
    G.cfg = ck["config"]
    return G.eval().requires_grad_(False)


@torch.no_grad()
def generate(models, teacher, cfg, seeds, conds, device, rank, world):
    """Every model's output for the same seeds (split across ranks by seed);
    gathered on rank 0. Returns {name: x}, {name: seconds per image}."""
    mine = list(range(len(seeds)))[rank::world]
    outs, secs = {n: [] for n in models}, {n: 0.0 for n in models}
    B = cfg["batch_per_device"]
    for i in tqdm(range(0, len(mine), B), desc="sampling", disable=rank != 0):
        part = mine[i:i + B]
        z, _ = teacher.noise_and_condition([seeds[j] for j in part], part)
        cond = conds[part] if torch.is_tensor(conds) else [conds[j] for j in part]
        for name, fn in models.items():
            t = time.perf_counter()
            x = fn(z.to(device), cond)
            if device.type == "cuda":
                torch.cuda.synchronize()
            secs[name] += time.perf_counter() - t
            outs[name].append(x.float().cpu())
    outs = {n: C.gather_by_rank(torch.cat(v), len(seeds), world) for n, v in outs.items()}
    return outs, {n: s / max(1, len(mine)) for n, s in secs.items()}


def model_table(cfg, teacher, device):
    """name -> callable(z, cond) -> x, plus NFE per model."""
    models = {"teacher": lambda z, c, w=None: teacher.solve(z, c, guidance=w)}
    nfe = {"teacher": teacher.nfe}
    paths = {"stage 1": os.path.join(cfg["out_dir"], "distill", "student_ema.pt"),
             "stage 2": os.path.join(cfg["out_dir"], "gan", "student_ema.pt")}
    for item in filter(None, (cfg["students"] or "").split(",")):
        name, _, path = item.rpartition("=")  # names may contain "=", paths rarely do
        runs = [p.strip() for p in path.split(";") if p.strip()]  # several (seeds) of one row: "name #k"
        paths.update({name.strip(): runs[0]} if len(runs) == 1 else {f"{name.strip()} #{k}": p for k, p in enumerate(runs, 1)})
    found = {}
    for name, path in paths.items():
        if not os.path.isfile(path):
            C.print0(f"note: no {name} student at '{path}'; skipping that row")
            continue
        G = load_student(path, teacher, cfg, device)
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


def toy_classifier(cfg, eval_dir, device):
    seed = cfg["classifier_seed"]
    path = cfg["classifier"] or os.path.join(eval_dir, "toy_classifier.pt" if seed == 0 else f"toy_classifier_s{seed}.pt")
    return C.train_toy_classifier(path, seed=seed, log=C.print0).to(device)


def evaluate_toy(cfg, teacher, device, rank, world):
    eval_dir = os.path.join(cfg["out_dir"], "eval")
    clf = toy_classifier(cfg, eval_dir, device)
    models, nfe = model_table(cfg, teacher, device)
    n = cfg["num_samples"]
    seeds = list(range(EVAL_SEED0, EVAL_SEED0 + n))
    _, labels = teacher.noise_and_condition(seeds)
    outs, secs = generate(models, teacher, cfg, seeds, labels, device, rank, world)
    if rank != 0:
        return None
    real, real_y = C.toy_dataset(n, "test")
    feats = lambda x: torch.cat([clf.features(x[i:i + 500].to(device)).cpu() for i in range(0, len(x), 500)])
    with torch.no_grad():
        x_teacher = outs["teacher"].clamp(-1, 1)
        f_real, f_teacher = feats(real), feats(x_teacher)
        rows = {}
        for name, x in outs.items():
            x = x.clamp(-1, 1)
            f = feats(x)
            p, r = C.precision_recall(f_real, f)
            # fidelity to the teacher, same z: MSE in pixels, and (the DreamSim idea) cosine distance in features
            rows[name] = dict(fid_toy=C.fid_from_features(f_real, f), precision=p, recall=r,
                              class_acc=C.classify(clf, x.to(device)).cpu().eq(labels).float().mean().item(),
                              diversity=C.diversity(f, labels), fidelity_mse=C.fidelity(x, x_teacher),
                              fidelity_feat=C.fidelity(f, f_teacher, lambda a, b: 1 - F.cosine_similarity(a, b, dim=1)),
                              sec_per_img=secs[name], nfe=nfe[name])
        rows["real data"] = dict(fid_toy=C.fid_from_features(f_real, feats(C.toy_dataset(n, "val")[0])), precision=None,
                                 recall=None, class_acc=C.classify(clf, real.to(device)).cpu().eq(real_y).float().mean().item(),
                                 diversity=C.diversity(f_real, real_y), fidelity_mse=None, fidelity_feat=None,
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
    scale = max(1, 64 // imgs.shape[-1])
    C.save_image_grid(imgs, os.path.join(eval_dir, "compare.png"), ncol=len(cols), scale=scale)
    seeds = list(range(EVAL_SEED0 + 10_000_000, EVAL_SEED0 + 10_000_000 + cfg["diversity_seeds"]))
    z, _ = teacher.noise_and_condition(seeds, list(range(len(seeds))))
    one = conds[picks[0]].repeat(len(seeds)) if torch.is_tensor(conds) else [conds[picks[0]]] * len(seeds)
    rows = [teacher.to_images(fn(z.to(device), one).float()).cpu() for fn in models.values()]
    C.save_image_grid(torch.cat(rows), os.path.join(eval_dir, "diversity.png"), ncol=len(seeds), scale=scale)
    C.atomic_write_text("compare.png columns: " + " | ".join(cols) + "\ndiversity.png rows: " + " | ".join(models) + "\n",
                        os.path.join(eval_dir, "grids.txt"))


def evaluate_text_to_image(cfg, teacher, device, rank, world):
    """FID (Inception), CLIP score, precision/recall, DreamSim-5k to the teacher
    and DreamDiv for every model, on COCO captions; seeds split across ranks."""
    nets = load_feature_nets(cfg, device)
    models, nfe = model_table(cfg, teacher, device)
    n, B = cfg["num_samples"], cfg["batch_per_device"]
    prompts, real_paths = load_coco(cfg["coco"], n, cfg["seed"])
    mine = list(range(n))[rank::world]
    acc = {name: dict(inc=[], clip=[], dsim=[], sec=0.0) for name in models}
    real, keep = [], {name: [] for name in models}
    with torch.no_grad():
        for i in tqdm(range(0, len(mine), B), desc="sampling", disable=rank != 0):
            part = mine[i:i + B]
            z = C.seed_noise([EVAL_SEED0 + j for j in part], teacher.z_shape)
            cond = [prompts[j] for j in part]
            real.append(nets["inception"](torch.stack([C.load_image(real_paths[j], 256) for j in part]).to(device)).cpu())
            imgs = {}
            for name, fn in models.items():
                t = time.perf_counter()
                x = fn(z.to(device), cond)
                acc[name]["sec"] += time.perf_counter() - t
                imgs[name] = teacher.to_images(x.float())
                acc[name]["inc"].append(nets["inception"](imgs[name]).cpu())
                acc[name]["clip"].append(nets["clip"](imgs[name], cond).cpu())
                if i == 0:
                    keep[name] = x.float().cpu()
            for name in models:  # DreamSim-5k: distance to the teacher's image from the same z
                acc[name]["dsim"].append(nets["dreamsim"](imgs[name], imgs["teacher"]).cpu())
        div = {name: [] for name in models}
        k = min(cfg["div_prompts"], n)
        for p in tqdm(list(range(k))[rank::world], desc="DreamDiv", disable=rank != 0):
            z = C.seed_noise([EVAL_SEED0 + 50_000_000 + 8 * p + s for s in range(8)], teacher.z_shape)
            for name, fn in models.items():
                img = teacher.to_images(fn(z.to(device), [prompts[p]] * 8).float())
                d = [nets["dreamsim"](img[a:a + 1], img[b:b + 1]) for a in range(8) for b in range(a + 1, 8)]
                div[name].append(torch.cat(d).mean().cpu().view(1))
    real = C.gather_by_rank(torch.cat(real), n, world)
    rows = {}
    for name in models:
        f = C.gather_by_rank(torch.cat(acc[name]["inc"]), n, world)
        m = min(n, 10_000)  # precision/recall on 10k, as in the paper
        p, r = C.precision_recall(real[:m], f[:m])
        rows[name] = dict(fid=C.fid_from_features(real, f), clip=C.gather_by_rank(torch.cat(acc[name]["clip"]), n, world).mean().item(),
                          precision=p, recall=r, dreamdiv=C.gather_by_rank(torch.cat(div[name]), k, world).mean().item(),
                          dreamsim_to_teacher=C.gather_by_rank(torch.cat(acc[name]["dsim"]), n, world).mean().item(),
                          sec_per_img=acc[name]["sec"] / max(1, len(mine)), nfe=nfe[name])
    if rank == 0:
        write_grids(keep, teacher, os.path.join(cfg["out_dir"], "eval"), [prompts[j] for j in mine[:B]], cfg, models, device)
        C.atomic_write_text("\n".join(f"{i}: {prompts[j]}" for i, j in enumerate(mine[:cfg["grid_rows"]])) + "\n",
                            os.path.join(cfg["out_dir"], "eval", "prompts.txt"))
    return rows


@torch.no_grad()
def guidance_sweep(cfg, teacher, device, n=500):
    """Beyond the paper: fidelity to the teacher (MSE, same z) and class accuracy
    at each guidance scale w, for every student; grid rows w, columns alternate
    teacher | student for a few classes (guidance.png)."""
    eval_dir = os.path.join(cfg["out_dir"], "eval")
    clf = toy_classifier(cfg, eval_dir, device)
    models, _ = model_table(cfg, teacher, device)
    seeds = list(range(EVAL_SEED0 + 20_000_000, EVAL_SEED0 + 20_000_000 + n))
    z, labels = teacher.noise_and_condition(seeds)
    table, rows = {}, []
    for w in [float(v) for v in cfg["eval_w"].split(",")]:
        out = {name: torch.cat([fn(z[i:i + 250].to(device), labels[i:i + 250], w).float().cpu() for i in range(0, n, 250)])
               for name, fn in models.items()}
        table[f"w={w:g}"] = {name: dict(fidelity_mse=C.fidelity(x.clamp(-1, 1), out["teacher"].clamp(-1, 1)),
                                        class_acc=C.classify(clf, x.clamp(-1, 1).to(device)).cpu().eq(labels).float().mean().item())
                             for name, x in out.items()}
        picks = [int((labels == c).nonzero()[0]) for c in range(5)]
        rows.append(torch.stack([out[name][i] for i in picks for name in out]))
    C.save_image_grid(torch.cat(rows).clamp(-1, 1), os.path.join(eval_dir, "guidance.png"), ncol=len(rows[0]), scale=4)
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
def benchmark_speed(cfg, device):
    """Fig. 3: one-step student vs the teacher's full solver on the same device.
    With --teacher DIR it times that teacher; otherwise random-weight SD1.5 shapes
    (U-Net 860M, CLIP ViT-L text encoder), for benchmarking only. Reports time
    per image, the achieved ratio, and that ratio over the ideal ratio from
    per-call U-Net times (1.0 = no overhead), plus the Fig. 4 loss benchmark."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    steps = cfg.get("speed_steps") or cfg["num_steps"]
    if cfg["family"] != "ldm":
        C.fail("--speed measures the SD1.5/SDXL student vs DDIM teacher; use --preset sd15 or sdxl")
    if cfg.get("teacher") and os.path.isdir(cfg["teacher"]):
        teacher = C.LDMTeacher(dict(cfg, num_steps=steps), device, load_vae=False)
        unet, latent, sched = teacher.unet, teacher.z_shape, teacher.scheduler
        encode, uncond = (lambda n: teacher.encode_prompts(["a photo"] * n)), teacher.encode_uncond
    else:
        torch.manual_seed(0)
        dtype = getattr(torch, cfg["dtype"])
        arch = C.SD_ARCH["sd15"]
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **arch["unet"]).to(device, dtype).eval()
        te = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, **arch["text"][0])).to(device, dtype).eval()
        ids = torch.zeros(1, 77, dtype=torch.long, device=device)
        encode = uncond = lambda n: dict(encoder_hidden_states=te(ids.repeat(n, 1))[0])
        latent = (4, 64, 64)
        sched = C.sd_ddim_scheduler()
        sched.set_timesteps(steps)
    dt = next(unet.parameters()).dtype
    z = torch.randn(1, *latent, device=device)
    T = int(sched.timesteps[0])
    alpha_bar = sched.alphas_cumprod[T].to(device)

    def student():  # Eq. 8: one U-Net call
        eps = unet(z.to(dt), T, **encode(1)).sample.float()
        return C.x0_from_model_output(eps, z, alpha_bar)

    def teacher_solve():  # DDIM + CFG, cond and uncond batched
        cond = C.cat_cond(uncond(1), encode(1))
        x = z.clone()
        for t in sched.timesteps:
            e = unet(torch.cat([x, x]).to(dt), t, **cond).sample.float()
            eu, ec = e.chunk(2)
            x = sched.step(eu + cfg["guidance"] * (ec - eu), t, x).prev_sample
        return x
    cond1 = encode(1)
    cond2 = C.cat_cond(cond1, cond1)
    student(), teacher_solve()  # warm-up
    t_student, t_teacher = C._timed(student, device, 3), C._timed(teacher_solve, device, 1)
    t_text1, t_text2 = C._timed(lambda: encode(1), device, 3), C._timed(lambda: C.cat_cond(uncond(1), encode(1)), device, 3)
    u1 = C._timed(lambda: unet(z.to(dt), T, **cond1), device, 3)
    u2 = C._timed(lambda: unet(torch.cat([z, z]).to(dt), T, **cond2), device, 3)
    ideal = (steps * u2 + t_text2) / (u1 + t_text1)
    out = dict(student_s_per_img=round(t_student, 4), teacher_s_per_img=round(t_teacher, 4), teacher_steps=steps,
               speedup=round(t_teacher / t_student, 2), ideal_speedup_from_unet_calls=round(ideal, 2),
               achieved_over_ideal=round(t_teacher / t_student / ideal, 3),
               teacher_overhead_over_unet_calls=round((t_teacher - t_text2) / (steps * u2) - 1, 4),
               student_overhead_over_unet_call=round((t_student - t_text1) / u1 - 1, 4),
               unet_call_s=dict(batch1=round(u1, 4), batch2=round(u2, 4)), text_encode_s=round(t_text1, 4), device=str(device))
    out["lpips_fig4"] = C.benchmark_lpips_speed(device)
    return out



def _need(pkg, pip_name, what):
    import importlib
    try:
        return importlib.import_module(pkg)
    except ImportError:
        C.fail(f"{what} needs the optional package '{pip_name}': pip install {pip_name}")


def _resize(x, size):
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def load_feature_nets(cfg, device):
    """dict(inception=f(imgs) -> (N, 2048), clip=f(imgs, prompts) -> (N,) cosine,
    dreamsim=f(a, b) -> (N,) distance). Resizing follows the paper's protocol:
    512 -> 256 -> 299, bicubic with antialiasing (Parmar et al.)."""
    nets = {}
    try:
        feats = _need("cleanfid.features", "clean-fid", "FID")
        # no DataParallel (clean-fid's default): under torchrun each rank extracts its own shard on its own GPU
        model = feats.build_feature_extractor("clean", device, use_dataparallel=False)
        nets["inception"] = lambda x: model((_resize(_resize(x, 256), 299).clamp(-1, 1) + 1) * 127.5)
    except SystemExit:
        tf = _need("torch_fidelity.feature_extractor_inceptionv3", "torch-fidelity", "FID (clean-fid or torch-fidelity)")
        model = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).to(device).eval()
        nets["inception"] = lambda x: model(((_resize(_resize(x, 256), 299).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))[0]
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


def load_coco(root, n, seed):
    """COCO2014 val: n captions sampled deterministically (one per image) and the
    real image paths. Layout: <root>/annotations/captions_val2014.json, <root>/val2014/."""
    ann = os.path.join(root or "", "annotations", "captions_val2014.json")
    if not os.path.isfile(ann):
        C.fail(f"COCO captions not found at '{ann}' (pass --coco ROOT with annotations/ and val2014/)")
    data = json.load(open(ann))
    files = {im["id"]: os.path.join(root, "val2014", im["file_name"]) for im in data["images"]}
    caps = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], a["caption"].strip())
    ids = sorted(caps)
    g = torch.Generator().manual_seed(seed)
    pick = [ids[i] for i in torch.randperm(len(ids), generator=g)[:n].tolist()]
    missing = [files[i] for i in pick if not os.path.isfile(files[i])]
    if missing:
        C.fail(f"{len(missing)} COCO images are missing, e.g. '{missing[0]}'")
    return [caps[i] for i in pick], [files[i] for i in pick]


def main(argv=None):
    parser = C.add_preset_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), DEFAULTS)
    args = parser.parse_args(argv)
    cfg = C.resolve_config(args)
    cfg["guidance_flag"] = args.guidance  # given explicitly, or None (then the students' checkpoints decide)
    cfg["num_samples"] = cfg["num_samples"] or (2000 if cfg["arch"] == "toy" else 30_000)
    rank, _, world, device = C.setup_distributed(cfg["dist_timeout_min"])
    if cfg["speed"]:
        res = benchmark_speed(cfg, device)
        if rank == 0:
            C.atomic_write_json(res, os.path.join(cfg["out_dir"], "eval", "speed.json"))
            print(json.dumps(res, indent=2))
        return C.cleanup()
    teacher = C.load_teacher(cfg, device)
    if cfg["family"] == "edm":
        if cfg["arch"] != "toy":
            C.fail("CIFAR10 FID needs Inception features: use the official EDM fid.py on the students' samples")
        rows = evaluate_toy(cfg, teacher, device, rank, world)
        if cfg["eval_w"] and rank == 0:
            sweep = guidance_sweep(cfg, teacher, device)
            C.atomic_write_json(sweep, os.path.join(cfg["out_dir"], "eval", "guidance.json"))
            print("guidance sweep (fidelity MSE to the teacher at each w):\n" + markdown_table(
                {w: {name: r["fidelity_mse"] for name, r in t.items()} for w, t in sweep.items()}))
    else:
        rows = evaluate_text_to_image(cfg, teacher, device, rank, world)
    if rank == 0:
        eval_dir = os.path.join(cfg["out_dir"], "eval")
        table = markdown_table(rows)
        groups = seed_groups(rows)
        if groups:
            C.atomic_write_json(groups, os.path.join(eval_dir, "groups.json"))
            table += "\nmean ± std over each row's checkpoints (groups.json):\n\n" + markdown_table(
                {g: {c: f"{v['mean']:.4g} ± {v['std']:.2g}" for c, v in m.items()} | {"n": next(iter(m.values()))["n"]}
                 for g, m in groups.items()})
        C.atomic_write_json(rows, os.path.join(eval_dir, "metrics.json"))
        C.atomic_write_text(table, os.path.join(eval_dir, "results.md"))
        print(table + f"wrote {eval_dir}/metrics.json, results.md, compare.png, diversity.png")
    C.cleanup()


if __name__ == "__main__":
    main()
