"""
Stage 2 of Diffusion2GAN (§3.3, Eq. 5-6, Table 2, Table A1): fine-tune the
stage-1 student with a conditional GAN whose discriminator is the teacher U-Net
(noise-prediction parameterisation), conditioned on c and on the noise z:

    L_D = -log D(c, z, x) - log(1 - D(c, z, G(z, c)))        (Eq. 5, softplus form)
    L_G = d_E-LatentLPIPS(G(z, c), x) + lambda_GAN * -log D(c, z, G(z, c))   (Eq. 6)

One D update per G update, alternating as in StyleGAN2 and GigaGAN: D steps first, then
G is scored by the updated D. D always starts from the teacher's weights (Table 2's
"+ Diffusion D"); each further Table 2 component is a flag: --z_cond, --r1_gamma > 0
(single-sample, every --r1_every D steps), --multiscale, --mix_match FRACTION, and
--noise_aug (the SDXL preset's).

Input:  <out_dir>/distill/student_ema.pt (03), <out_dir>/pairs, LatentLPIPS
Output: <out_dir>/gan/{student_ema.pt, ckpt_latest.pt, metrics.jsonl, grid_*.png}

Toy (CPU, ~3 min):   python 04_gan_finetune.py
SD1.5 (8 GPUs):      torchrun --nproc_per_node=8 04_gan_finetune.py --preset sd15 --lpips_ckpt sd15_latest_vgg16_tuned.pth
Table 2 row:         python 04_gan_finetune.py --no-multiscale --mix_match 0 --run_name gan_no_ms
Export (diffusers):  python 04_gan_finetune.py --preset sd15 --export runs/sd15/export   (README: the pipeline call)
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

FLAGS = {
    "run": C.RUN_FLAGS + [("run_name", "gan", None, "output subfolder of out_dir")] + C.TRAIN_RUN_FLAGS + [
        ("export", None, None, "sd15/sdxl: write <out_dir>/<run_name>/student_ema.pt (default: the stage-2 student) as a diffusers "
                               "folder (unet/ + scheduler/) and exit"),
    ],
    "inputs": C.TRAIN_INPUT_FLAGS + [("init", None, None, "stage-1 student (default <out_dir>/distill/student_ema.pt)"),
                                     ("partial_init", False, None, "accept an --init that stopped before its --steps")],
    "generator loss (Eq. 6)": C.LOSS_FLAGS + [("lambda_gan", None, C.NONNEG, "lambda_GAN (Table A1: 0.25 SD1.5, 1.0 SDXL)")],
    "discriminator (§3.3, Table 2, Fig. 7)": [
        ("z_cond", True, None, "'+ z conditional D': D sees z through a zero-init conv"),
        ("multiscale", True, None, "'+ multi-scale': inputs at every encoder scale, 3 readouts per decoder scale"),
        ("r1_gamma", None, C.NONNEG, "'+ single-sample R1' strength (0 = off)"),
        ("r1_every", 16, C.INT_POS, "lazy R1: every this many D steps"),
        ("r1_reading", "sum_pos", ("sum_pos", "sum", "mean"), "R1's D(x) from the logit maps: each readout's sum over its "
         "positions, averaged over the readouts; the sum of every logit; or their mean (docs/design.md: R1's strength)"),
        ("mix_match", None, C.FRACTION, "'+ mix-and-match': fraction of fakes replaced by mismatched real pairs"),
        ("noise_aug", None, bool, "diffuse D's input to a random t first (SDXL, Table A1)"),
        ("d_t", None, C.NONNEG, "D's noise level without --noise_aug: EDM sigma (toy 0.5), SD timestep (0)"),
    ],
    "optimisation (Table A1)": C.TRAIN_BATCH_FLAGS + [
        ("lr", None, C.LR, "G learning rate, START,END for a cosine decay over --steps (Table A1: 1e-4,1e-5)"),
        ("d_lr", None, C.LR, "D learning rate, the same way"),
        ("betas", "0.9,0.999", C.BETAS, "G Adam betas"),
        ("d_betas", None, C.BETAS, "D Adam betas (0.9,0.999 SD1.5; 0.0,0.99 SDXL)"),
        ("grad_ckpt", None, bool, "gradient checkpointing of G and D (memory for compute; on in the SD rows)"),
    ] + C.TRAIN_REST_FLAGS,
    "logging": C.TRAIN_LOG_FLAGS,
}

# Table A1's stage-2 row per preset (toy: scaled to 2 CPU cores). Toy: 300 steps are
# too few for D to learn at SD1.5's d_lr 1e-4 -> 1e-5 and lambda 0.25 (its logits
# parted by < 0.5 and FID-toy moved within noise); a constant d_lr 2e-4 and lambda
# 1.0 (SDXL's) give D enough signal in the toy budget (docs/toy_results.md). R1 at Table A1's
# gamma 0.01 holds the toy's D at chance (stage 2 then equals its lambda_GAN = 0 control);
# gamma 1e-4 is the largest of those tried (1e-2, 1e-3, 1e-4) under which D still learns.
STAGE2 = {
    "toy": dict(steps=300, batch=32, batch_per_device=32, grad_ckpt=False, lr=(5e-5, 1e-5), d_lr=2e-4, lambda_gan=1.0,
                r1_gamma=1e-4, mix_match=0.25, noise_aug=False, d_t=0.5, d_betas="0.0,0.99", weight_decay=0.0,
                attn_weight_decay=0.0, ema_start=0, ema_beta=0.99, grid_every=100, ckpt_every=100),
    "sd15": dict(steps=10_000, batch=256, batch_per_device=16, grad_ckpt=True, lr=(1e-4, 1e-5), d_lr=(1e-4, 1e-5),
                 lambda_gan=0.25, r1_gamma=0.01, mix_match=0.25, noise_aug=False, d_t=0, d_betas="0.9,0.999", weight_decay=1e-2,
                 attn_weight_decay=1e-5, ema_start=4000, ema_beta=0.9999, grid_every=1000, ckpt_every=1000),
    "sdxl": dict(steps=30_000, batch=512, batch_per_device=4, grad_ckpt=True, lr=(1e-4, 1e-5), d_lr=(1e-4, 1e-5), lambda_gan=1.0,
                 r1_gamma=0.0, mix_match=0.25, noise_aug=True, d_t=0, d_betas="0.0,0.99", weight_decay=1e-2,
                 attn_weight_decay=1e-5, ema_start=4000, ema_beta=0.9999, grid_every=1000, ckpt_every=1000),
}
STAGE2["toy_sd"] = dict(STAGE2["toy"], d_t=0)  # D at SD's timestep 0, as sd15
STAGE2["sd15_cfg8"] = dict(STAGE2["sd15"], batch=1024)  # Table A1, SD-CFG-8: 2048 -> 1024
# micro-batches (H100-measured, docs/scaling.md): SD1.5 at the paper's 16 per GPU needs gradient
# checkpointing (51.7 GB; without it D's forward runs out of memory). SDXL does not fit one 80 GB GPU under DDP at
# any micro-batch (92.5 GB of model state): it needs --fsdp over 2 or more GPUs. At the paper's 4 per GPU, one
# H200 (--fsdp over one process) peaked at 91.0 GB, 86.1 of it state that --fsdp divides by the number of GPUs.
RESUME_CKPT_KEYS = ("model", "ema", "D", "opt", "opt_d", "step", "config", "teacher", "stage")  # what ckpt_latest.pt holds


# ----------------------------------------------------------------------------
# The conditional diffusion discriminator (§3.3, Fig. 7): a trainable copy of the
# teacher U-Net in its noise-prediction parameterisation (App. A), for the toy
# teacher's UNet2DModel and SD's UNet2DConditionModel alike, plus
#   z-conditioning   D's input is x + zero_conv(z)                      ("+ z conditional D")
#   multi-scale in   x resized to each encoder scale enters that down
#                    block through a zero-init conv                       ("+ multi-scale")
#   multi-scale out  3 readouts per decoder scale, before, at and after the
#                    skip connection: the features from below, the skip
#                    features, and the combined ones before the upsampler
# D.features walks the U-Net's blocks itself, so each of these is a line there.

def zero_conv(cin, cout):
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class Discriminator(nn.Module):
    def __init__(self, teacher, z_cond=True, multiscale=True, d_t=None, noise_aug=False):
        super().__init__()
        self.family = teacher.family
        net = teacher.trainable_copy()  # float32, from the teacher's full-precision weights, on its device
        self.unet = (net.unet if self.family == "edm" else net).train().requires_grad_(True)
        dev = next(self.unet.parameters()).device  # nothing below assumes a device: D is built where the teacher is
        if self.family == "edm":
            self.sigma_data, self.d_t = teacher.net.sigma_data, 0.5 if d_t is None else d_t  # EDM: a noise level sigma
            if self.d_t <= 0:
                C.fail(f"--d_t {d_t}: an EDM discriminator's noise level must be > 0")
        else:
            self.d_t = int(d_t or 0)  # SD: a timestep
            if self.d_t != (d_t or 0):
                C.fail(f"--d_t {d_t}: an SD discriminator's timestep is an integer in 0-999")
            self.register_buffer("alphas_cumprod", teacher.alphas_cumprod.to(dev, copy=True))
        self.noise_aug, self.multiscale = noise_aug, multiscale
        ch, widths = self.unet.config.in_channels, self.unet.config.block_out_channels
        self.z_conv = zero_conv(ch, ch).to(dev) if z_cond else None
        self.ms_in = nn.ModuleList(zero_conv(ch, c) for c in widths[:-1]).to(dev) if multiscale else None  # down blocks 1..
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in self._readout_channels()).to(dev)

    def _readout_channels(self):
        """Channels of each readout, from one dry run on a tiny input made on the
        U-Net's own device and dtype (the teacher may already be on a GPU)."""
        p, cfg = next(self.unet.parameters()), self.unet.config
        zeros = lambda *s, dtype=p.dtype: torch.zeros(*s, device=p.device, dtype=dtype)
        r = 2 ** len(self.unet.down_blocks)
        cond = zeros(1, dtype=torch.long) if self.family == "edm" else dict(encoder_hidden_states=zeros(1, 1, cfg.cross_attention_dim))
        if self.family == "ldm" and cfg.addition_embed_type == "text_time":  # SDXL's pooled text and size conditioning
            n = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            cond["added_cond_kwargs"] = dict(text_embeds=zeros(1, n), time_ids=zeros(1, 6))
        with torch.no_grad():
            return [f.shape[1] for f in self.features(zeros(1, cfg.in_channels, r, r), zeros(1, cfg.in_channels, r, r), cond)]

    def features(self, x, z, cond, t=None):
        """Fig. 7: the U-Net run on D's input, block by block. Returns the readout
        features in decoder order, three per decoder scale, all at that scale:
        [from below, skips, combined (the block's resnets and attentions, before its
        upsampler)]; without multi-scale only the last block's output."""
        u, h = self.unet, x + self.z_conv(z) if self.z_conv is not None else x  # z enters with x
        if self.family == "edm":  # UNet2DModel at noise level sigma, EDM's c_in and c_noise
            sigma = torch.full((len(x),), self.d_t, device=x.device) if t is None else t
            h = 1 / (self.sigma_data ** 2 + sigma.view(-1, 1, 1, 1) ** 2).sqrt() * h
            emb = u.time_embedding(u.time_proj(sigma.log() / 4).to(u.dtype)) + u.class_embedding(cond).to(u.dtype)
            text = {}
        else:  # UNet2DConditionModel at timestep t, text (and SDXL's added) conditioning
            t = torch.full((len(x),), self.d_t, device=x.device, dtype=torch.long) if t is None else t
            cond = C.map_cond(lambda v: v.to(u.dtype), cond)
            emb = u.time_embedding(u.get_time_embed(sample=h, timestep=t))
            aug = u.get_aug_embed(emb=emb, encoder_hidden_states=cond["encoder_hidden_states"],
                                  added_cond_kwargs=cond.get("added_cond_kwargs", {}))
            emb = emb + aug if aug is not None else emb
            emb = u.time_embed_act(emb) if u.time_embed_act is not None else emb
            text = dict(encoder_hidden_states=cond["encoder_hidden_states"])
        kw = lambda block: text if getattr(block, "has_cross_attention", False) else {}
        h = u.conv_in(h)
        skips = (h,)
        for i, block in enumerate(u.down_blocks):
            if self.multiscale and i > 0:  # multi-scale input: x at this block's scale
                xi = F.interpolate(x, size=h.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
                h = h + self.ms_in[i - 1](xi.to(h.dtype))
            h, res = block(hidden_states=h, temb=emb, **kw(block))
            skips += res
        h = u.mid_block(h, emb, **kw(u.mid_block))
        feats = []
        for i, block in enumerate(u.up_blocks):
            skip, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            if self.multiscale:  # readouts 1 and 2 of this scale: the features from below, and the skips
                feats += [h, torch.cat([F.interpolate(s, size=h.shape[-2:]) if s.shape[-2:] != h.shape[-2:] else s
                                        for s in skip], 1)]
            combined = []  # readout 3, the combined features at this scale: the block's output before its upsampler
            ups = block.upsamplers[0].register_forward_pre_hook(lambda m, a: combined.append(a[0])) if block.upsamplers else None
            try:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skip, **kw(block))
            finally:
                if ups is not None:
                    ups.remove()
            if self.multiscale or i == len(u.up_blocks) - 1:
                feats.append(combined[0] if combined else h)
        return feats

    def forward(self, x, z, cond, noise=None):
        """Logit maps, one per readout. With noise augmentation (SDXL preset), x
        is diffused to a random t (given noise ~ N(0, I)) before D."""
        t = None
        if self.noise_aug:
            noise = torch.randn_like(x) if noise is None else noise
            if self.family == "edm":
                t = (torch.randn(len(x), device=x.device) * 1.2 - 1.2).exp()
                x = x + t.view(-1, 1, 1, 1) * noise
            else:
                t = torch.randint(0, len(self.alphas_cumprod), (len(x),), device=x.device)
                a = self.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
                x = a.sqrt() * x + (1 - a).sqrt() * noise
        return [head(f) for head, f in zip(self.heads, self.features(x, z, cond, t))]  # a head: any module, any logit shape


def d_score(logits):
    """D(x) as one number per sample: the mean over readouts and positions (logged as logit_real / logit_fake)."""
    return torch.stack([l.flatten(1).mean(1) for l in logits]).mean(0)


# R1's D(x). StyleGAN2's R1 (gamma = 0.01 in Table A1 comes from that convention) penalises the
# gradient of one logit per image; this D gives a logit map per readout. Each reading below is
# D(x) as one number per sample; R1 = ||grad_x D(x)||^2 then scales with the square of its reduction.
R1_READINGS = {
    "sum_pos": lambda logits: torch.stack([l.flatten(1).sum(1) for l in logits]).mean(0),  # each map a StyleGAN2 D(x), readouts averaged
    "sum": lambda logits: torch.stack([l.flatten(1).sum(1) for l in logits]).sum(0),  # every logit a StyleGAN2 D(x)
    "mean": d_score,  # the mean over readouts and positions, as the loss averages them
}


def gan_loss_d(logits_real, logits_fake):
    """Eq. 5 for D with softplus: -log D(real) - log(1 - D(fake)), averaged over
    every readout and position."""
    real = torch.stack([F.softplus(-l).mean() for l in logits_real]).mean()
    fake = torch.stack([F.softplus(l).mean() for l in logits_fake]).mean()
    return real + fake


def gan_loss_g(logits_fake):
    """Eq. 6, non-saturating: -log D(G(z, c))."""
    return torch.stack([F.softplus(-l).mean() for l in logits_fake]).mean()


def r1_penalty(D, x, z, cond, weight=None, reading="sum_pos"):
    """Single-sample R1: ||grad_x D(x)||^2 on one real sample, D(x) as R1_READINGS[reading].
    Attention runs on the math kernel here: fused kernels have no double backward.
    With `weight`, weight * R1 is also backpropagated under the same kernel (a
    gradient-checkpointed D recomputes its blocks then, and must match) and the
    detached value is returned. Under --fsdp (which needs `weight`), D's units stay
    gathered from the first backward to the second, which needs the same weights;
    by default FSDP2 frees them after the first."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    units = [m for m in D.modules() if hasattr(m, "set_reshard_after_backward")] if weight is not None else []
    for u in units:
        u.set_reshard_after_backward(False)
    x = x.detach().requires_grad_(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            score = R1_READINGS[reading](D(x, z, cond)).sum()
            (g,) = torch.autograd.grad(score, x, create_graph=True)
            r1 = g.pow(2).sum((1, 2, 3)).mean()
            if weight is None:
                return r1
            (weight * r1).backward()
    finally:
        for u in units:  # back to FSDP2's default, and sharded again
            u.set_reshard_after_backward(True)
            u.reshard()
    return r1.detach()


MIX_KINDS = ("unrelated", "wrong_c", "wrong_z")
LOSS_KEYS = (*(f[0] for f in C.LOSS_FLAGS), "lpips_ckpt")  # the regression term's setup: stage 1's unless a flag sets it
STATS = ("loss_g", "loss_reg", "loss_d", "logit_real", "logit_fake", "r1")  # what a step logs


def mix_and_match_plan(seed, step, positions, own, frac, n):
    """Mix-and-match (§3.3), decided per sample: sample k of a micro-batch, at
    `positions[k]` in the step's global batch, is replaced with probability `frac`,
    by one of the three kinds with equal odds, with partner j = another pair of the
    data set (index != own[k]). Every draw depends on (seed, step, position) alone,
    so the fraction and the kinds hold over the global batch for any micro-batch
    size, 1 included, and a resumed run replays them. Returns [(k, kind, j)]."""
    plan = []
    if n < 2 or frac <= 0:  # no other pair to borrow from
        return plan
    for k, (pos, i) in enumerate(zip(positions, own)):
        g = torch.Generator().manual_seed(_mix64((seed * 1_000_003 + step) * 65_537 + pos))  # decorrelate nearby seeds
        if torch.rand(1, generator=g).item() >= frac:
            continue
        kind = MIX_KINDS[int(torch.randint(3, (1,), generator=g))]
        j = (i + 1 + int(torch.randint(n - 1, (1,), generator=g))) % n  # uniform over the other n - 1 pairs
        plan.append((k, kind, j))
    return plan


def _mix64(x):
    """splitmix64: consecutive integers -> well-spread 64-bit generator seeds."""
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return (x ^ (x >> 31)) >> 1  # 63 bits: torch seeds are signed


def mix_and_match(x_fake, z, cond, plan, x_p, z_p, cond_p):
    """Apply a plan: fake k becomes the real latent x_j of its partner (row r of
    x_p, z_p, cond_p), with (z_k, c_k) unrelated, (z_j, c_k) wrong c, or (z_k, c_j)
    wrong z. All go into D's fake batch (labelled fake). Returns new (x, z, cond)."""
    x, zz, cc = x_fake.clone(), z.clone(), C.map_cond(torch.clone, cond)
    for r, (k, kind, _) in enumerate(plan):
        x[k] = x_p[r]
        if kind == "wrong_c":
            zz[k] = z_p[r]
        if kind == "wrong_z":
            C.map_cond(lambda dst, src: dst.__setitem__(k, src[r]), cc, cond_p)
    return x, zz, cc


def export_diffusers(cfg, device):
    """--export: the stage-2 EMA student (<run>/student_ema.pt) as a standard diffusers U-Net
    plus an LCMScheduler config. One pipeline step at the custom timestep T (the student's,
    Eq. 8) returns the x0 prediction: LCM's boundary terms at T are c_skip ~ 3e-9 and c_out
    ~ 1 - 1e-9, i.e. G(z, c) to float precision. (A DDIM config with steps_offset = T would be
    exact too, but SD1.5's pipeline resets steps_offset to 1 when it is built.)"""
    from diffusers import LCMScheduler
    if cfg["family"] != "ldm":
        C.fail("--export writes a diffusers UNet2DConditionModel: use --preset sd15 or sdxl")
    path = os.path.join(cfg["out_dir"], cfg["run_name"], "student_ema.pt")
    ck = C.load_student_file(path, "stage-2 student (student_ema.pt)")
    cfg["num_steps"] = ck["config"]["num_steps"]  # T (Eq. 8) is the first step of the schedule its pairs were made with
    teacher = C.LDMTeacher(cfg, device)
    G = C.load_student(ck, teacher, cfg, path, "cpu")
    G.net.save_pretrained(os.path.join(cfg["export"], "unet"))
    LCMScheduler.from_config(teacher.scheduler.config).save_pretrained(os.path.join(cfg["export"], "scheduler"))
    call = dict(num_inference_steps=1, timesteps=[teacher.T], guidance_scale="w" if G.w_cond else 1.0)
    C.save_json(dict(teacher=cfg["teacher"], student=path, pipeline_call=call), os.path.join(cfg["export"], "export.json"))
    print(f"exported to {cfg['export']}: unet/, scheduler/ (LCMScheduler); call the pipeline with {call}")


def watch_d(wins, step, gap):
    """Warn once D has separated real and fake by more than 8 logits for 50 steps in a row."""
    wins[0] = wins[0] + 1 if gap > 8 else 0
    if wins[0] == 50:
        C.print0(f"warning: step {step}: D separates real and fake by {gap:.1f} logits for 50 steps "
                 f"(D is overpowering G: consider a larger --r1_gamma or a lower --d_lr)")


SIZING_KEYS = ("preset", "batch_per_device", "dtype", "grad_ckpt", "fsdp", "loss", "lpips_augment", "z_cond", "multiscale", "r1_gamma",
               "r1_every", "r1_reading", "mix_match", "noise_aug")  # the settings of sizing mode's report (from [7:]: D's)


def get_config(argv=None):
    """The preset with this stage's Table A1 row, then the flags. Returns (cfg, given):
    `given` holds the preset keys that flags set."""
    return C.parse_config(__doc__, FLAGS, argv, STAGE2)


def validate(cfg, given):
    """Every file this stage reads, before any work (the flags' types checked the values;
    training_setup checks the batch split before it builds anything), read once: returns
    the pairs' manifest, the stage-1 student, the --resume checkpoint and the loss's LPIPS.
    The regression term's settings not given as flags are the stage-1 student's."""
    C.check_tracker(cfg["log_to"])
    if cfg["export"]:
        return None, None, None, None
    s1 = None
    if not cfg["benchmark_steps"]:  # sizing mode: G starts from the teacher
        cfg["init"] = cfg["init"] or os.path.join(cfg["out_dir"], "distill", "student_ema.pt")
        s1 = C.load_student_file(cfg["init"], "stage-1 student (03's student_ema.pt)", "run 03_ode_distill.py first or pass --init")
        if s1.get("stage") != 1:
            C.fail(f"--init '{cfg['init']}' is a stage-{s1.get('stage')} student, not 03's stage-1 student")
        if s1["step"] < s1["config"]["steps"] and not cfg["partial_init"]:
            C.fail(f"--init '{cfg['init']}' stopped at step {s1['step']} of its --steps {s1['config']['steps']}: finish it "
                   f"(03 with --resume), or pass --partial_init to start stage 2 from it anyway")
        # (a key the student lacks, e.g. a fork's flag newer than it, keeps this run's value)
        cfg.update({k: s1["config"][k] for k in LOSS_KEYS if k not in given and k in s1["config"]})
    if cfg["benchmark_steps"]:
        return None, None, None, C.read_lpips(cfg)
    m = C.read_manifest(cfg["pairs"] or os.path.join(cfg["out_dir"], "pairs"))  # missing or corrupt pairs stop here
    ckpt = os.path.join(cfg["out_dir"], cfg["run_name"], "ckpt_latest.pt")
    resume = cfg["resume"] and os.path.isfile(ckpt)
    ck = C.load_checkpoint(ckpt, "stage-2 checkpoint", mmap=True, keys=RESUME_CKPT_KEYS) if resume else None
    return m, s1, ck, C.read_lpips(cfg)


def main(argv=None):
    cfg, given = get_config(argv)
    manifest, s1, ck, lpips = validate(cfg, given)
    if cfg["export"]:
        return export_diffusers(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    run = C.Trainer(cfg, 2, manifest)  # processes, signals, the teacher and its pairs
    teacher, device = run.teacher, run.device
    taken = [k for k in LOSS_KEYS if s1 and k not in given and k in s1["config"]]
    C.print0("regression term: " + ", ".join(f"--{k} {cfg[k]}" for k in LOSS_KEYS) + (f" ({', '.join(taken)} from the stage-1 "
             "student)" if taken else ""))
    loss_fn = C.build_loss(cfg, teacher, device, lpips)
    # sizing mode: G starts from the teacher (no stage-1 student is read)
    G = C.load_student(s1, teacher, cfg, cfg["init"], device).train() if s1 else C.Student(teacher, cfg).to(device)
    del s1
    D = Discriminator(teacher, cfg["z_cond"], cfg["multiscale"], cfg["d_t"], cfg["noise_aug"]).to(device)
    if cfg["grad_ckpt"]:
        C.enable_grad_ckpt(G.net)
        C.enable_grad_ckpt(D.unet)
    G, ema, D = run.models(G, D)
    opt_g, opt_d = (C.make_optimizer("adam", C.param_groups(m, cfg["weight_decay"], cfg["attn_weight_decay"]), C.lr_schedule(cfg[lr])[0],
                                     cfg[betas]) for m, lr, betas in ((G, "lr", "betas"), (D, "d_lr", "d_betas")))
    rows = {"stage 1": run.sample(G)} if run.held_out() else {}  # the grids' stage-1 row, from G before a resume changes it
    run.resume(ck, ("model", G, "opt", opt_g), ("D", D, "opt_d", opt_d), ("ema", ema, None, None))
    del ck  # memory-mapped: not held open (and on disk) once replaced
    C.print0(f"D: {len(D.heads)} readout heads, " + ", ".join(f"{k}={cfg[k]}" for k in SIZING_KEYS[7:]))
    do_r1 = lambda step: cfg["r1_gamma"] > 0 and step % cfg["r1_every"] == 0
    d_wins = [0]  # consecutive steps at which D separates real and fake by more than 8 logits

    def step(step, batches):
        st = {k: torch.zeros((), device=device) for k in STATS}  # sums over this rank's micro-batches
        mixed = torch.zeros(3, device=device)  # mix-and-match fakes of each kind

        # D update (Eq. 5): real vs fake, the fakes including the mix-and-match ones. With one micro-batch
        # G's fake keeps its graph for the G update below (as StyleGAN2 alternates, at no extra cost);
        # with several, the G update recomputes it (docs/scaling.md: the cost of accumulation in stage 2).
        D.requires_grad_(True)
        for m, mb in enumerate(batches):
            run.seed(step, mb["chunk"], phase=1)
            z, x_real, cond, idx = mb["z"], mb["x"], mb["cond"], mb["idx"]
            plan = mix_and_match_plan(cfg["seed"], step, [mb["chunk"] * len(idx) + k for k in range(len(idx))], idx,
                                      cfg["mix_match"], len(run.data))
            if plan:  # mix-and-match partners: real pairs drawn from the data set (their own z and c)
                p = run.data.get([j for _, _, j in plan])
                partners = (p["x"].to(device), p["z"].to(device), C.student_cond(teacher, p["cond"], device))
                mixed += torch.tensor([sum(kind == k for _, kind, _ in plan) for k in MIX_KINDS], device=device)
            with C.autocast(device, cfg["dtype"]), torch.set_grad_enabled(run.accum == 1):
                x_fake = G(z, cond, mb["w"])
            if run.accum == 1:
                mb["x_fake"] = x_fake
            with C.autocast(device, cfg["dtype"]):
                xf, zf, cf = x_fake.detach(), z, cond
                if plan:
                    xf, zf, cf = mix_and_match(xf, z, cond, plan, *partners)
                lr_real, lr_fake = D(x_real, z, cond), D(xf, zf, cf)
                loss_d = gan_loss_d(lr_real, lr_fake)
            with run.accumulating(D, m):
                (loss_d / run.accum).backward()
            if do_r1(step) and m == 0:  # single-sample R1, lazy: scaled by the interval
                st["r1"] += r1_penalty(D, x_real[:1], z[:1], C.map_cond(lambda t: t[:1], cond),
                                       weight=0.5 * cfg["r1_gamma"] * cfg["r1_every"], reading=cfg["r1_reading"])
            for k, v in dict(loss_d=loss_d, logit_real=d_score(lr_real).mean(), logit_fake=d_score(lr_fake).mean()).items():
                st[k] += v.detach() / run.accum
        grad_norm_d = run.update(opt_d, D, sync=True)

        # G update (Eq. 6): regression + non-saturating GAN loss, scored by the D just updated; D frozen
        D.requires_grad_(False)
        for m, mb in enumerate(batches):
            run.seed(step, mb["chunk"])
            z, x_real, cond = mb["z"], mb["x"], mb["cond"]
            with C.autocast(device, cfg["dtype"]):
                x_fake = mb.pop("x_fake") if run.accum == 1 else G(z, cond, mb["w"])
                loss_reg = loss_fn(x_fake, x_real).mean()
                loss_g = loss_reg + cfg["lambda_gan"] * gan_loss_g(D(x_fake, z, cond))
            with run.accumulating(G, m):
                (loss_g / run.accum).backward()
            st["loss_g"] += loss_g.detach() / run.accum
            st["loss_reg"] += loss_reg.detach() / run.accum
        st = run.reduce(**dict(st, r1=st["r1"] if do_r1(step) else None),
                        **{f"mixed/{k}": n * run.world for k, n in zip(MIX_KINDS, mixed)})  # counts over all ranks
        # r1: ||grad_x D(x)||^2 of one real sample (D(x): --r1_reading); r1_term: its amortised share of L_D
        st.update(r1_term=0.5 * cfg["r1_gamma"] * st["r1"] if st["r1"] is not None else None, grad_norm_d=grad_norm_d,
                  grad_norm_g=run.update(opt_g, G, sync=True))
        watch_d(d_wins, step, st["logit_real"] - st["logit_fake"])
        return st

    run.loop(step, {"lr": opt_g, "d_lr": opt_d}, G, ema, rows, show=("loss_reg", "loss_d", "logit_real", "logit_fake"),
             kind=lambda step: "r1" if do_r1(step) else "no_r1", log_also=do_r1,
             report=(dict(G=G, D=D), SIZING_KEYS))


if __name__ == "__main__":
    main()
