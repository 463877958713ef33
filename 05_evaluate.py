"""
Evaluation (§4, Tables 1-5, Fig. 1-3): realism, diversity, fidelity to the
teacher and speed of the teacher and the one-step students, plus side-by-side
grids of the teacher and the students from the same noise.

  toy      FID-toy (features of a classifier trained on the toy data, never the
           loss network), precision/recall (k=3), class accuracy, diversity
           (mean within-class pairwise feature distance), fidelity to the teacher
           (MSE to the teacher's x from the same z), time per image, NFE.
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
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common as C

DEFAULTS = dict(
    preset="toy",
    out_dir=None,
    teacher=None,
    students=None,           # extra rows: "name=path,name=path" of student_ema.pt files
    num_samples=0,           # samples per model (0 = preset default) (toy 2000; paper 30k for FID, 10k for P/R, 5k for DreamSim)
    batch_per_device=None,
    grid_rows=10,
    diversity_seeds=16,      # diversity grid: one condition, this many seeds
    div_prompts=500,         # sd15/sdxl DreamDiv: prompts x 8 seeds each (paper: 5k COCO2017 prompts)
    coco=None,               # sd15/sdxl: COCO2014 root with val2014/ and annotations/captions_val2014.json
    dtype="float32",
    seed=0,
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
        name, _, path = item.partition("=")
        paths[name.strip()] = path.strip()
    for name, path in paths.items():
        if not os.path.isfile(path):
            C.print0(f"note: no {name} student at '{path}'; skipping that row")
            continue
        G = load_student(path, teacher, cfg, device)
        # a guidance-conditioned student takes w; a fixed-w student ignores it
        models[name] = (lambda G: lambda z, c, w=None: G(z, C.student_cond(teacher, c, device),
                                                         (w if w is not None else cfg["guidance"]) if G.w_cond else None))(G)
        nfe[name] = 1
    return models, nfe


def evaluate_toy(cfg, teacher, device, rank, world):
    eval_dir = os.path.join(cfg["out_dir"], "eval")
    clf = C.train_toy_classifier(os.path.join(eval_dir, "toy_classifier.pt"), log=C.print0).to(device)
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
        f_real = feats(real)
        rows = {}
        for name, x in outs.items():
            x = x.clamp(-1, 1)
            f = feats(x)
            p, r = C.precision_recall(f_real, f)
            rows[name] = dict(fid_toy=C.fid_from_features(f_real, f), precision=p, recall=r,
                              class_acc=C.classify(clf, x.to(device)).cpu().eq(labels).float().mean().item(),
                              diversity=C.diversity(f, labels), fidelity_mse=C.fidelity(x, outs["teacher"].clamp(-1, 1)),
                              sec_per_img=secs[name], nfe=nfe[name])
        rows["real data"] = dict(fid_toy=C.fid_from_features(f_real, feats(C.toy_dataset(n, "val")[0])), precision=None,
                                 recall=None, class_acc=C.classify(clf, real.to(device)).cpu().eq(real_y).float().mean().item(),
                                 diversity=C.diversity(f_real, real_y), fidelity_mse=None, sec_per_img=None, nfe=None)
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
    nets = C.load_feature_nets(cfg, device)
    models, nfe = model_table(cfg, teacher, device)
    n, B = cfg["num_samples"], cfg["batch_per_device"]
    prompts, real_paths = C.load_coco(cfg["coco"], n, cfg["seed"])
    mine = list(range(n))[rank::world]
    acc = {name: dict(inc=[], clip=[], dsim=[], sec=0.0) for name in models}
    real, keep = [], {name: [] for name in models}
    with torch.no_grad():
        for i in tqdm(range(0, len(mine), B), desc="sampling", disable=rank != 0):
            part = mine[i:i + B]
            z = torch.stack([torch.randn(teacher.z_shape, generator=torch.Generator().manual_seed(EVAL_SEED0 + j)) for j in part])
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
            z = torch.stack([torch.randn(teacher.z_shape, generator=torch.Generator().manual_seed(EVAL_SEED0 + 50_000_000 + 8 * p + s))
                             for s in range(8)])
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
    clf = C.train_toy_classifier(os.path.join(eval_dir, "toy_classifier.pt"), log=C.print0).to(device)
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


def markdown_table(rows):
    cols = list(next(iter(rows.values())))
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(fmt(r[c]) for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = C.add_preset_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), DEFAULTS)
    cfg = C.resolve_config(parser.parse_args(argv))
    cfg["num_samples"] = cfg["num_samples"] or (2000 if cfg["preset"] == "toy" else 30_000)
    rank, _, world, device = C.setup_distributed()
    if cfg["speed"]:
        res = C.benchmark_speed(cfg, device)
        if rank == 0:
            C.atomic_write_json(res, os.path.join(cfg["out_dir"], "eval", "speed.json"))
            print(json.dumps(res, indent=2))
        return C.cleanup()
    teacher = C.load_teacher(cfg, device)
    if cfg["family"] == "edm":
        if cfg["preset"] != "toy":
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
        C.atomic_write_json(rows, os.path.join(eval_dir, "metrics.json"))
        C.atomic_write_text(table, os.path.join(eval_dir, "results.md"))
        print(table + f"wrote {eval_dir}/metrics.json, results.md, compare.png, diversity.png")
    C.cleanup()


if __name__ == "__main__":
    main()
