"""
Stage 0 of Diffusion2GAN (§3.1, App. A): run the teacher's ODE from noise z under
condition c and store the (z, c, x) pairs that stages 1 and 2 regress onto.

  toy / cifar10  EDM Heun sampler, 18 steps (35 NFE), ODE state in float64
  sd15 / sdxl    DDIM 50 steps with classifier-free guidance (Eq. 1), cond and
  (and toy_sd)   uncond batched together, matching diffusers' pipelines exactly

Every pair has its own seed (pair i: seed + i); z (and, for toy/cifar10, the
class label) is regenerated from it on the CPU generator, so shards don't depend
on the number of ranks. Shards are written atomically; a rerun skips finished
ones. Output: <out_dir>/pairs/{manifest.json, shard_*.safetensors, pairs.png}.

Toy (CPU, ~2 min):      python 01_make_pairs.py
CIFAR10 (1 GPU):        python 01_make_pairs.py --preset cifar10 --teacher edm-cifar10-32x32-cond-vp.pkl
SD1.5 (8 GPUs):         torchrun --nproc_per_node=8 01_make_pairs.py --preset sd15 --prompts laion_prompts.txt
SDXL (8 GPUs):          torchrun --nproc_per_node=8 01_make_pairs.py --preset sdxl --prompts laion_prompts.txt
Retrain the toy teacher (writes assets/toy_teacher.safetensors, ~15 min CPU):
                        python 01_make_pairs.py --train_teacher
toy_sd (CPU, ~4 min):   python 01_make_pairs.py --preset toy_sd    (prompts: the teacher's captions)
Retrain the toy_sd teacher (writes assets/toy_sd/, ~55 min on 2 CPU cores):
                        python 01_make_pairs.py --preset toy_sd --train_teacher
Throughput vs diffusers' pipeline (same teacher, prompts, z, steps, guidance):
                        python 01_make_pairs.py --preset sd15 --teacher DIR --prompts p.txt --benchmark
"""
import copy
import hashlib
import json
import math
import os
import time

import torch
from safetensors.torch import save_file
import torch.nn.functional as F
from tqdm import tqdm

import common as C

RANGE = C.checked_type(C.two_floats, lambda t: 1 <= t[0] <= t[1], "'LOW,HIGH' with 1 <= LOW <= HIGH", "0.5,2")
FLAGS = {
    "run": C.RUN_FLAGS[:2] + [("seed", 0, C.INT_NONNEG, "pair i has seed `seed + i`")] + C.RUN_FLAGS[3:] + [
        ("teacher_dtype", None, C.DTYPES, "the teacher's precision: SD/SDXL its weights' dtype, EDM autocast over float32 weights"),
        ("benchmark", False, None, "sd15/sdxl: time our pair generation against diffusers' pipeline (same latents), exit"),
    ],
    "teacher ODE (§3.1, App. A)": [
        ("teacher", None, None, "toy: .safetensors; cifar10: NVlabs .pkl; sd15/sdxl: diffusers folder or hub id"),
        ("num_steps", None, C.INT_POS, "ODE steps (EDM Heun 18 = 35 NFE; DDIM 50)"),
        ("resolution", None, C.INT_POS, "image size in pixels (sd15 512, sdxl 1024; latents are 1/8 of it)"),
        ("guidance", None, C.NONNEG, "classifier-free guidance scale w (1 = none)"),
        ("cfg_range", None, RANGE, "'LOW,HIGH': a guidance scale per pair, for a guidance-conditioned student (beyond the paper)"),
        ("prompts", None, None, "sd15/sdxl, required: a UTF-8 .txt/.jsonl file or a folder of them, one prompt per "
                                "line (docs/real_run.md: from LAION metadata); toy_sd: its teacher's captions,"),
        ("cycle_prompts", False, None, "allow fewer prompts than pairs (pair i takes prompt i mod n); refused otherwise"),
    ],
    "pairs on disk": [
        ("num_pairs", None, C.INT_POS, "number of (z, c, x) pairs (Table A1: 3M SD-CFG-3, 12M SD-CFG-8)"),
        ("shard_size", None, C.INT_POS, "pairs per shard file"),
        ("batch_per_device", None, C.INT_POS, "teacher batch per process"),
        ("pair_dtype", None, C.DTYPES, "storage dtype of x"),
        ("grid", 8, C.INT_POS, "pairs shown in pairs.png"),
    ],
    "toy teacher": [
        ("train_teacher", False, None, "train the toy (or toy_sd) teacher and write it to --teacher"),
        ("teacher_steps", None, C.INT_POS, "its training steps (toy_sd: of the text encoder and U-Net)"),
        ("teacher_batch", None, C.INT_POS, "its batch size"),
        ("vae_steps", None, C.INT_POS, "toy_sd: the autoencoder's training steps, before the U-Net's"),
    ],
}


def edm_loss(D, y, labels, p_mean=-1.2, p_std=1.2, sigma_data=0.5, generator=None):
    """EDM training loss: lambda(sigma) * ||D(y + sigma n; sigma) - y||^2."""
    rnd = torch.randn(len(y), 1, 1, 1, generator=generator)
    sigma = (rnd * p_std + p_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    n = torch.randn(y.shape, generator=generator) * sigma
    return (weight * (D(y + n, sigma, labels) - y) ** 2).mean()


def pair_guidance(seeds, cfg_range):
    """The guidance-conditioned student (beyond the paper, §5 'Limitations'): each
    pair's scale w ~ U(LOW, HIGH), drawn from a generator seeded by the pair's seed."""
    lo, hi = cfg_range
    return torch.tensor([lo + (hi - lo) * torch.rand(1, generator=torch.Generator().manual_seed(int(s) + (1 << 40))).item()
                         for s in seeds])


def write_shard(path, x, seeds, labels=None, prompts=None, w=None):
    tensors = {"x": x, "seed": torch.as_tensor(seeds, dtype=torch.int64)}
    if labels is not None:
        tensors["label"] = labels.to(torch.int64)
    if w is not None:
        tensors["w"] = w.float()
    meta = {"prompts": json.dumps(prompts)} if prompts is not None else None
    C.atomic(path, lambda f: save_file(tensors, f, metadata=meta))


def train_toy_teacher(cfg, device):
    """Train the toy EDM teacher with the EDM loss on the built-in data and write
    its EMA weights (float16) to cfg['teacher']. Label dropout 10% gives it an
    unconditional mode (null class) for classifier-free guidance."""
    torch.manual_seed(cfg["seed"])
    D = C.build_toy_teacher().to(device).train()
    ema = copy.deepcopy(D).eval().requires_grad_(False)
    opt = torch.optim.Adam(D.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(cfg["seed"])
    steps, B = cfg["teacher_steps"], cfg["teacher_batch"]
    for step in tqdm(range(steps), desc="toy teacher"):
        seeds = torch.randint(0, 50_000, (B,), generator=g)  # the toy 'train' split
        y, labels = C.toy_images(seeds.tolist())
        labels = torch.where(torch.rand(B, generator=g) < 0.1, torch.full_like(labels, 10), labels)
        for pg in opt.param_groups:  # warmup, then cosine decay to 5%
            pg["lr"] = 2e-3 * min(1, (step + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item()))
        loss = edm_loss(D, y.to(device), labels.to(device), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(D.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            beta = min(0.999, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), D.parameters()):
                pe.lerp_(p, 1 - beta)
        if step % 500 == 0:
            tqdm.write(f"step {step} loss {loss.item():.4f}")
    C.atomic(cfg["teacher"], lambda f: save_file({k: v.half().contiguous() for k, v in ema.state_dict().items()}, f))
    print(f"wrote {cfg['teacher']}")


def word_tokenizer(texts):
    """A CLIP tokenizer (CLIP's BPE, no download) whose merges, learned by BPE on the
    words of `texts`, spell each of those words as one token: toy_sd's tokenizer."""
    from collections import Counter
    from transformers import CLIPTokenizer
    words = sorted({w for t in texts for w in t.lower().split()})
    seqs, merges = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words], []
    while any(len(q) > 1 for q in seqs):
        counts = Counter(p for q in seqs for p in zip(q, q[1:]))
        best = max(counts, key=lambda p: (counts[p], p))  # the most frequent pair; ties broken by the pair itself
        merges.append(best)
        joined = []
        for q in seqs:
            out, i = [], 0
            while i < len(q):
                if q[i:i + 2] == best:
                    out.append(q[i] + q[i + 1])
                    i += 2
                else:
                    out.append(q[i])
                    i += 1
            joined.append(tuple(out))
        seqs = joined
    chars = list("abcdefghijklmnopqrstuvwxyz")
    tokens = chars + [c + "</w>" for c in chars] + list(dict.fromkeys(a + b for a, b in merges))
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


TOY_SD_TRAIN_SEEDS = 30_000  # the toy_sd teacher's training images: seeds [0, 30k) of the toy world


def train_toy_sd_teacher(cfg, device):
    """toy_sd's teacher in Stable Diffusion's layout, trained with SD's recipe: an
    AutoencoderKL (32 px -> 4x8x8 latents, L1 + L2 + a weak KL), its scaling factor set to
    1 / std of the latents (as SD's 0.18215 was); then a small CLIPTextModel and a
    UNet2DConditionModel trained together with SD's epsilon objective on SD's noise
    schedule, 10% of captions dropped to the empty prompt (SD's negative) for
    classifier-free guidance. Written with save_pretrained as a StableDiffusionPipeline
    folder (EMA weights) at --teacher, with its first 10k training captions as prompts.txt."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    imgs, captions, _ = C.toy_scene(range(TOY_SD_TRAIN_SEEDS), cfg["resolution"])
    B = cfg["teacher_batch"]
    # 4 channels per GroupNorm group at the first level: with 1 per group (16 groups of 16) the norm
    # removes each channel's mean, and the autoencoder learns grey shapes, not coloured ones
    vae = AutoencoderKL(block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
                        sample_size=cfg["resolution"]).to(device)
    tok = word_tokenizer(captions)
    tok.model_max_length = 16  # the longest caption is 14 tokens; SD pads every prompt to this length
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_hidden_layers=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).to(device)
    unet = UNet2DConditionModel(sample_size=cfg["resolution"] // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=64, attention_head_dim=8,
                                norm_num_groups=16).to(device)

    def run(name, models, steps, batch, lr, loss_fn):  # AdamW, warmup then cosine decay, an EMA of each model
        params = [p for m in models for p in m.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        emas = [copy.deepcopy(m).eval().requires_grad_(False) for m in models]
        bar = tqdm(range(steps), desc=name)
        for step in bar:
            for pg in opt.param_groups:
                pg["lr"] = lr * min(1, (step + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            loss = loss_fn(torch.randint(0, len(imgs), (batch,), generator=g))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                beta = min(0.999, (1 + step) / (10 + step))
                for e, m in zip(emas, models):
                    for pe, p in zip(e.parameters(), m.parameters()):
                        pe.lerp_(p, 1 - beta)
            if step % 100 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        return emas

    def vae_loss(idx):
        x = imgs[idx].to(device)
        d = vae.encode(x).latent_dist
        err = vae.decode(d.sample()).sample - x
        return err.abs().mean() + err.pow(2).mean() + 1e-6 * d.kl().mean()
    vae, = run("toy_sd autoencoder", [vae], cfg["vae_steps"], max(1, B // 2), 1e-3, vae_loss)
    with torch.no_grad():  # every training image's latent distribution, once; the U-Net samples from it
        dists = [vae.encode(imgs[i:i + 500].to(device)).latent_dist for i in range(0, len(imgs), 500)]
        mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    vae.register_to_config(scaling_factor=round(1 / mean.std().item(), 5))
    sched = DDPMScheduler.from_config(C.sd_scheduler().config)
    ids = tok(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=16, return_tensors="pt").input_ids

    def eps_loss(idx):
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g).to(device)) * vae.config.scaling_factor
        n = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g).to(device)
        drop = torch.rand(len(idx), generator=g) < 0.1
        text = te(torch.where(drop[:, None], empty, ids[idx]).to(device))[0]
        return F.mse_loss(unet(sched.add_noise(x0, n, t), t, text).sample, n)
    te, unet = run("toy_sd text encoder + U-Net", [te, unet], cfg["teacher_steps"], B, 1e-3, eps_loss)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=C.sd_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def write(folder):  # float16-rounded weights stored in float32 (7.4 MB): a plain from_pretrained(folder) runs them
        pipe.to(torch.float16).to(torch.float32).save_pretrained(folder)
        C.save_text("\n".join(captions[:10_000]) + "\n", os.path.join(folder, "prompts.txt"))  # 01's default prompts
    C.atomic(cfg["teacher"], write)
    print(f"wrote {cfg['teacher']} (scaling factor {vae.config.scaling_factor})")


@torch.no_grad()
def benchmark_pairs(cfg, prompts, device, batches=2):
    """Our pair generation vs diffusers' own pipeline making the same latents (same
    teacher, prompts, z, steps, guidance, batch), in one run; plus the pure-UNet
    time of the same calls, the floor for both."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    teacher = C.LDMTeacher(cfg, device, cfg["teacher_dtype"])
    B = cfg["batch_per_device"]
    cls = StableDiffusionXLPipeline if teacher.kind == "sdxl" else StableDiffusionPipeline
    kw = dict(torch_dtype=teacher.dtype) if teacher.dtype != torch.float32 else {}
    pipe = cls.from_pretrained(teacher.path, **kw).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    z, _ = teacher.noise_and_condition(range(B))
    pipe(prompts, latents=z.to(device, teacher.dtype), num_inference_steps=cfg["num_steps"], guidance_scale=cfg["guidance"],
               height=teacher.pixel_res, width=teacher.pixel_res, output_type="latent")  # warm-up
    ours_t, _ = C.timed(lambda: teacher.solve(z, prompts), device, batches)
    theirs_t, _ = C.timed(lambda: pipe(prompts, latents=z.to(device, teacher.dtype), num_inference_steps=cfg["num_steps"],
                                   guidance_scale=cfg["guidance"], height=teacher.pixel_res, width=teacher.pixel_res,
                                   output_type="latent"), device, batches)
    cond = teacher.encode_prompts(prompts, with_uncond=C.guided(cfg["guidance"]))
    x2 = torch.cat([z, z]).to(device, teacher.dtype) if C.guided(cfg["guidance"]) else z.to(device, teacher.dtype)
    unet_t, _ = C.timed(lambda: [teacher.unet(x2, t, **cond) for t in teacher.timesteps], device, batches)
    out = dict(ours_pairs_s=B / ours_t, diffusers_pairs_s=B / theirs_t, unet_only_pairs_s=B / unet_t,
               ours_over_diffusers=theirs_t / ours_t, ours_over_unet_only=unet_t / ours_t, batch=B, steps=cfg["num_steps"],
               unet_params_m=sum(p.numel() for p in teacher.unet.parameters()) / 1e6, device=str(device))
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def load_prompts(path):
    """Prompts from a .txt / .jsonl file or a folder of them, one per line. A
    .jsonl line is a string or an object with 'prompt', 'caption' or 'text'."""
    if path is None:
        C.fail("--prompts is required for sd15/sdxl pairs (a .txt/.jsonl file or a folder of them; docs/real_run.md "
               "makes one from LAION metadata)")
    if not os.path.exists(path):
        C.fail(f"prompt path '{path}' does not exist")
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".txt", ".jsonl"))) \
        if os.path.isdir(path) else [path]
    prompts = []
    for fn in files:
        with C.or_fail(f"prompt file '{fn}' is unreadable", "save it as UTF-8 text (e.g. iconv -f latin1 -t utf-8)"):
            lines = open(fn, encoding="utf-8").read().split("\n")
        for line in lines:
            line = line.strip()
            if line and fn.endswith(".jsonl"):
                with C.or_fail(f"'{fn}': a .jsonl line is not JSON"):
                    line = json.loads(line)
                if isinstance(line, dict):
                    line = next((line[k] for k in ("prompt", "caption", "text") if k in line), None)
                if not isinstance(line, str):
                    C.fail(f"'{fn}': a .jsonl line is neither a string nor an object with a string prompt/caption/text")
            if line:
                prompts.append(line)
    if not prompts:
        C.fail(f"no prompts found in '{path}' (empty file, or a folder without .txt/.jsonl files)")
    return prompts


def validate(cfg):
    """Every file this script reads, before any work (the flags' types checked the values).
    Returns the prompts (sd15/sdxl) and the manifest of pairs already begun, read once here."""
    if cfg["train_teacher"]:
        if cfg.get("data") != "toy":
            C.fail("--train_teacher trains the toy teachers only (--preset toy or toy_sd)")
        return None, None
    prompts = None
    if cfg["family"] == "ldm":
        prompts = load_prompts(cfg["prompts"])  # missing, empty or malformed prompt files stop here
        if len(prompts) < cfg["num_pairs"] and not cfg["cycle_prompts"]:
            C.fail(f"'{cfg['prompts']}' has {len(prompts)} prompts but --num_pairs is {cfg['num_pairs']}; pass --cycle_prompts "
                   f"to reuse them (pair i takes prompt i mod {len(prompts)}) or lower --num_pairs")
    elif cfg["teacher"] and not os.path.exists(cfg["teacher"]):
        C.fail(f"--teacher not found at '{cfg['teacher']}'")
    if cfg["benchmark"] and cfg["family"] != "ldm":
        C.fail("--benchmark compares against diffusers' pipelines: use --preset sd15 or sdxl")
    pairs_dir = os.path.join(cfg["out_dir"], "pairs")
    begun = os.path.isfile(os.path.join(pairs_dir, "manifest.json"))
    return prompts, C.read_manifest(pairs_dir) if begun else None  # resuming: an unreadable manifest stops here


def main(argv=None):
    cfg, _ = C.parse_config(__doc__, FLAGS, argv)
    prompts, begun = validate(cfg)
    rank, _, world, device = C.setup_distributed(cfg["dist_timeout_min"])
    if cfg["train_teacher"]:
        train = train_toy_teacher if cfg["family"] == "edm" else train_toy_sd_teacher
        return train(cfg, device) if rank == 0 else None

    if cfg["benchmark"]:
        print(json.dumps(benchmark_pairs(cfg, [prompts[i % len(prompts)] for i in range(cfg["batch_per_device"])], device), indent=2))
        return C.cleanup()
    pairs_dir = os.path.join(cfg["out_dir"], "pairs")
    stop = C.StopSignal(pairs_dir, "after the batch in progress; the finished shards stay")  # preemption, a time limit
    teacher = C.load_teacher(cfg, device, cfg["teacher_dtype"])
    N, S = cfg["num_pairs"], cfg["shard_size"]
    prompts_id = prompts and f"{os.path.basename(os.path.normpath(cfg['prompts']))}:n={len(prompts)}:sha256=" + \
        hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    manifest = dict(
        preset=cfg["preset"], family=teacher.family, teacher=teacher.teacher_id, solver=teacher.solver_name(), num_steps=cfg["num_steps"],
        nfe=teacher.nfe, guidance=cfg["guidance"], cfg_range=cfg["cfg_range"], resolution=cfg["resolution"],
        z_shape=list(teacher.z_shape), x_shape=list(teacher.z_shape), pair_dtype=cfg["pair_dtype"], num_pairs=N, shard_size=S,
        seed=cfg["seed"], prompts=prompts_id, num_classes=cfg["num_classes"], complete=False,
    )
    mpath = os.path.join(pairs_dir, "manifest.json")
    if begun:  # resuming: refuse pairs from a different teacher / preset / setting
        C.check_manifest(begun, manifest, f"the pairs in '{pairs_dir}'")
    elif rank == 0:
        C.save_json(manifest, mpath)
    C.barrier()

    # Ranks take whole shards (shards[rank::world]); a shard's content depends only
    # on its seeds, so the files are identical for any number of ranks.
    num_shards = (N + S - 1) // S
    mine = list(range(num_shards))[rank::world]
    todo = [k for k in mine if not os.path.isfile(C.shard_path(pairs_dir, k))]
    for k in set(mine) - set(todo):  # a finished shard must be readable and complete
        C.open_shard(C.shard_path(pairs_dir, k), min(S, N - k * S))
    done = sum(os.path.isfile(C.shard_path(pairs_dir, k)) for k in range(num_shards))
    C.print0(f"{num_shards} shards of {S} pairs: {done} done, "
             f"{len(todo)} to make on this rank ({world} rank(s), batch_per_device {cfg['batch_per_device']})")
    def conditions(seeds, idx):  # z from each seed; c the class label drawn from it, or prompt i (mod n) for pair i
        z, c = teacher.noise_and_condition(seeds)
        return z, c if prompts is None else [prompts[i % len(prompts)] for i in idx]

    t0, made = time.time(), 0
    dtype = getattr(torch, cfg["pair_dtype"])
    for k in tqdm(todo, desc="shards", disable=rank != 0):
        idx = list(range(k * S, min((k + 1) * S, N)))
        seeds = [cfg["seed"] + i for i in idx]
        w = pair_guidance(seeds, cfg["cfg_range"]) if cfg["cfg_range"] else None
        xs, B = [], cfg["batch_per_device"]
        for b in range(0, len(idx), B):
            if stop.got:  # every rank gets the signal; the shard in progress is dropped, a rerun makes it again
                break
            z, cond = conditions(seeds[b:b + B], idx[b:b + B])
            xs.append(teacher.solve(z, cond, guidance=None if w is None else w[b:b + B]).to(dtype).cpu())
        if stop.got:
            break
        _, cond = conditions(seeds, idx)
        write_shard(C.shard_path(pairs_dir, k), torch.cat(xs), seeds, w=w, **{"prompts" if prompts else "labels": cond})
        made += len(idx)
    dt = time.time() - t0
    if made:
        print(f"rank {rank}: {made} pairs in {dt:.1f} s = {made / dt:.2f} pairs/s, {made * teacher.nfe / dt:.1f} NFE/s "
              f"({teacher.nfe} NFE per pair)", flush=True)
    if stop.requested(device):  # the one collective after the loop: a rank that finished its shards waits here
        stop.exit(sum(os.path.isfile(C.shard_path(pairs_dir, k)) for k in range(num_shards)), "finished shards kept",
                  "rerun the same command to make the rest")
    if rank == 0:
        missing = [k for k in range(num_shards) if not os.path.isfile(C.shard_path(pairs_dir, k))]
        if missing:
            C.fail(f"shards {missing[:5]}... are missing after the run; rerun to finish them")
        first = C.load_shard(C.shard_path(pairs_dir, 0))
        n = min(cfg["grid"], len(first["seed"]))
        z, _ = teacher.noise_and_condition(first["seed"][:n].tolist())
        x_img = teacher.to_images(first["x"][:n].to(device)).cpu()
        z_img = torch.nn.functional.interpolate((z[:, :3] / 3).clamp(-1, 1), size=x_img.shape[-2:], mode="nearest")
        imgs = torch.cat([z_img, x_img])
        C.save_image_grid(imgs, os.path.join(pairs_dir, "pairs.png"), ncol=n)
        C.save_json(dict(manifest, complete=True), mpath)
        print(f"pairs complete: {N} in '{pairs_dir}' (grid: top z, bottom x = teacher(z))")
    C.cleanup()


if __name__ == "__main__":
    main()
