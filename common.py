"""
What two or more of the numbered scripts share, and nothing else: each stage's own
ideas (the discriminator, the metrics, the plots) live in that stage's script.

Read beside the paper (Kang et al., "Distilling Diffusion Models into Conditional
GANs"). First the paper's models and losses, in the order a reader meets them:
   1. EDM teachers               (preconditioning, Heun sampler, toy and NVlabs nets; load_teacher)
   2. latent diffusion teachers  (SD1.5 / SDXL, DDIM + CFG, Eq. 7; --teacher random)
   3. the student                (G(z, c), Eq. 8; guidance conditioning)
   4. LatentLPIPS                (F: VGG16-bn on the model's space, §3.2, App. B)
   5. the augmentation           (E-LatentLPIPS' T, Eq. 3)
   6. the regression loss        (d of Eq. 1: LOSSES, one row per --loss name)
   7. the toy worlds             (toy: 10 classes at 16x16; toy_sd: captioned scenes at 32x32)
then, after the boundary line "The machinery", what runs them:
   8. presets and configuration  (Table A1; parse_config: preset -> flags; flag types)
   9. distributed                (setup_distributed for python / torchrun, CPU / CUDA; StopSignal)
  10. files                      (atomic writes, PNG grids, one-line errors, images)
  11. pairs on disk              (shards, manifest)
  12. training helpers           (03 and 04: data, batches, resume, optimisers, EMA, logs, sizing and FLOPs)
  13. the training loop          (Trainer: one loop for 03 and 04 around each stage's step)
  14. timing
"""
import argparse
import copy
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import pickle
import re
import signal
import sys
import threading
import time
import types
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.abspath(__file__))

# Start-up notices that are not the user's business, dropped where they are logged: transformers'
# image processors fall back to PIL without torchvision (no stage uses one), diffusers loads
# without the optional accelerate, and names torch_dtype deprecated (still the one every supported
# diffusers version takes).
for _name in ("transformers.utils.import_utils", "diffusers.models.modeling_utils", "diffusers.pipelines.pipeline_utils"):
    logging.getLogger(_name).addFilter(lambda record: not any(q in record.getMessage() for q in (
        "requires torchvision (not installed)", "Cannot initialize model with low cpu memory usage",
        "that should be kept in float32: []")))
del _name
warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)

# ----------------------------------------------------------------------------
# 1. EDM (Karras et al. 2022). The toy teacher is a diffusers UNet2DModel with
# class embeddings wrapped in EDM's preconditioning, so the same discriminator
# wrapper (§3.3) serves it and SD's UNet2DConditionModel.

TOY_UNET_CONFIG = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=32,
    num_class_embeds=11,  # 10 classes + a null class (index 10) for classifier-free guidance
)


class EDMPrecond(nn.Module):
    """D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c)   (EDM Table 1)."""

    def __init__(self, unet, sigma_data=0.5, num_classes=10):
        super().__init__()
        self.unet, self.sigma_data, self.num_classes = unet, sigma_data, num_classes

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4
        if class_labels is None:
            class_labels = torch.full((len(x),), self.num_classes, dtype=torch.long, device=x.device)
        F_x = self.unet((c_in * x).float(), c_noise, class_labels=class_labels).sample
        return c_skip * x.float() + c_out * F_x.float()


def build_toy_teacher(dropout=0.0):
    from diffusers import UNet2DModel
    return EDMPrecond(UNet2DModel(**TOY_UNET_CONFIG, dropout=dropout))


def guided(w):
    """The one rule for classifier-free guidance, diffusers' (the pipelines'
    do_classifier_free_guidance): on when w > 1; w <= 1 is the conditional model
    alone (one NFE per step). One w per sample (--cfg_range, whose LOW is >= 1)
    is always guided."""
    return torch.is_tensor(w) or w > 1


def guided_denoiser(net, guidance):
    """Classifier-free guidance for a class-conditional EDM net (null class =
    num_classes): D_w = D_uncond + w (D_cond - D_uncond). w is a number or one
    value per sample; unguided (guided(w) false) it is the net itself."""
    if not guided(guidance):
        return net

    def D(x, sigma, labels):
        w = torch.as_tensor(guidance, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        null = torch.full_like(labels, net.num_classes)
        d = net(torch.cat([x, x]), torch.cat([sigma.reshape(-1)] * 2), torch.cat([null, labels]))
        d_uncond, d_cond = d.chunk(2)
        return d_uncond + w * (d_cond - d_uncond)
    return D


def guidance_embedding(w, dim=256):
    """Sinusoidal embedding of (w - 1), as diffusers' pipelines build `timestep_cond`
    for U-Nets with time_cond_proj_dim (so an exported student runs in them)."""
    w = (w.float() - 1) * 1000
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=w.device))
    args = w[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], 1)


def edm_sigma_steps(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM time steps (Eq. 5 of Karras et al.), float64, with sigma_N = 0 appended."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def edm_heun_sampler(D, z, labels=None, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, round_sigma=None):
    """EDM Algorithm 1 (deterministic Heun, S_churn = 0): 2N - 1 = 35 NFE for N = 18.
    The ODE state is kept in float64, as in NVlabs' reference sampler; D is called
    in float32. Returns x0 in float64. z is the unit-variance noise of the pair."""
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)
    if round_sigma is not None:
        t_steps = torch.cat([round_sigma(t_steps[:-1]), t_steps[-1:]])
    x_next = z.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Euler step.
        denoised = D(x_cur.float(), t_cur.float().expand(len(z)).to(z.device), labels).to(torch.float64)
        d_cur = (x_cur - denoised) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        # Apply 2nd order correction.
        if i < num_steps - 1:
            denoised = D(x_next.float(), t_next.float().expand(len(z)).to(z.device), labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def load_toy_teacher(path):
    """The toy teacher from a .safetensors state dict (config: TOY_UNET_CONFIG)."""
    from safetensors.torch import load_file
    net = build_toy_teacher()
    with or_fail(f"toy teacher '{path}' is unreadable", "train one with 'python 01_make_pairs.py --preset toy "
                 "--train_teacher' or pass --teacher PATH"):  # missing, a folder, corrupt, another architecture
        net.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return net.eval().requires_grad_(False)


def load_edm_pickle(path):
    """The official NVlabs EDM network pickle, used as a black-box denoiser
    D(x, sigma, class_labels). Unpickling needs NVlabs' torch_utils and dnnlib."""
    if path is None:
        fail("the EDM teacher is a pickle of NVlabs' network: pass --teacher PATH.pkl, e.g. edm-cifar10-32x32-cond-vp.pkl")
    with or_fail(f"EDM teacher pickle '{path}' is unreadable"), open(path, "rb") as f:
        try:
            data = pickle.load(f)
        except ModuleNotFoundError as e:  # a SystemExit passes or_fail
            fail(f"unpickling '{path}' needs NVlabs' EDM code ('{e.name}' is missing): clone "
                 f"github.com/NVlabs/edm and put it on PYTHONPATH so that torch_utils and dnnlib import")
    net = data["ema"] if isinstance(data, dict) and "ema" in data else data
    if not hasattr(net, "sigma_data") or not isinstance(getattr(net, "model", None), nn.Module):
        fail(f"'{path}' does not hold an EDM network (no 'ema' entry with sigma_data and an inner network 'model')")
    net.model.register_forward_hook(_in_its_input_dtype)
    return net.eval().requires_grad_(False)


def _in_its_input_dtype(module, args, out):
    """EDM's preconditioning asserts that its inner network returns the dtype it was
    given (float32; float16 with use_fp16 on CUDA). Under bf16 autocast (Table A1's
    precision) the network's convolutions return bf16: cast its output back, so that
    the convolutions run in bf16 and the preconditioning's arithmetic stays float32."""
    return out.to(args[0].dtype)


def seed_noise(seeds, shape):
    """z ~ N(0, I) for each seed, on the CPU generator: the same whatever the batch
    size, the number of ranks or the device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class EDMTeacher:
    """The EDM family (toy teacher, or the official CIFAR10 pickle) behind the one
    teacher interface: noise/condition from a seed, the ODE solver, x0(x_t, t, c)
    and the student's one-step map G(z, c) = D(sigma_max z; sigma_max, c)."""

    family = "edm"

    def __init__(self, cfg, device, dtype=None):
        self.cfg, self.device = cfg, device
        # sampling precision: autocast over the float32 weights (float32: none); the official network's own
        # use_fp16 (float16 on CUDA) applies as pickled
        self.dtype = getattr(torch, dtype or cfg.get("dtype") or "float32")
        path = cfg["teacher"]
        if cfg["arch"] == "toy" or (path and path.endswith(".safetensors")):
            self.net, self.kind = load_toy_teacher(path).to(device), "toy"
        else:
            self.net, self.kind = load_edm_pickle(path).to(device), "edm-pickle"
        self.num_classes = cfg["num_classes"]
        self.z_shape = (cfg["channels"], cfg["resolution"], cfg["resolution"])
        self.latent_space = latent_space("edm", cfg["channels"])  # pixels
        self.teacher_id = f"{os.path.basename(path)}:sha256={file_sha256(path)[:16]}"

    def noise_and_condition(self, seeds):
        """z ~ N(0, I) and a class label, both drawn from each pair's own seed on
        the CPU generator: identical whatever the batch size or number of ranks."""
        z = torch.empty(len(seeds), *self.z_shape)
        labels = torch.empty(len(seeds), dtype=torch.long)
        for i, s in enumerate(seeds):  # z as seed_noise draws it, then the label from the same generator
            g = torch.Generator().manual_seed(int(s))
            z[i] = torch.randn(self.z_shape, generator=g)
            labels[i] = torch.randint(self.num_classes, (1,), generator=g)
        return z, labels

    def denoiser(self, guidance=1.0):
        """D(x; sigma, labels) with integer labels (one-hot for the NVlabs net), in float32
        out, run under the teacher's autocast dtype."""
        if self.kind == "toy":
            inner = guided_denoiser(self.net, guidance)
        elif guided(guidance):
            fail("the official EDM CIFAR10 network has no unconditional mode; use --guidance 1")
        else:
            net = self.net
            inner = lambda x, sigma, labels: net(x, sigma, F.one_hot(labels, net.label_dim).float() if net.label_dim else None)

        def D(x, sigma, labels):
            with autocast(self.device, self.dtype):
                return inner(x, sigma, labels).float()
        return D

    @torch.no_grad()
    def solve(self, z, labels, guidance=None):
        c = self.cfg
        rs = getattr(self.net, "round_sigma", None) if self.kind != "toy" else None
        w = c["guidance"] if guidance is None else guidance
        return edm_heun_sampler(self.denoiser(w), z.to(self.device), labels.to(self.device),
                                c["num_steps"], c["sigma_min"], c["sigma_max"], c["rho"], round_sigma=rs)

    @property
    def nfe(self):
        return (2 * self.cfg["num_steps"] - 1) * (2 if guided(self.cfg["guidance"]) or self.cfg.get("cfg_range") else 1)

    def solver_name(self):
        return f"edm-heun-{self.cfg['num_steps']}"

    def to_images(self, x):
        return x.float().clamp(-1, 1)

    def trainable_copy(self):
        """A float32 copy of the teacher network for G or D to train (same device)."""
        return copy.deepcopy(self.net).float()

    def release_unet(self):
        """Nothing to free: the EDM teachers are small."""


def load_teacher(cfg, device, dtype=None):
    """The one entry point for every teacher family. `dtype` is its precision (default
    cfg['dtype']; 01 and 05 pass --teacher_dtype): SD's weights, EDM's autocast."""
    return (EDMTeacher if cfg["family"] == "edm" else LDMTeacher)(cfg, device, dtype)


# ----------------------------------------------------------------------------
# 2. Latent diffusion teachers (SD1.5 / SDXL), built from diffusers' own pipeline:
# its from_pretrained loads the parts and its encode_prompt builds the text
# conditioning (one vs two text encoders, SDXL's pooled embedding and zero
# negative). What stays ours is the DDIM + guidance loop (Eq. 1), which takes a
# guidance scale per pair, and SDXL's micro-conditioning time ids.

SD_CONFIGS = os.path.join(REPO, "assets", "sd_configs")  # SD1.5 / SDXL part configs, for --teacher random


NOT_LOADED = ("safety_checker", "feature_extractor", "image_encoder")  # pipeline parts no stage runs


def hub_patterns(index, parts=None):
    """snapshot_download's allow_patterns for a pipeline's `parts` (default: every part in
    model_index.json that a stage loads): each part's configs, tokenizer files and its one
    full-precision safetensors file (or its shards). A hub repo also holds fp16 and non-EMA
    copies (`*.fp16.safetensors`, `*.non_ema.safetensors`), single-file checkpoints at its
    root and the safety checker: none matches, so SD1.5 costs the 4.3 GB it loads (SDXL 13.9 GB)."""
    parts = parts or [k for k, v in index.items() if isinstance(v, list) and v[0] and k not in NOT_LOADED]
    weights = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-*-of-*.safetensors",
               "model.safetensors", "model-*-of-*.safetensors")
    return ["model_index.json"] + [f"{p}/{w}" for p in parts for w in ("*.json", "*.txt", "*.model", *weights)]


def resolve_pretrained(src, parts=None):
    """A local diffusers folder as is; a hub id through huggingface_hub's snapshot_download, which
    reads its own cache (offline: HF_HUB_OFFLINE=1, or when the hub does not answer) and fetches
    only what hub_patterns names of `parts` and is not there yet."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src) or src.startswith((".", "/")) or src.count("/") != 1:
        fail(f"teacher '{src}' is neither a diffusers folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    with or_fail(f"model '{src}' is not in the Hugging Face cache and could not be fetched (HF_HUB_OFFLINE="
                 f"{os.environ.get('HF_HUB_OFFLINE', '0')})", f"fill the cache where the hub answers (docs/real_run.md, "
                 f"\"Offline compute nodes\"), or pass a local folder with --teacher"):
        index = json.load(open(os.path.join(snapshot_download(src, allow_patterns=["model_index.json"], etag_timeout=10),
                                            "model_index.json")))
        return snapshot_download(src, allow_patterns=hub_patterns(index, parts), etag_timeout=10)


def synthetic_clip_tokenizer(vocab_size=49408):
    """A CLIP BPE tokenizer that needs no download: single characters plus a few
    merges, padded with unused tokens to `vocab_size`. It tokenises any text; the
    ids are not CLIP's, so it serves random-weight models (tests, sizing) only."""
    from transformers import CLIPTokenizer
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    merges = ["t h", "th e</w>", "a n", "o n</w>", "i n", "e r</w>"]
    words = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    words += [f"unused{i}</w>" for i in range(vocab_size - 2 - len(words))] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(words)}
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)


def sd_scheduler():
    """SD1.5's (and SDXL's) noise schedule as a DDIMScheduler (assets/sd_configs/scheduler.json)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_config(json.load(open(os.path.join(SD_CONFIGS, "scheduler.json"))))


def random_teacher(kind, out_dir, device):
    """`--teacher random`: the real SD1.5 / SDXL architecture (U-Net, VAE, CLIP text
    encoders, from assets/sd_configs/<kind>) with seeded random weights, written once
    as a diffusers folder under <out_dir>/random_teacher, which every stage then loads
    like a downloaded model. For sizing memory and speed only: its pairs mean nothing."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    folder = os.path.join(out_dir, "random_teacher")
    if not os.path.isfile(os.path.join(folder, "model_index.json")) and is_main():
        print0(f"building a random-weight {kind} teacher at real size in '{folder}' (once)")
        read = lambda part: json.load(open(os.path.join(SD_CONFIGS, kind, part + ".json")))
        tok = synthetic_clip_tokenizer()
        torch.manual_seed(0)
        with torch.device(device):  # initialising 2.6B parameters is much faster on a GPU
            parts = dict(unet=UNet2DConditionModel.from_config(read("unet")).half(),
                         vae=AutoencoderKL.from_config(read("vae")).half(), tokenizer=tok)
            for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
                if os.path.isfile(os.path.join(SD_CONFIGS, kind, name + ".json")):
                    parts[name] = cls(CLIPTextConfig(**read(name) | dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                                          pad_token_id=tok.pad_token_id))).half()
        if kind == "sdxl":
            pipe = StableDiffusionXLPipeline(**parts, tokenizer_2=tok, scheduler=sd_scheduler())
        else:
            pipe = StableDiffusionPipeline(**parts, scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        atomic(folder, pipe.save_pretrained)
    barrier()  # the other ranks load it once rank 0 has written it
    return folder


def x0_from_model_output(out, x_t, alpha_bar, prediction_type="epsilon"):
    """Eq. 7: data prediction x0 = (x_t - sigma_t eps) / alpha_t, with alpha_t =
    sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t). v-prediction teachers
    (x0 = alpha_t x_t - sigma_t v) are handled too."""
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (x_t - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * out
    fail(f"unsupported prediction_type '{prediction_type}'")


class LDMTeacher:
    """SD1.5 / SDXL behind the one teacher interface, from the diffusers pipeline's own
    parts and text encoding. The ODE is diffusers' DDIM (configured from the teacher's
    own scheduler config) with classifier-free guidance; cond and uncond go through
    the U-Net as one batch, as in StableDiffusion(XL)Pipeline, so the stored x equals
    the pipeline's latents."""

    family = "ldm"

    def __init__(self, cfg, device, dtype=None):
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
        self.cfg, self.device, self.kind = cfg, device, cfg["arch"]
        src = cfg["teacher"]
        self.path = path = random_teacher(self.kind, cfg["out_dir"], device) if src == "random" else resolve_pretrained(src)
        with or_fail(f"teacher '{src}': its model_index.json is unreadable", "pass a complete diffusers folder with --teacher"):
            index = json.load(open(os.path.join(path, "model_index.json")))
            found = "sdxl" if "XL" in index["_class_name"] else "sd15"
        if found != self.kind:
            fail(f"teacher '{src}' is an {found.upper()} model but --preset is {cfg['preset']} (a {self.kind} preset); use --preset {found}")
        self.dtype = getattr(torch, dtype or cfg.get("dtype") or "float32")  # the frozen parts' weights
        cls, extra = (StableDiffusionXLPipeline, {}) if self.kind == "sdxl" else \
            (StableDiffusionPipeline, dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False))
        extra.update({k: None for k in NOT_LOADED if isinstance(index.get(k), list) and index[k][0] and k not in extra})
        for part, v in index.items():  # the pipeline's own error for a missing part names only the folder above it
            if isinstance(v, list) and v[0] and part not in extra and not os.path.isdir(os.path.join(path, part)):
                fail(f"teacher folder '{path}' is missing the '{part}' component needed by {self.kind}")
        with or_fail(f"teacher '{src}' does not load", "download it again, or pass a complete diffusers folder with --teacher"):
            self.pipe = p = cls.from_pretrained(path, torch_dtype=self.dtype, **extra)
        p.to(device)
        logging.getLogger(cls.__module__).setLevel(logging.ERROR)  # CLIP truncates prompts at 77 tokens, and says so per call
        for sfx in ("", "_2") if self.kind == "sdxl" else ("",):  # an offline hub id can silently give a degenerate tokenizer
            n, vocab = len(getattr(p, "tokenizer" + sfx)), getattr(p, "text_encoder" + sfx).config.vocab_size
            if n > vocab or n < vocab // 2:
                fail(f"tokenizer{sfx} of '{src}' has {n} tokens but text_encoder{sfx} expects {vocab}: the tokenizer did not "
                     f"load properly; pass a complete local folder with --teacher")
        for m in p.components.values():
            if isinstance(m, nn.Module):
                m.eval().requires_grad_(False)
        if p.vae.config.get("force_upcast", False):  # SDXL's VAE overflows in fp16: fp32 when its config asks
            p.vae.to(torch.float32)
        self.unet, self.vae, self.scaling_factor = p.unet, p.vae, p.vae.config.scaling_factor
        self.latent_space = latent_space("ldm", p.vae.config.latent_channels, self.scaling_factor)
        self.scheduler = DDIMScheduler.from_config(p.scheduler.config)
        self.pixel_res = cfg["resolution"]
        r = self.pixel_res // p.vae_scale_factor
        self.z_shape = (self.unet.config.in_channels, r, r)
        self.scheduler.set_timesteps(cfg["num_steps"])
        self.timesteps = self.scheduler.timesteps.clone()
        # Eq. 8: the student's T is the first timestep of the teacher's own DDIM
        # schedule (981 for SD1.5/SDXL's 'leading' spacing with steps_offset 1):
        # the teacher's ODE reads z as x_T at exactly that timestep, so G(z, c) at
        # initialisation is the teacher's own first x0 prediction on the trajectory.
        self.T = int(self.timesteps[0])
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float32)
        self.prediction_type = self.scheduler.config.prediction_type
        # which teacher made a run's pairs and students: the hub id or the folder's name (a run folder moves
        # between clones and machines) and the weights themselves (a retrained teacher is another teacher)
        name = os.path.basename(os.path.abspath(src)) if os.path.isdir(src) else src
        parts = ["model_index.json"] + [k for k, v in index.items() if isinstance(v, list) and v[0] and k not in extra]
        self.teacher_id = f"{name}:sha256={folder_fingerprint(path, parts)[:16]}"

    def noise_and_condition(self, seeds):
        """z from each pair's seed on the CPU generator (the prompts are the caller's)."""
        return seed_noise(seeds, self.z_shape), None

    @torch.no_grad()
    def encode_prompts(self, prompts, with_uncond=False):
        """U-Net kwargs from the pipeline's encode_prompt; with_uncond: the negative
        (empty prompt, or SDXL's zeros) batched first, for one guided U-Net call."""
        p, n, r = self.pipe, len(prompts), self.pixel_res
        if self.kind == "sd15":
            e, ne = p.encode_prompt(list(prompts), self.device, 1, with_uncond)
            return dict(encoder_hidden_states=torch.cat([ne, e]) if with_uncond else e)
        e, ne, pool, npool = p.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=with_uncond)
        ids = p._get_add_time_ids((r, r), (0, 0), (r, r), dtype=e.dtype,  # micro-conditioning: size, crop (0, 0), size
                                  text_encoder_projection_dim=p.text_encoder_2.config.projection_dim).to(self.device).repeat(n, 1)
        if with_uncond:
            e, pool, ids = torch.cat([ne, e]), torch.cat([npool, pool]), torch.cat([ids, ids])
        return dict(encoder_hidden_states=e, added_cond_kwargs=dict(text_embeds=pool, time_ids=ids))

    # --- the ODE ----------------------------------------------------------------
    def eps(self, x, t, cond):
        return self.unet(x.to(self.dtype), t, **cond).sample.float()

    @torch.no_grad()
    def solve(self, z, prompts, guidance=None):
        """DDIM with classifier-free guidance (Eq. 1's x). The state stays float32."""
        w = self.cfg["guidance"] if guidance is None else guidance
        cfg_on = guided(w)
        w = torch.as_tensor(w, dtype=torch.float32, device=self.device).reshape(-1, 1, 1, 1)
        cond = self.encode_prompts(prompts, with_uncond=cfg_on)
        x = z.to(self.device, torch.float32) * self.scheduler.init_noise_sigma
        for t in self.timesteps:
            inp = torch.cat([x, x]) if cfg_on else x
            inp = self.scheduler.scale_model_input(inp, t)
            e = self.eps(inp, t, cond)
            if cfg_on:
                e_uncond, e_cond = e.chunk(2)
                e = e_uncond + w * (e_cond - e_uncond)
            x = self.scheduler.step(e, t, x).prev_sample
        return x

    @property
    def nfe(self):
        return self.cfg["num_steps"] * (2 if guided(self.cfg["guidance"]) or self.cfg.get("cfg_range") else 1)

    def solver_name(self):
        return f"ddim-{self.cfg['num_steps']}"

    def trainable_copy(self):
        """A float32 copy of the teacher U-Net for G or D to train, on the teacher's
        device. A bf16/fp16 teacher is reloaded from its checkpoint in float32, so
        that Eq. 8's "student = teacher at init" holds to fp32 precision rather than
        to the frozen copy's bf16 rounding."""
        if self.dtype == torch.float32:
            return copy.deepcopy(self.unet).requires_grad_(True)
        from diffusers import UNet2DConditionModel
        return UNet2DConditionModel.from_pretrained(self.path, subfolder="unet", torch_dtype=torch.float32).to(self.device)

    def release_unet(self):
        """Training needs the frozen U-Net only to build G and D and the held-out
        x; moving it to the CPU afterwards frees 1.7 GB (SD1.5) / 5.1 GB (SDXL, bf16)."""
        self.unet.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def decode(self, x):
        """Latents -> pixels, differentiable and unclamped: the decoder inside the
        Table 1 LPIPS baseline (--loss lpips), whose gradient must reach G. The frozen
        VAE runs in its own dtype: the run's --dtype (bf16 in Table A1), or float32
        for a VAE that asks for it (SDXL's force_upcast)."""
        return self.vae.decode((x / self.scaling_factor).to(self.vae.dtype)).sample.float()

    @torch.no_grad()
    def to_images(self, x):
        """Latents -> images in [-1, 1] for grids and metrics (no gradient)."""
        return self.decode(x).clamp(-1, 1)


# ----------------------------------------------------------------------------
# 3. The student G(z, c) (Eq. 8): a trainable copy of the teacher network in the
# data-prediction parameterisation; 03 trains it, 04 fine-tunes it, 05 samples it.

class Student(nn.Module):
    """G(z, c): a trainable copy of the teacher network in the data-prediction
    parameterisation. EDM: G = D(sigma_max z; sigma_max, c). SD: Eq. 8.
    With cfg_range the student also takes the guidance scale w through a
    zero-initialised projection added to its time embedding (diffusers'
    `time_embedding.cond_proj`), so at initialisation it is exactly the teacher's
    one-step map for every w."""

    W_DIM = 256

    def __init__(self, teacher, cfg):
        super().__init__()
        self.family = teacher.family
        if self.family == "edm":
            self.net = teacher.trainable_copy().train().requires_grad_(True)
            self.sigma_max = cfg["sigma_max"]
            self.num_classes = teacher.num_classes
        else:
            self.net = teacher.trainable_copy().train().requires_grad_(True)  # Eq. 8 at fp32, not bf16-rounded
            self.T, self.prediction_type = teacher.T, teacher.prediction_type
            self.register_buffer("alpha_bar_T", teacher.alphas_cumprod[teacher.T].clone())
        self.w_cond = bool(cfg.get("cfg_range"))
        if self.w_cond:
            if self.family == "edm" and teacher.kind != "toy":
                fail("--cfg_range needs a teacher with an unconditional mode (toy, sd15, sdxl)")
            unet = self.net.unet if self.family == "edm" else self.net
            te = unet.time_embedding
            te.cond_proj = nn.Linear(self.W_DIM, te.linear_1.in_features, bias=False)
            nn.init.zeros_(te.cond_proj.weight)
            if self.family == "ldm":  # a standard diffusers config: pipelines pass timestep_cond themselves
                self.net.register_to_config(time_cond_proj_dim=self.W_DIM)
            else:  # UNet2DModel calls time_embedding(t_emb) without a condition: supply it
                te.register_forward_pre_hook(_w_condition_hook)  # reads the module's own w (EMA copies stay apart)
        self._w_emb = None

    def forward(self, z, cond, w=None):
        if self.w_cond:
            if w is None:
                fail("this student is guidance-conditioned: pass the guidance scale w")
            self._w_emb = guidance_embedding(torch.as_tensor(w, dtype=torch.float32, device=z.device).reshape(-1).expand(len(z)),
                                             self.W_DIM)
            (self.net.unet if self.family == "edm" else self.net).time_embedding._w_emb = self._w_emb
        if self.family == "edm":
            sigma = torch.full((len(z),), self.sigma_max, device=z.device)
            if hasattr(self.net, "label_dim"):  # NVlabs network: one-hot labels
                return self.net(z * self.sigma_max, sigma, F.one_hot(cond, self.net.label_dim).float()).float()
            return self.net(z * self.sigma_max, sigma, cond)
        dt = next(self.net.parameters()).dtype  # frozen encoders may emit bf16; outside autocast match our weights
        extra = dict(timestep_cond=self._w_emb.to(dt)) if self.w_cond else {}
        out = self.net(z.to(dt), self.T, **map_cond(lambda t: t.to(dt), cond), **extra).sample  # Eq. 8, T = the teacher's first DDIM step
        # in float32 even under bf16 autocast: 1 / alpha_T is about 13 at T = 981, and would magnify bf16's rounding too
        return x0_from_model_output(out.float(), z.float(), self.alpha_bar_T.float(), self.prediction_type)


def _w_condition_hook(module, args):
    return (args[0], module._w_emb) if len(args) == 1 else None


def student_cond(teacher, cond, device):
    """Labels to the device, or prompts through the frozen text encoder(s)."""
    if teacher.family == "edm":
        return cond.to(device)
    return teacher.encode_prompts(list(cond))


def map_cond(fn, *conds):
    """fn applied leaf by leaf to one or more conditions of the same shape: a label
    tensor, or the U-Net's (nested) kwargs dict, e.g. map_cond(lambda t: t[:n], c)."""
    if isinstance(conds[0], dict):
        return {k: map_cond(fn, *(c[k] for c in conds)) for k in conds[0]}
    return fn(*conds)


# ----------------------------------------------------------------------------
# 4. LatentLPIPS (§3.2, App. B). F is VGG16-bn (torchvision's `features` layout,
# 44 modules) whose input conv takes the space's channels and whose first three
# max-pools are Identity. Its five taps end the five conv stages (each slice ends
# where a pool sits), as in the official E-LatentLPIPS checkpoints, so those load
# by renaming keys only.

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG_SLICES = (0, 7, 14, 24, 34, 44)  # features[a:b] for the 5 taps


class LatentVGG(nn.Module):
    """F: VGG16-bn for a space with `in_ch` channels. `width` scales the channels
    (1.0 = the paper's; the toy uses 0.25). The head is used only as the phase-1
    classifier (global average pool + linear; the paper used VGG's FC stack)."""

    def __init__(self, in_ch=4, width=1.0, pools_removed=3, num_classes=1000):
        super().__init__()
        layers, c, pools = [], in_ch, 0
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.Identity() if pools < pools_removed else nn.MaxPool2d(2, 2))
                pools += 1
            else:
                w = max(8, int(v * width))
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
        self.slices = nn.ModuleList(
            nn.Sequential(*[layers[i] for i in range(a, b)]) for a, b in zip(VGG_SLICES[:-1], VGG_SLICES[1:]))
        # keep torchvision's global indices in the names (slice k holds features[a:b])
        for s, (a, b) in zip(self.slices, zip(VGG_SLICES[:-1], VGG_SLICES[1:])):
            s._modules = type(s._modules)((str(a + i), m) for i, m in enumerate(s._modules.values()))
        self.chns = [max(8, int(v * width)) for v in (64, 128, 256, 512, 512)]
        self.head = nn.Linear(self.chns[-1], num_classes)
        self.in_ch = in_ch

    def taps(self, x):
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out

    def forward(self, x):
        return self.head(self.taps(x)[-1].mean((2, 3)))


def unit_normalize(f, eps=1e-10):
    """LPIPS: unit-normalise each feature vector over channels."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


class LatentLPIPS(nn.Module):
    """d(x0, x1) = sum_l mean_hw( w_l . (n(F_l(x0)) - n(F_l(x1)))^2 ), w_l >= 0.
    The network is frozen and stays in eval mode whatever .train() says, so no
    dropout or BatchNorm statistics leak into a training run that uses it."""

    def __init__(self, in_ch=4, width=1.0, pools_removed=3, num_classes=1000):
        super().__init__()
        self.config = dict(in_ch=in_ch, width=width, pools_removed=pools_removed, num_classes=num_classes)
        self.net = LatentVGG(in_ch, width, pools_removed, num_classes)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.net.chns)
        for lin in self.lins:  # uncalibrated start: the plain sum over channels
            nn.init.ones_(lin.weight)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode=True):  # always eval: BatchNorm uses its running stats
        return super().train(False)

    def forward(self, x0, x1, per_layer=False):
        f0, f1 = self.net.taps(x0.float()), self.net.taps(x1.float())
        layers = [F.conv2d((unit_normalize(a) - unit_normalize(b)) ** 2, lin.weight.clamp(min=0)).mean((1, 2, 3))
                  for a, b, lin in zip(f0, f1, self.lins)]
        d = sum(layers)
        return (d, layers) if per_layer else d


def latent_space(family, channels, vae_scaling_factor=None):
    """The space a LatentLPIPS works in: pixels (edm) or a VAE's latents (ldm). App. B:
    SD1.5's and SDXL's latents both have 4 channels but differ, told apart here by the
    VAE's scaling factor (0.18215, 0.13025)."""
    return dict(family=family, channels=channels, vae_scaling_factor=vae_scaling_factor)


OFFICIAL_LPIPS_SPACES = {"sd15": latent_space("ldm", 4, 0.18215), "sdxl": latent_space("ldm", 4, 0.13025)}  # by file name


def load_latent_lpips(path, in_ch=None, space=None):
    """Our checkpoint (from 02, which records its latent space) or an official
    E-LatentLPIPS tuned checkpoint (sd15_latest_vgg16_tuned.pth / sdxl_..., whose name
    says its space); `.space` and `.path` say where it came from. With `in_ch` and
    `space` (latent_space(...)) it is checked against a teacher's space (check_lpips)."""
    with or_fail(f"LatentLPIPS checkpoint '{path}' is unreadable", "run 02_train_latent_lpips.py or pass --lpips_ckpt"):
        ck = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ck, dict) and "config" in ck and "state_dict" in ck:
        cfg, sd, found = ck["config"], ck["state_dict"], ck.get("latent_space", "unrecorded")
    else:
        found = OFFICIAL_LPIPS_SPACES.get(os.path.basename(path).split("_")[0], "unnamed")
        sd = map_official_lpips(ck)
        w0 = sd.get("net.slices.0.0.weight")
        if w0 is None:
            fail(f"'{path}' is neither our LatentLPIPS checkpoint nor an official E-LatentLPIPS one")
        cfg = dict(in_ch=w0.shape[1], width=w0.shape[0] / 64, pools_removed=3, num_classes=1000)
    check_finite(sd, f"LatentLPIPS checkpoint '{path}'", "retrain it with 02_train_latent_lpips.py or pass another --lpips_ckpt")
    with torch.random.fork_rng(devices=[]):  # built without drawing from the global RNG (the run's seeded parts, D's heads,
        model = LatentLPIPS(**cfg)           # come out the same wherever this file is read)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("net.head") for k in missing):
        fail(f"'{path}' does not match the LatentLPIPS layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.space, model.path = found, path
    return check_lpips(model, in_ch, space) if in_ch is not None or space is not None else model


def check_lpips(model, in_ch, space):
    """Refuse a LatentLPIPS of another space: other channels, or other latents (SD1.5 and SDXL
    latents both have 4 channels but differ, App. B). A random one (sizing mode) passes."""
    path, found = model.path, model.space
    if in_ch is not None and model.config["in_ch"] != in_ch:
        fail(f"LatentLPIPS checkpoint '{path}' takes {model.config['in_ch']}-channel inputs but this space has {in_ch} channels")
    if space is None:
        return model
    if found == "unrecorded":
        fail(f"LatentLPIPS checkpoint '{path}' records no latent space: rerun 02_train_latent_lpips.py --calibrate_only")
    if found == "unnamed":
        fail(f"LatentLPIPS checkpoint '{path}': an official file's name says its latent space "
             f"({' | '.join(f'{k}_latest_vgg16_tuned.pth' for k in OFFICIAL_LPIPS_SPACES)}); keep that name")
    if space is not None and found not in ("random", space):
        fail(f"LatentLPIPS checkpoint '{path}' was trained on {found} but this teacher's space is {space} "
             f"(SD1.5 and SDXL latents differ, App. B): train one on this space with 02, or pass its own --lpips_ckpt")
    return model


def map_official_lpips(sd):
    """Rename an official E-LatentLPIPS state dict to ours: net.slice{k}.{i}.* ->
    net.slices.{k-1}.{i}.*, lin{k}.model.1.weight -> lins.{k}.weight. The
    duplicate 'lins.*' entries of that layout are dropped."""
    import re
    out = {}
    for k, v in sd.items():
        k = k[7:] if k.startswith("module.") else k
        m = re.fullmatch(r"net\.slice(\d)\.(\d+)\.(.+)", k)
        if m:
            out[f"net.slices.{int(m[1]) - 1}.{m[2]}.{m[3]}"] = v
        m = re.fullmatch(r"lin(\d)\.model\.\d+\.weight", k)
        if m:
            out[f"lins.{m[1]}.weight"] = v
    return out


# ----------------------------------------------------------------------------
# 5. The augmentation T of E-LatentLPIPS (Eq. 3): the official E-LatentLPIPS
# port of StyleGAN2-ADA's differentiable augmentation, applied alike to both inputs.

class Augment(nn.Module):
    """T in Eq. 3: one random differentiable augmentation per call, applied
    identically to both inputs. The distributions are the official E-LatentLPIPS
    ones (its port of StyleGAN2-ADA's augmentation, every transform on); sizes are
    the latent's height H and width W:
      b  blit: x-flip (p 1/2), rotation by k*90 degrees, integer translation
         round(U(-0.125, 0.125) * size), reflect padding
      g  geometric: isotropic scale 2^N(0, 0.2), rotation U(-pi, pi), anisotropic
         scale (s, 1/s) with s = 2^N(0, 0.2), another rotation U(-pi, pi), fractional
         translation N(0, 0.125) * size; reflect padding (kornia's warp)
      c  colour: brightness + U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5)
         (any channel count)
      o  cutout: a square of half the size, centred uniformly, is zeroed
    Spelled as the official presets (b, g, c, o, bg, bgc, bgco) or as the paper
    writes them ('bg+cutout', 'bgc+cutout')."""

    def __init__(self, spec="bgc+cutout"):
        super().__init__()
        letters = augment_letters(spec)
        self.spec, self.b, self.g, self.c, self.cutout = spec, "b" in letters, "g" in letters, "c" in letters, "o" in letters

    def draw(self, B, H, W, device):
        """One draw of every parameter, per sample (what forward applies to both inputs)."""
        u = lambda *shape: torch.rand(B, *shape, device=device)
        n = lambda *shape: torch.randn(B, *shape, device=device)
        size = torch.tensor([H, W], device=device, dtype=torch.float32)
        p = {}
        if self.b:
            p.update(flip=u() < 0.5, rot90=torch.randint(4, (B,), device=device),
                     shift=((u(2) * 2 - 1) * 0.125 * size).round().long())
        if self.g:
            p.update(scale=torch.exp2(n() * 0.2), rot1=(u() * 2 - 1) * math.pi, aniso=torch.exp2(n() * 0.2),
                     rot2=(u() * 2 - 1) * math.pi, frac=n(2) * 0.125 * size)
        if self.c:
            p.update(bright=u(1, 1, 1) - 0.5, sat=u(1, 1, 1) * 2, con=u(1, 1, 1) + 0.5)
        if self.cutout:
            p.update(centre=u(2))
        return p

    def forward(self, x0, x1, params=None):
        B, _, H, W = x0.shape
        p = self.draw(B, H, W, x0.device) if params is None else params
        xs = [x0.float(), x1.float()]
        if self.b:
            xs = [_blit(x, p["flip"], p["rot90"], p["shift"]) for x in xs]
        if self.g:
            from kornia.geometry.transform import warp_affine
            m = _geometric_matrix(p, H, W)
            xs = [warp_affine(x, m, (H, W), padding_mode="reflection", align_corners=False) for x in xs]
        if self.c:
            xs = [_colour(x, p["bright"], p["sat"], p["con"]) for x in xs]
        if self.cutout:
            gy = (torch.arange(H, device=x0.device).float() + 0.5)[None, :, None] / H
            gx = (torch.arange(W, device=x0.device).float() + 0.5)[None, None, :] / W
            cy, cx = p["centre"][:, 0, None, None], p["centre"][:, 1, None, None]
            keep = (((gy - cy).abs() >= 0.25) | ((gx - cx).abs() >= 0.25)).float()[:, None]
            xs = [x * keep for x in xs]
        return xs


def _blit(x, flip, k, shift):
    """x-flip, k*90-degree rotation, then an integer translation with reflect padding."""
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if x.shape[2] == x.shape[3]:
        x = torch.stack([torch.rot90(xi, int(ki), (1, 2)) for xi, ki in zip(x, k)])
    H, W = x.shape[-2:]
    m = max(1, int(shift.abs().max()))
    xp = F.pad(x, (m, m, m, m), mode="reflect")
    return torch.stack([xi[:, m - int(s[0]): m - int(s[0]) + H, m - int(s[1]): m - int(s[1]) + W] for xi, s in zip(xp, shift)])


def _geometric_matrix(p, H, W):
    """ADA's geometric chain as one 2x3 pixel-space matrix per sample, about the
    image centre: translate(frac) . rotate(rot2) . scale(aniso, 1/aniso) .
    rotate(rot1) . scale(iso)."""
    B = len(p["scale"])

    def rot(t):
        c, s = t.cos(), t.sin()
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    diag = lambda a, b: torch.diag_embed(torch.stack([a, b], -1))
    A = rot(p["rot2"]) @ diag(p["aniso"], 1 / p["aniso"]) @ rot(p["rot1"]) @ diag(p["scale"], p["scale"])
    centre = torch.tensor([(W - 1) / 2, (H - 1) / 2], device=A.device).expand(B, 2)
    t = centre - (A @ centre[..., None])[..., 0] + p["frac"].flip(-1)  # frac is (y, x); the matrix acts on (x, y)
    return torch.cat([A, t[..., None]], -1)


def _colour(x, bright, sat, con):
    x = x + bright                                   # brightness
    m = x.mean(1, keepdim=True)
    x = m + (x - m) * sat                            # saturation: spread around the per-pixel channel mean
    mu = x.mean((1, 2, 3), keepdim=True)
    return mu + (x - mu) * con                       # contrast


def augment_letters(spec):
    """'bgco' or 'bgc+cutout' -> its letters (o = cutout); ValueError for anything else."""
    letters, _, extra = str(spec).partition("+")
    if extra not in ("", "cutout") or set(letters) - set("bgco") or not letters:
        raise ValueError(spec)
    return letters + ("o" if extra else "")


# ----------------------------------------------------------------------------
# 6. The regression loss d of Eq. 1: one row of LOSSES per --loss name (Table 1),
# and the LPIPS network it reads.

def _pixel_lpips(L, a, b):
    """Decode to pixels (SD; differentiable, unclamped), resize if asked, then pixel LPIPS."""
    pa, pb = (L.decode(a), L.decode(b)) if L.decode is not None else (a, b)
    if L.pixel_size:
        pa, pb = (F.interpolate(p, size=L.pixel_size, mode="bilinear", align_corners=False) for p in (pa, pb))
    return L.pixel_lpips(pa, pb)


# --loss: d(a, b) of Eq. 1, one value per sample, and what it needs ("latent": a LatentLPIPS
# checkpoint, "pixel": pixel LPIPS and the decoder). Dispatched by exact name; a fork adds a
# row (docs/forking.md), and `L` gives it the RegressionLoss (L.cfg: the run's settings).
LOSSES = {
    "elatent": (lambda L, a, b: L.lpips(*L.aug(a, b)), "latent"),  # E-LatentLPIPS (Eq. 3)
    "elatent+latent": (lambda L, a, b: L.lpips(*L.aug(a, b)) + L.lpips(a, b), "latent"),  # E-LatentLPIPS*: the sum
    "elatent+latent/2": (lambda L, a, b: (L.lpips(*L.aug(a, b)) + L.lpips(a, b)) / 2, "latent"),  # their average
    "latent": (lambda L, a, b: L.lpips(a, b), "latent"),  # LatentLPIPS (Eq. 2 without the decoder)
    "lpips": (_pixel_lpips, "pixel"),  # the Table 1 baseline
    "mse": (lambda L, a, b: (a - b).pow(2).mean((1, 2, 3)), None),
    "huber": (lambda L, a, b: ((a - b).pow(2).sum((1, 2, 3)) + (0.00054 * math.sqrt(a[0].numel())) ** 2).sqrt()
              - 0.00054 * math.sqrt(a[0].numel()), None),  # Pseudo-Huber (iCT), c = 0.00054 sqrt(dim)
}
class RegressionLoss(nn.Module):
    """d(G(z, c), x) of Eq. 1 for every --loss mode (LOSSES); returns one value per sample.
      elatent+latent    E-LatentLPIPS* (Table A1, "the ensemble"): the sum of both
      elatent+latent/2  their average (the other reading: lambda_GAN keeps its full weight)
      lpips             decode to pixels, then pixel LPIPS (the Table 1 baseline), after a
                        bilinear resize to `pixel_size` when given (cifar10: 224, as Consistency Models)
      MODE+l1           + mean |a - b|: the official package's add_l1_loss (on by default there, not in the paper)"""

    def __init__(self, mode, lpips=None, augment="bgc+cutout", decode=None, pixel_lpips=None, pixel_size=None, cfg=None):
        super().__init__()
        self.l1, mode = mode.endswith("+l1"), mode.removesuffix("+l1")
        self.fn, needs = LOSSES[mode]
        if needs == "latent" and lpips is None:
            fail(f"--loss {mode} needs a LatentLPIPS checkpoint (--lpips_ckpt)")
        self.mode, self.lpips, self.decode, self.pixel_lpips, self.pixel_size = mode, lpips, decode, pixel_lpips, pixel_size
        self.aug, self.cfg = Augment(augment), cfg or {}

    def forward(self, a, b):
        a, b = a.float(), b.float()
        d = self.fn(self, a, b)
        return d + (a - b).abs().mean((1, 2, 3)) if self.l1 else d


def read_lpips(cfg):
    """The LPIPS network that --loss needs, read from its file by 03's and 04's validate, before
    any work: a LatentLPIPS (default <out_dir>/lpips/latent_lpips.pt), or for --loss lpips the
    pixel-space one of --lpips_ckpt; None if the loss needs no file."""
    needs = LOSSES[cfg["loss"].removesuffix("+l1")][1]
    path = cfg.get("lpips_ckpt") or (os.path.join(cfg["out_dir"], "lpips", "latent_lpips.pt") if needs == "latent" else None)
    if needs is None or path is None:
        return None
    if cfg.get("benchmark_steps") and not os.path.isfile(path):  # sizing only: a random F of the preset's size
        print0(f"benchmark: no LatentLPIPS at '{path}'; using random weights of the same size")
        with torch.random.fork_rng(devices=[]):
            model = LatentLPIPS(cfg["channels"], cfg["lpips_width"], cfg["lpips_pools_removed"])
        model.space, model.path = "random", path
        return model
    return load_latent_lpips(path)


def build_loss(cfg, teacher, device, net=None):
    """The regression loss d of Eq. 1 (03) and Eq. 6's first term (04), frozen, with `net`,
    read_lpips's network (read here when not given), checked against the teacher's space."""
    net = read_lpips(cfg) if net is None else net
    lpips, decode, pixel = None, None, None
    needs = LOSSES[cfg["loss"].removesuffix("+l1")][1]
    if needs == "latent":
        lpips = check_lpips(net, teacher.z_shape[0], teacher.latent_space).to(device)
    if needs == "pixel":  # the official LPIPS, or --lpips_ckpt: a pixel-space one of 02 (toy_sd: --pixels)
        pixel = check_lpips(net, 3, latent_space("edm", 3)).to(device) if net is not None else load_pixel_lpips(device)
        decode = teacher.decode if teacher.family == "ldm" else None  # with gradient, unclamped
    return RegressionLoss(cfg["loss"], lpips, cfg["lpips_augment"] or "bgc+cutout", decode, pixel, cfg.get("lpips_resize"),
                          cfg).to(device)


def load_pixel_lpips(device):
    """Pixel-space LPIPS for --loss lpips (Table 1 baseline; CIFAR10 in Table A1): the
    official LPIPS (VGG16, ImageNet weights) from the optional `lpips` package."""
    try:
        import lpips
    except ImportError:
        fail("--loss lpips needs the optional `lpips` package and torchvision: install them with torch pinned to "
             f"this one (torch=={torch.__version__.split('+')[0]}; README, Install), as a plain `pip install lpips` "
             "replaces it; the VGG16 weights are fetched on first use")
    net = lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)
    return lambda a, b: net(a, b).flatten()


# ----------------------------------------------------------------------------
# 7. The toy world: 10 classes of anti-aliased shapes on 16x16 RGB. Within a
# class, the colour, background, position and size vary and are all set by the
# image's seed, so the noise-to-image map of a teacher has real structure.

def _toy_sdf(cls, px, py, r):
    """Signed distance (negative inside) of each class's shape, centred at 0."""
    ax, ay = px.abs(), py.abs()
    if cls == 0:
        return (px ** 2 + py ** 2).sqrt() - r
    if cls == 1:
        return torch.maximum(ax, ay) - 0.85 * r
    if cls == 2:  # triangle (apex down: image rows grow downward)
        return torch.maximum(0.866 * ax + 0.5 * py, -py) - 0.5 * r
    if cls == 3:
        w = 0.32 * r
        return torch.minimum(torch.maximum(ax - r, ay - w), torch.maximum(ax - w, ay - r))
    if cls == 4:
        return ((px ** 2 + py ** 2).sqrt() - 0.75 * r).abs() - 0.28 * r
    if cls == 5:
        return torch.maximum(ax - r, ay - 0.32 * r)
    if cls == 6:
        return torch.maximum(ax - 0.32 * r, ay - r)
    if cls == 7:
        return ax + ay - 1.1 * r
    if cls == 8:  # diagonal cross: the plus rotated by 45 degrees
        u, v = (px + py) * 0.7071, (px - py) * 0.7071
        return _toy_sdf(3, u, v, 1.05 * r)
    if cls == 9:  # hollow square
        return (torch.maximum(ax, ay) - 0.75 * r).abs() - 0.22 * r
    raise ValueError(cls)


def toy_images(seeds, labels=None, resolution=16, supersample=4):
    """Deterministic toy images in [-1, 1], one per seed: (B, 3, R, R) and labels.
    Everything about image i is drawn from torch.Generator().manual_seed(seeds[i])."""
    seeds = [int(s) for s in seeds]
    n, S = len(seeds), resolution * supersample
    params = torch.empty(n, 11)
    out_labels = torch.empty(n, dtype=torch.long)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        out_labels[i] = torch.randint(10, (1,), generator=g) if labels is None else int(labels[i])
        params[i] = torch.rand(11, generator=g)
    r = (0.22 + 0.16 * params[:, 0]) * S  # half-size: 3.5..6 px at 16x16
    cx = S / 2 + (params[:, 1] - 0.5) * (S - 2.2 * r)
    cy = S / 2 + (params[:, 2] - 0.5) * (S - 2.2 * r)
    hue = params[:, 3:4]
    fg = _hsv_to_rgb(hue, 0.6 + 0.4 * params[:, 4:5], 0.75 + 0.25 * params[:, 5:6])
    bg = _hsv_to_rgb(params[:, 6:7], 0.3 * params[:, 7:8], 0.1 + 0.25 * params[:, 8:9])
    return _render(out_labels, r, cx, cy, fg, bg, resolution, supersample), out_labels


def _render(labels, r, cx, cy, fg, bg, resolution, supersample):
    """Shape labels[i] of half-size r, centred at (cx, cy) (supersampled pixels), in
    colour fg on bg: (B, 3, R, R) in [-1, 1], anti-aliased by area coverage."""
    S = resolution * supersample
    coords = torch.arange(S, dtype=torch.float32) + 0.5
    imgs = torch.empty(len(labels), 3, resolution, resolution)
    for cls in labels.unique().tolist():  # all images of a class at once (elementwise: the same numbers)
        i = (labels == cls).nonzero()[:, 0]
        px = coords[None, None, :] - cx[i, None, None]
        py = coords[None, :, None] - cy[i, None, None]
        inside = (_toy_sdf(cls, px, py, r[i, None, None]) < 0).float()
        mask = F.avg_pool2d(inside[:, None], supersample)  # anti-aliased coverage
        imgs[i] = mask * fg[i][:, :, None, None] + (1 - mask) * bg[i][:, :, None, None]
    return imgs * 2 - 1


# toy_sd's captioned world: the same shapes at 32x32, every attribute discrete and named
TOY_SCENE = dict(shape=("circle", "square", "triangle", "plus", "ring", "horizontal bar", "vertical bar", "diamond", "cross",
                        "hollow square"),
                 colour=("red", "yellow", "green", "cyan", "blue", "magenta"), background=("black", "grey", "white"),
                 size=("small", "large"), place=("top left", "top right", "bottom left", "bottom right", "in the centre"))


def toy_scene(seeds, resolution=32, supersample=4):
    """The toy_sd world: image i, its caption and its attributes (B, 5: the index of
    each TOY_SCENE entry), all drawn from torch.Generator().manual_seed(seeds[i]),
    e.g. "a small red triangle on a grey background top left"."""
    n, S = len(seeds), resolution * supersample
    a, jit = torch.empty(n, 5, dtype=torch.long), torch.empty(n, 4)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        a[i] = torch.cat([torch.randint(len(v), (1,), generator=g) for v in TOY_SCENE.values()])
        jit[i] = torch.rand(4, generator=g) - 0.5
    r = (0.16 + 0.11 * a[:, 3] + 0.03 * jit[:, 0]) * S  # half-size: small 4.6-5.6 px, large 8.1-9.1 px at 32
    place = a[:, 4]
    cx = torch.where(place % 2 == 0, 1.15 * r, S - 1.15 * r) + jit[:, 1] * 0.04 * S
    cy = torch.where(place < 2, 1.15 * r, S - 1.15 * r) + jit[:, 2] * 0.04 * S
    cx, cy = (torch.where(place == 4, S / 2 + j * 0.06 * S, c) for c, j in ((cx, jit[:, 1]), (cy, jit[:, 2])))
    fg = _hsv_to_rgb((a[:, 1:2] + 0.25 * jit[:, 3:4]) / 6, 0.85, 0.95)
    bg = _hsv_to_rgb(torch.zeros(n, 1), 0.0, torch.tensor([0.08, 0.45, 0.88])[a[:, 2]][:, None])
    captions = [f"a {T['size'][sz]} {T['colour'][c]} {T['shape'][k]} on a {T['background'][b]} background {T['place'][p]}"
                for T in [TOY_SCENE] for k, c, b, sz, p in a.tolist()]
    return _render(a[:, 0], r, cx, cy, fg, bg, resolution, supersample), captions, a


def _hsv_to_rgb(h, s, v):
    k = torch.tensor([5.0, 3.0, 1.0])
    t = (k + h * 6) % 6
    return v - v * s * torch.clamp(torch.minimum(t, 4 - t), 0, 1)


# ============================================================================
# The machinery. Above: the method (models, losses, the worlds they are tested on).
# Below: what runs it (Table A1's presets and the flags, processes, files, pairs on
# disk, the training loop, timing).
# ============================================================================


# ----------------------------------------------------------------------------
# 8. Presets and configuration. Paper values come from Table A1; the toy preset is
# scaled down to what runs in minutes on 2 CPU cores. A script's flags override
# the preset keys it reads (parse_config); 03 and 04 add their stage's row.

PRESETS = {
    "toy": dict(
        family="edm", arch="toy", teacher=os.path.join(REPO, "assets", "toy_teacher.safetensors"),
        resolution=16, channels=3, num_classes=10,
        num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, guidance=1.0,
        num_pairs=2048, shard_size=512, batch_per_device=256, pair_dtype="float32", dtype="float32", teacher_dtype="float32",
        # toy LatentLPIPS: a quarter-width VGG16-bn; on a 16x16 space only 2 pools are
        # removed (taps at 16, 16, 8, 4, 2 px), as 3 would cost 2.4x for no gain here
        lpips_width=0.25, lpips_pools_removed=2, cls_steps=300, cls_batch=64, cls_lr=2e-3,
        loss="elatent", lpips_augment="bgc+cutout", data="toy", teacher_steps=4000, teacher_batch=128,
    ),
    # the latent-diffusion path on a laptop: a tiny SD1.5-layout text-to-image model of
    # the captioned toy world (toy_scene), trained by `01 --preset toy_sd --train_teacher`
    "toy_sd": dict(
        family="ldm", arch="sd15", data="toy", teacher=os.path.join(REPO, "assets", "toy_sd"),
        prompts=os.path.join(REPO, "assets", "toy_sd", "prompts.txt"),
        resolution=32, channels=4, num_classes=0, num_steps=50, guidance=3.0, protocol="toy",
        num_pairs=2048, shard_size=512, batch_per_device=256, pair_dtype="float32", dtype="float32", teacher_dtype="float32",
        # the paper's 3 pools removed: taps at 8, 8, 8, 4, 2; 600 steps, as the 5 attribute heads slow the shape's to 46% at 300
        lpips_width=0.25, lpips_pools_removed=3, cls_steps=600, cls_batch=64, cls_lr=2e-3,
        loss="elatent", lpips_augment="bgc+cutout", teacher_steps=6000, teacher_batch=128, vae_steps=2000,
        stage_row="toy_sd",  # 03/04's rows (also for a user's copy of this preset, whose arch is sd15's)
    ),
    "cifar10": dict(
        family="edm", arch="cifar10", teacher=None,  # the official NVlabs EDM pickle, e.g. edm-cifar10-32x32-cond-vp.pkl
        resolution=32, channels=3, num_classes=10,
        num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, guidance=1.0,
        num_pairs=1_000_000, shard_size=10_000, batch_per_device=512, pair_dtype="float32", dtype="bfloat16",
        teacher_dtype="float32",  # 01's pairs and 05's teacher row: EDM's generate.py runs its CIFAR10 networks in float32
        lpips_width=1.0, lpips_pools_removed=0, cls_steps=100_000, cls_batch=256, cls_lr=1e-3,
        loss="lpips", lpips_augment=None,  # Table A1: LPIPS in pixels, no augmentation
        lpips_resize=224,  # 32 px upsampled (bilinear) before LPIPS, as Consistency Models do: VGG's deepest taps are 2x2 at 32
    ),
    "sd15": dict(
        family="ldm", arch="sd15", teacher="stable-diffusion-v1-5/stable-diffusion-v1-5",
        resolution=512, channels=4, num_classes=0,
        num_steps=50, guidance=3.0, protocol="coco2014",  # SD-CFG-3 (SD-CFG-8 is its own preset below); Table 3
        num_pairs=3_000_000, shard_size=1000, batch_per_device=32, pair_dtype="float16", dtype="bfloat16",
        teacher_dtype="float16",  # 01's pairs and 05's teacher row: fp16 weights, SD's usual inference precision (docs/design.md)
        lpips_width=1.0, lpips_pools_removed=3, cls_steps=500_000, cls_batch=256, cls_lr=1e-3,
        loss="elatent+latent", lpips_augment="bg+cutout",  # Table A1, SD-CFG-3 (E-LatentLPIPS*)
    ),
    "sdxl": dict(
        family="ldm", arch="sdxl", teacher="stabilityai/stable-diffusion-xl-base-1.0",
        resolution=1024, channels=4, num_classes=0,
        num_steps=50, guidance=7.0, protocol="coco2017",  # SDXL-CFG-7; Table 5
        num_pairs=8_000_000, shard_size=1000, batch_per_device=8, pair_dtype="float16", dtype="bfloat16", teacher_dtype="float16",
        lpips_width=1.0, lpips_pools_removed=3, cls_steps=500_000, cls_batch=256, cls_lr=1e-3,
        loss="elatent", lpips_augment="bgc+cutout",  # Table A1, SDXL-CFG-7
    ),
}


# SD-CFG-8 (Table A1) differs from SD-CFG-3 in more than the guidance: plain
# E-LatentLPIPS with colour augmentation, 12M pairs (its stage tables: 03, 04).
PRESETS["sd15_cfg8"] = dict(PRESETS["sd15"], guidance=8.0, num_pairs=12_000_000, loss="elatent", lpips_augment="bgc+cutout")
# Code checks a preset's `family` (edm | ldm), `arch` (toy | cifar10 | sd15 | sdxl) and `data`
# (toy: a built-in world, no dataset), never its name, so a user's new preset (a copy with
# other values) works everywhere.


def get_preset(name):
    return dict(PRESETS[name])


def checked_type(kind, ok, what, bad):
    """An argparse type that also checks a preset's values: kind(v), then ok(x).
    `bad` is a value it refuses (the tests feed it to every flag of this type)."""
    def parse(v):
        try:
            x = kind(v)
            good = ok(x)
        except (TypeError, ValueError):
            good = False
        if not good:
            raise argparse.ArgumentTypeError(f"must be {what}, got {v!r}")
        return x
    parse.__name__, parse.bad = what, bad
    return parse


def two_floats(s):
    """'A,B' (or a preset's pair) -> (A, B)."""
    a, b = (float(v) for v in (s.split(",") if isinstance(s, str) else s))
    return a, b


INT_POS = checked_type(int, lambda x: x > 0, "positive (an integer > 0)", "0")
INT_NONNEG = checked_type(int, lambda x: x >= 0, "an integer >= 0", "-1")
NONNEG = checked_type(float, lambda x: x >= 0, "a number >= 0", "-1")
FRACTION = checked_type(float, lambda x: 0 <= x <= 1, "a number in [0, 1]", "1.5")
BETAS = checked_type(two_floats, lambda t: all(0 <= b < 1 for b in t), "'B1,B2' with 0 <= B < 1", "0.9")
DTYPES = ("float32", "bfloat16", "float16")


def lr_schedule(v):
    """A learning rate as Table A1 writes it: 'START,END' (cosine decay, e.g. 1e-4,1e-5) or one
    constant rate; a preset gives a number or a (start, end) pair. Returns (start, end)."""
    a = [float(x) for x in (v.split(",") if isinstance(v, str) else v if isinstance(v, (tuple, list)) else [v])]
    if len(a) not in (1, 2):
        raise ValueError(v)
    return a[0], a[-1]


LR = checked_type(lr_schedule, lambda x: x[0] > 0 and x[1] >= 0, "'START,END' or one rate, START > 0", "0")


RUN_FLAGS = [  # every script's first group
    ("preset", "toy", PRESETS, "the setting: Table A1's, or a toy world on 2 CPU cores (toy: pixels, toy_sd: latents)"),
    ("out_dir", None, None, "the run's folder (default runs/<preset>)"),
    ("seed", 0, INT_NONNEG, "seed of everything random in this script"),
    ("dist_timeout_min", 120, INT_POS, "torchrun: minutes a rank may wait at a collective before the job is declared hung"),
]


# the flags 03 and 04 share (each script adds its own around them)
TRAIN_RUN_FLAGS = [
    ("dtype", None, DTYPES, "autocast dtype (Table A1: bfloat16; the toy float32; float16 is refused: no loss scaling)"),
    ("resume", False, None, "continue from <run>/ckpt_latest.pt (refused if a setting outside RESUME_MAY_CHANGE changed)"),
    ("allow_config_change", False, None, "--resume even though such a setting changed (deliberately)"),
    ("max_steps_this_run", 0, INT_NONNEG, "stop after this many steps (0: run to --steps), for time-limited jobs"),
    ("fsdp", False, None, "torchrun: shard G, its EMA (and D) over the processes with FSDP2, for what DDP cannot hold"),
]
TRAIN_INPUT_FLAGS = [
    ("teacher", None, None, "the teacher the pairs came from (App. A); its steps, guidance and resolution come from the pairs"),
    ("pairs", None, None, "pairs folder from 01 (default <out_dir>/pairs)"),
    ("first_pairs", 0, INT_NONNEG, "train on the first N pairs of the folder only (0: all); Table 6 varies it"),
    ("lpips_ckpt", None, None, "LatentLPIPS (default <out_dir>/lpips/latent_lpips.pt, or an official tuned one); "
                               "with --loss lpips: a pixel-space one (02 --pixels) instead of the official LPIPS"),
]
TRAIN_BATCH_FLAGS = [
    ("steps", None, INT_POS, "training iterations"),
    ("batch", None, INT_POS, "global batch"),
    ("batch_per_device", None, INT_POS, "micro-batch per process; accumulation = batch / (this x processes)"),
]
TRAIN_REST_FLAGS = [
    ("weight_decay", None, NONNEG, "weight decay"),
    ("attn_weight_decay", None, NONNEG, "weight decay of attention parameters"),
    ("ema_start", None, INT_NONNEG, "the EMA equals G before this step"),
    ("ema_beta", None, FRACTION, "EMA decay"),
    ("grad_clip", 0.0, NONNEG, "gradient norm clip (0 = off)"),
]
TRAIN_LOG_FLAGS = [
    ("log_every", 10, INT_POS, "metrics.jsonl every this many steps"),
    ("log_to", "none", ("none", "tensorboard", "wandb"), "also send those scalars and the grids to TensorBoard (<run>/tensorboard) "
                                                       "or W&B offline (<run>/wandb); needs that pip package"),
    ("grid_every", None, INT_POS, "grid PNG every this many steps"),
    ("ckpt_every", None, INT_POS, "checkpoint every this many steps"),
    ("benchmark_steps", 0, INT_NONNEG, "sizing mode: N steps on random pairs (with --teacher random), report memory and img/s, exit"),
]
# what --resume may change without --allow_config_change: every other setting is the run's and is compared
RESUME_MAY_CHANGE = ("steps", "max_steps_this_run", "resume", "allow_config_change", "batch_per_device", "log_every", "log_to", "grid_every",
                     "ckpt_every", "dist_timeout_min", "fsdp", "grad_ckpt", "grad_clip", "out_dir", "pairs")  # pairs: identity in pairs_id


PATH_KINDS = dict(out_dir="folder", pairs="folder", export="folder", images="folder", bapps="folder", coco="folder",
                  lpips_ckpt="file", init="file", classifier="file")  # what each path flag names (--teacher: by family)


def parse_config(doc, flags, argv=None, table=None):
    """Every script's configuration, with one precedence: the preset, then the flags
    given. The preset is PRESETS[--preset] plus, in 03 and 04, that stage's own Table
    A1 row from `table` (by preset name, else its `stage_row` or arch for a user's own
    preset). `flags` is {group: [(name, default, type, help)]}; a default of None means
    "the preset's value". Types refuse bad values (argparse then stops with one line
    naming the flag), and the preset's values pass the same checks. Values that the
    teacher fixed come last, from the pairs' manifest (training_setup says so).
    Returns the config and the set of settings given on the command line."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: fail(f"{message} (see --help)")  # one 'error:' line, like every other stop
    types, preset_keys = {}, {k for d in [*PRESETS.values(), *(table or {}).values()] for k in d}
    for title, items in flags.items():
        g = p.add_argument_group(title)
        for name, default, kind, text in items:
            types[name] = kind
            text += " (default: the preset's)" if default is None and name in preset_keys else ""
            if isinstance(default, bool) or kind is bool:  # --x / --no-x (kind bool: the preset's by default)
                g.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=text)
            elif isinstance(kind, (tuple, dict)):  # dict: its keys, read when parsing (PRESETS: a preset a fork adds counts)
                g.add_argument(f"--{name}", choices=list(kind), default=default, help=text + ("" if default is None else " (default: %(default)s)"))
            else:
                g.add_argument(f"--{name}", type=kind or str, default=default,
                               help=text + ("" if default is None else " (default: %(default)s)"))
    args = vars(p.parse_args(argv))
    cfg = get_preset(args["preset"])
    if table is not None:
        row = table.get(args["preset"]) or table.get(cfg.get("stage_row") or cfg["arch"])
        if row is None:
            fail(f"the paper's {cfg['arch']} setting has no row for this stage (Table A1); use {' | '.join(table)}")
        cfg.update(row)
    from_preset = {k for k, v in args.items() if v is None}
    p.set_defaults(**dict.fromkeys(args))
    given = {k for k, v in vars(p.parse_args(argv)).items() if v is not None}  # on the command line, whatever the default
    cfg.update({k: v for k, v in args.items() if v is not None or k not in cfg})
    cfg["out_dir"] = cfg["out_dir"] or os.path.join("runs", args["preset"])
    kinds = dict(PATH_KINDS, teacher="file" if cfg.get("family") == "edm" and cfg.get("teacher") != "random" else None)
    for k, want in kinds.items():  # a path of the wrong kind, named by its flag before anything reads or writes it
        path = cfg.get(k) if k in types else None
        if want and isinstance(path, str) and os.path.exists(path) and os.path.isdir(path) != (want == "folder"):
            fail(f"--{k} '{path}' is a {'folder' if os.path.isdir(path) else 'file'}, not a {want}")
    for k, kind in types.items():  # a preset's (or a user preset's) values: the flags' checks, and their form
        if callable(kind) and cfg.get(k) is not None and k in from_preset:
            try:
                cfg[k] = kind(cfg[k])
            except argparse.ArgumentTypeError as e:
                fail(f"preset '{args['preset']}': {k}: {e}")
    return cfg, given


AUGMENT = checked_type(str, augment_letters, "the letters b, g, c, o (o = cutout), e.g. bgco, or bg+cutout / bgc+cutout", "bgx")
LOSS = checked_type(str, lambda s: s.removesuffix("+l1") in LOSSES, "a name in common.LOSSES, with an optional +l1", "l2")
# the regression term's flags, in 03 and in 04, whose G loss starts from the stage-1 student's values of
# these (and of --lpips_ckpt) unless given; a fork's flag for its own LOSSES row goes here (docs/forking.md)
LOSS_FLAGS = [
    ("loss", None, LOSS, "d in Eq. 1 (Table A1: elatent; SD-CFG-3 elatent+latent; CIFAR10 lpips); 04 takes the stage-1 student's unless given"),
    ("lpips_augment", None, AUGMENT, "E-LatentLPIPS augmentation T (Eq. 3): letters b, g, c, o (cutout), or bg+cutout; "
                                     "04 takes the stage-1 student's unless given"),
]


# ----------------------------------------------------------------------------
# 9. Distributed. The run is distributed only when torchrun set RANK, LOCAL_RANK
# and WORLD_SIZE; otherwise it is one process on the best device available.

def setup_distributed(timeout_min=120):
    """Returns (rank, local_rank, world_size, device). Works under plain python
    and torchrun, with gloo on CPU and nccl on CUDA. The collective timeout is long
    (--dist_timeout_min): real waits are long, e.g. 01's last barrier after hours of
    uneven shard work; torch's default (10 min on NCCL) would kill those jobs."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            import datetime
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
        print0(f"distributed: {world} process(es), backend {backend}, collective timeout {timeout_min} min")
        return rank, local_rank, world, device
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return 0, 0, 1, device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


PREEMPTED = 75  # exit status of a run stopped by SIGTERM/SIGUSR1 after its checkpoint (sysexits' EX_TEMPFAIL: try again)


class StopSignal:
    """SIGTERM and SIGUSR1, what a scheduler sends before it kills a job (SLURM: preemption,
    `--signal=USR1@900` before the time limit), ask a training loop to stop. Installed
    before the models load, so a signal during the set-up stops the run after its first
    step. The step in progress finishes (Python runs the handler between operations);
    every rank's `vote()` goes into one all-reduce after every step, so all ranks see the
    request at the same step, write the checkpoint together, and none is left waiting at
    a collective the others skipped. `exit()` then leaves
    <run>/preempted.json for a requeue script and exits with PREEMPTED. run_dir None
    (sizing mode): no handler, and nothing is touched."""

    def __init__(self, run_dir, stops="after this step with a checkpoint"):
        self.got, self.said, self.old, self.stops = None, False, {}, stops
        self.marker = run_dir and os.path.join(run_dir, "preempted.json")
        if run_dir and threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._catch) for s in (signal.SIGTERM, signal.SIGUSR1)}
        if run_dir and is_main() and os.path.isfile(self.marker):  # the marker describes the last stop only
            os.remove(self.marker)

    def _catch(self, signum, frame):  # no I/O here: a handler that writes while the loop writes can raise
        self.got = signal.Signals(signum).name

    def vote(self, device):
        """This rank's request (1.0 after a signal), to be averaged over the ranks with the
        step's statistics (03, 04: no collective of its own); any rank's makes the mean > 0."""
        if self.got and not self.said:
            print(f"{self.got}: stopping {self.stops}", file=sys.stderr, flush=True)
            self.said = True
        return torch.tensor(float(self.got is not None), device=device)

    def requested(self, device):
        """The vote alone, for a loop that reduces nothing else (02's phase 1)."""
        return all_reduce_mean(self.vote(device)).item() > 0

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        self.old = {}

    def exit(self, step, saved="checkpoint written", rerun="rerun the same command with --resume to continue"):
        """After the checkpoint of `step`, on every rank: the marker, then cleanup's barrier,
        so that no rank exits (and makes torchrun stop the others) before rank 0 has written."""
        if is_main():
            save_json(dict(step=step, signal=self.got or "on another rank", exit_status=PREEMPTED), self.marker)
        print0(f"stopped by a signal at step {step}, {saved}; exit status {PREEMPTED}: {rerun} ({self.marker})")
        cleanup()
        self.restore()
        sys.exit(PREEMPTED)


def autocast(device, dtype):
    """One --dtype flag for autocast: float32 means no autocast."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# ----------------------------------------------------------------------------
# 10. Files. Every write goes to a temporary name first and is renamed when
# complete, so a killed run never leaves a file that a resume would trust.

def fail(msg):
    """Stop with a one-line cause (no traceback): bad input, not a bug. Quoted
    exception text is folded onto that line and cut at 600 characters."""
    msg = " ".join(str(msg).split())
    raise SystemExit(f"error: {msg[:600]}" + ("..." if len(msg) > 600 else ""))


@contextmanager
def or_fail(what, remedy=None, errors=Exception):
    """Reading an input: an error inside the block (a missing, truncated or corrupt
    file, a folder where a file goes, or a file of another kind) stops the run with one
    line, `what: the cause; remedy`. A missing package or an exhausted device is not the
    input's fault: it passes."""
    try:
        yield
    except (ImportError, MemoryError, torch.OutOfMemoryError):
        raise
    except errors as e:  # what the reader raised: the block holds the read, not the computation
        cause = {FileNotFoundError: "not found", IsADirectoryError: "a folder, not a file",
                 NotADirectoryError: "a path through a file"}.get(type(e), f"{type(e).__name__}: {e}")
        fail(f"{what}: {cause}" + (f"; {remedy}" if remedy else ""))


def atomic(path, write):
    """write(tmp), then rename tmp to path: a file (or folder) appears whole or not at
    all, so a killed run never leaves a half-written one that a resume would trust."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)
    return path


def save_text(text, path):
    return atomic(path, lambda f: pathlib.Path(f).write_text(text))


def save_json(obj, path):
    return save_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def to_uint8(img):
    """[-1, 1] float images (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    img = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).numpy()


def save_image_grid(images, path, ncol=8, scale=None, pad=1):
    """Write a PNG grid of (B, 3, H, W) images in [-1, 1], row-major, atomically. `scale`
    enlarges small images with nearest-neighbour (default: to at least 64 px, so that
    toy grids are legible)."""
    from PIL import Image
    imgs = to_uint8(images)
    b, h, w, _ = imgs.shape
    scale = scale or max(1, 64 // w)
    nrow = math.ceil(b / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = imgs[i]
    im = Image.fromarray(grid)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return atomic(path, lambda f: im.save(f, format="PNG"))


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def folder_fingerprint(folder, parts, chunks=64, chunk=1 << 16):
    """sha256 of the files under `parts` (sub-folders or files) of a model folder that a
    plain from_pretrained reads: each one's relative name and size, the whole of each
    small file (configs, tokenizers), and 64 evenly spaced 64-KiB reads of each large one
    (weights). Weight variants (name.fp16.safetensors), other formats' weights and
    hidden files are left out. A retraining changes every tensor and so this; an edit
    of a few tensors of a multi-GB file can fall between the reads."""
    h = hashlib.sha256()
    paths = []
    for part in sorted(parts):
        top = os.path.join(folder, part)
        paths += [top] if os.path.isfile(top) else \
            sorted(os.path.join(r, n) for r, _, files in os.walk(top) for n in files)
    for path in paths:
        name = os.path.basename(path)
        if name.startswith(".") or (name.endswith((".safetensors", ".bin")) and name.count(".") > 1) or \
                (name.endswith(".bin") and any(f.endswith(".safetensors") for f in os.listdir(os.path.dirname(path)))):
            continue
        size = os.path.getsize(path)
        h.update(f"{os.path.relpath(path, folder).replace(os.sep, '/')}:{size}".encode())
        with open(path, "rb") as f:
            if size <= chunks * chunk:
                h.update(f.read())
                continue
            for i in range(chunks):
                f.seek((size - chunk) * i // (chunks - 1))
                h.update(f.read(chunk))
    return h.hexdigest()


def load_image(path, size):
    """RGB in [-1, 1], shorter side resized to `size` (bicubic, antialiased), centre crop."""
    from PIL import Image
    with or_fail(f"image '{path}' is unreadable", "replace or remove it"):  # not an image, truncated, or missing
        im = Image.open(path).convert("RGB")
    s = size / min(im.size)
    im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
    l, t = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((l, t, l + size, t + size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1


# ----------------------------------------------------------------------------
# 11. Pairs on disk. Shard k holds pairs [k*S, (k+1)*S) as a .safetensors file
# (x, seed, and label or prompts), written to a temporary name and renamed when
# complete. manifest.json records what made them; stages 03-05 refuse pairs
# whose manifest does not match the model they train.

MANIFEST_KEYS = ("preset", "family", "teacher", "solver", "nfe", "guidance", "z_shape", "x_shape",
                 "pair_dtype", "num_pairs", "shard_size", "seed", "prompts", "cfg_range")  # z_shape holds the resolution


def shard_path(pairs_dir, k):
    return os.path.join(pairs_dir, f"shard_{k:06d}.safetensors")


def check_manifest(found, expected, what):
    """Refuse a mismatch and name every field that differs."""
    as_json = lambda v: json.loads(json.dumps(v))  # a tuple of the config is a list in the manifest
    diff = [f"{k}: found {found.get(k)!r}, expected {expected.get(k)!r}"
            for k in MANIFEST_KEYS if k in expected and found.get(k) != as_json(expected.get(k))]
    if diff:
        fail(f"{what} was made by a different setup; " + "; ".join(diff))


def read_manifest(pairs_dir):
    path = os.path.join(pairs_dir, "manifest.json")
    if not os.path.isfile(path):
        fail(f"no pairs at '{pairs_dir}' (manifest.json missing); run 01_make_pairs.py first")
    with or_fail(f"'{path}' is corrupt", "delete the pairs folder and rerun 01_make_pairs.py"):
        m = json.load(open(path))
        m["num_pairs"], m["shard_size"], m["guidance"], m["num_steps"]  # the fields every reader needs
    return m


def open_shard(path, expected_count=None, what="pair shard", remedy="rerun 01_make_pairs.py to regenerate it"):
    """Open a shard memory-mapped; a corrupt or truncated shard stops the run."""
    from safetensors import safe_open
    with or_fail(f"corrupt {what} '{path}'", f"delete it and {remedy}"):
        f = safe_open(path, framework="pt")
        n = f.get_slice("x").get_shape()[0]
    if expected_count is not None and n != expected_count:
        fail(f"{what} '{path}' holds {n} items, expected {expected_count}; delete it and {remedy}")
    return f


def load_shard(path, expected_count=None, **kw):
    f = open_shard(path, expected_count, **kw)
    out = {k: f.get_tensor(k) for k in f.keys()}
    meta = f.metadata() or {}
    if "prompts" in meta:
        out["prompts"] = json.loads(meta["prompts"])
    return out


# ----------------------------------------------------------------------------
# 12. Training helpers shared by 03 (stage 1) and 04 (stage 2).

class PairDataset:
    """The (z, c, x) pairs of 01, checked against the teacher that will be
    distilled. x is read from the memory-mapped shards; z is regenerated from
    each pair's seed."""

    def __init__(self, pairs_dir, teacher, cfg, manifest=None):
        m = manifest or read_manifest(pairs_dir)
        if not m.get("complete"):
            fail(f"pairs in '{pairs_dir}' are incomplete; rerun 01_make_pairs.py to finish them")
        expected = dict(preset=cfg["preset"], family=teacher.family, teacher=teacher.teacher_id,
                        z_shape=list(teacher.z_shape), solver=teacher.solver_name())  # the solver fixes the student's T
        check_manifest(m, expected, f"the pairs in '{pairs_dir}'")
        # --first_pairs N (checked against the folder in training_setup): pair i has seed `seed + i`,
        # so the first N are the pairs of a --num_pairs N run
        self.teacher, self.N, self.S, self.dir = teacher, cfg.get("first_pairs") or m["num_pairs"], m["shard_size"], pairs_dir
        self.shards = [open_shard(shard_path(pairs_dir, k), min(self.S, self.N - k * self.S))
                       for k in range((self.N + self.S - 1) // self.S)]
        self.keys = set(self.shards[0].keys())
        self.prompts = functools.lru_cache(maxsize=None)(lambda k: json.loads(self.shards[k].metadata()["prompts"]))

    def __len__(self):
        return self.N

    def get(self, idx):
        """Batch of pairs by global index: dict(z, x, seed, cond, [w])."""
        rows = [divmod(int(i), self.S) for i in idx]  # (shard, row)
        col = lambda key: torch.cat([self.shards[k].get_slice(key)[j:j + 1] for k, j in rows])
        out = dict(x=col("x").float(), seed=col("seed"))
        bad = (~torch.isfinite(out["x"]).flatten(1).all(1)).nonzero().flatten().tolist()
        if bad:  # checked where read: a whole-set scan up front would read every shard (98 GB for SD-CFG-3)
            k, j = rows[bad[0]]
            fail(f"pair shard '{shard_path(self.dir, k)}' row {j} holds a non-finite x (NaN or inf); delete the shard "
                 f"and rerun 01_make_pairs.py to remake it")
        out["z"] = seed_noise(out["seed"].tolist(), self.teacher.z_shape)
        out["cond"] = col("label") if "label" in self.keys else [self.prompts(k)[j] for k, j in rows]
        return out | (dict(w=col("w")) if "w" in self.keys else {})


def step_indices(seed, step, batch, n):
    """The global batch of a step: a function of (seed, step) only, so a resumed
    run replays exactly. Epoch e is a seeded permutation of the n pairs."""
    start = step * batch
    out = []
    while len(out) < batch:
        e, off = divmod(start + len(out), n)
        out.extend(_epoch_perm(seed, e, n)[off: off + batch - len(out)].tolist())
    return out


@functools.lru_cache(maxsize=2)
def _epoch_perm(seed, epoch, n):
    """One permutation per epoch, computed once (not at every training step)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def micro_batches(idx, world, rank, accum):
    """Split a global batch into world x accum micro-batches; rank r takes chunks
    m*world + r. 1 process with accum 2 and 2 processes with accum 1 therefore
    see the same chunks, and each chunk's RNG is seeded by its chunk id."""
    n = len(idx) // (world * accum)
    return [((m * world + rank), idx[(m * world + rank) * n:(m * world + rank + 1) * n]) for m in range(accum)]


def training_setup(cfg, world, device, m=None):
    """The shared start of 03 and 04: the derived accumulation, the run folder and its
    checkpoint path, the teacher, and its pairs. The pairs' manifest `m` (read by the
    script's validate) has the last word on what the teacher fixed (its steps, guidance,
    guidance range and resolution), and says so."""
    if cfg["dtype"] == "float16":  # fp16 autocast needs loss scaling, which these loops do not have
        fail("--dtype float16 trains without a GradScaler, so small gradients underflow to zero; "
             "use --dtype bfloat16 (the paper's precision, Table A1) or float32")
    accum = check_batch(cfg["batch"], cfg["batch_per_device"], world)
    torch.manual_seed(cfg["seed"])  # randomly initialised parts (D's readout heads) follow --seed, not torch's random default
    print0(f"global batch {cfg['batch']} = {cfg['batch_per_device']} per device x {world} device(s) x {accum} accumulation step(s)")
    run_dir = os.path.join(cfg["out_dir"], cfg["run_name"])
    if cfg["benchmark_steps"]:  # sizing mode: random pairs in memory, nothing read or written
        cfg["cfg_range"] = None
        teacher = load_teacher(cfg, device)
        return accum, run_dir, None, teacher, RandomPairs(teacher, cfg)
    pairs = cfg["pairs"] or os.path.join(cfg["out_dir"], "pairs")
    m = m or read_manifest(pairs)
    if cfg["first_pairs"] > m["num_pairs"]:
        fail(f"--first_pairs {cfg['first_pairs']}, but '{pairs}' holds {m['num_pairs']} pairs")
    cfg.update(num_steps=m["num_steps"], guidance=m["guidance"], cfg_range=m.get("cfg_range"),
               resolution=m.get("resolution", cfg["resolution"]))  # the student learns the teacher that made the pairs
    print0(f"from the pairs' manifest: num_steps {cfg['num_steps']}, guidance {cfg['guidance']}, cfg_range {cfg['cfg_range']}, "
           f"resolution {cfg['resolution']}")
    teacher = load_teacher(cfg, device)
    data = PairDataset(pairs, teacher, cfg, m)
    cfg["pairs_id"] = {k: m.get(k) for k in ("teacher", "solver", "guidance", "cfg_range", "num_pairs", "seed", "prompts")}
    return accum, run_dir, os.path.join(run_dir, "ckpt_latest.pt"), teacher, data


def check_resume(saved, cfg, remedy="start a new --run_name, or pass --allow_config_change if the change is deliberate"):
    """--resume continues the same run: any setting outside RESUME_MAY_CHANGE that differs
    (batch, loss, learning rates, pairs, seed, a fork's new flag, ...) is refused, naming
    each, unless --allow_config_change (03, 04) says the change is deliberate."""
    keys = [k for k in {**saved, **cfg} if k not in RESUME_MAY_CHANGE]
    changed = [f"{k}: checkpoint {saved.get(k)!r}, now {cfg.get(k)!r}" for k in keys if saved.get(k) != cfg.get(k)]
    if changed and not cfg.get("allow_config_change"):
        fail("--resume would continue with changed settings (" + "; ".join(changed) + f"); {remedy}")
    if changed:
        print0("warning: resuming with changed settings: " + "; ".join(changed))


class RandomPairs:
    """Sizing mode (--benchmark_steps): pairs of the right shapes with random
    content, so the real training step runs at real size with no pairs on disk."""

    def __init__(self, teacher, cfg):
        self.teacher, self.N, self.num_classes = teacher, 1_000_000, cfg["num_classes"]

    def __len__(self):
        return self.N

    def get(self, idx):
        z, x = seed_noise(idx, self.teacher.z_shape), seed_noise([self.N + i for i in idx], self.teacher.z_shape)
        cond = torch.as_tensor(idx) % self.num_classes if self.teacher.family == "edm" else ["a photo of a cat"] * len(idx)
        return dict(z=z, x=x, seed=torch.as_tensor(idx), cond=cond)


# dense bf16 tensor-core peaks in TFLOP/s (NVIDIA's data sheets: the sparse figures halved), by device name
BF16_PEAK_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H200 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312))


class StepFlops:
    """Sizing mode's FLOP count, by torch's FlopCounterMode (matmuls, convolutions and
    attention, forward and backward). The first step of each kind is counted (04's kinds:
    with R1 and without); steps are timed from `first_timed` on, after the warm-up steps
    that hold those counts, and `per_step` is the timed steps' mean, each step at its
    kind's count. Call begin(step, kind) at the top of a step, end() after it."""

    def __init__(self, steps):
        self.first_timed, self.counts, self.timed, self.mode, self.kind = min(2, steps - 1), {}, [], None, ""

    def begin(self, step, kind=""):
        self.kind = kind
        if step >= self.first_timed:
            self.timed.append(kind)
        if kind not in self.counts and step < self.first_timed:  # the counter slows the step: never on a timed one
            from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
            aten = torch.ops.aten  # torch's counter has formulas for the CUDA attention kernels, not for the CPU one
            cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
                             aten._scaled_dot_product_flash_attention_for_cpu_backward:
                                 lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v)}
            self.mode = FlopCounterMode(display=False, custom_mapping=cpu_attention)
            # only the total is needed: its per-module breakdown (a private attribute, torch 2.13) hooks
            # autograd and breaks R1's autograd.grad; tests/test_cluster.py fails if a torch release changes it
            self.mode.mod_tracker = types.SimpleNamespace(parents={"Global"}, __enter__=lambda: None, __exit__=lambda *a: None)
            self.mode.__enter__()

    def end(self):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.counts[self.kind], self.mode = self.mode.get_total_flops(), None

    @property
    def per_step(self):
        if self.timed and all(k in self.counts for k in self.timed):  # else a kind first came in a timed step
            return sum(self.counts[k] for k in self.timed) / len(self.timed)


def sizing_report(cfg, world, device, step_s, steps_timed, models, keys, flops=None):
    """Sizing mode's one JSON line (rank 0): peak memory (GPU: allocated; CPU: the process's
    peak resident set), what stays allocated between steps (GPU), the time of a step after
    the warm-up, img/s, parameter counts and the settings `keys`. With `flops` (one step's
    counts on this process, StepFlops): the FLOPs per training image of the timed steps
    (and of each kind of step), the TFLOP/s achieved per device, and on a known GPU that
    as a fraction of its dense bf16 peak."""
    if device.type == "cuda":
        peak, held = torch.cuda.max_memory_allocated(device) / 2 ** 30, round(torch.cuda.memory_allocated(device) / 2 ** 30, 2)
    else:
        import resource
        peak, held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    img_s = cfg["batch"] / world / step_s
    out = dict(peak_gb=round(peak, 2), held_gb=held, step_s=round(step_s, 4), img_s_per_device=round(img_s, 2),
               img_s_total=round(cfg["batch"] / step_s, 2), steps_timed=steps_timed, world=world, device=str(device), gpu=gpu,
               params_m={k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for k, m in models.items()},
               **{k: cfg[k] for k in keys})
    if flops and flops.per_step:
        per_img = flops.per_step / (cfg["batch"] / world)  # this process's step covers batch / world images
        if len(flops.counts) > 1:
            out["gflop_per_img_each"] = {k: float(f"{v / (cfg['batch'] / world) / 1e9:.6g}") for k, v in flops.counts.items()}
        peak_tf = next((p for name, p in BF16_PEAK_TFLOPS if gpu and re.search(rf"\b{name}\b", gpu)), None)  # not "RTX A1000"
        out.update(gflop_per_img=float(f"{per_img / 1e9:.6g}"), tflop_s_per_device=float(f"{per_img * img_s / 1e12:.4g}"),
                   bf16_peak_tflop_s=peak_tf, frac_of_peak=round(per_img * img_s / 1e12 / peak_tf, 4) if peak_tf else None)
    print0("benchmark: " + json.dumps(out))


def enable_grad_ckpt(net):
    """--grad_ckpt: diffusers' gradient checkpointing of the U-Net's resnets and
    attention blocks (recomputed in backward; block-level hooks are unaffected)."""
    unet = getattr(net, "unet", net)
    if not hasattr(unet, "enable_gradient_checkpointing"):
        fail("--grad_ckpt needs a diffusers U-Net (toy, sd15, sdxl)")
    unet.enable_gradient_checkpointing()


def fsdp_shard(model, device):
    """--fsdp: PyTorch's FSDP2 (fully_shard) over the torchrun processes. Each resnet
    and transformer of a U-Net block is one unit (SDXL's largest: 351M parameters),
    all-gathered for its forward and backward and sharded again after; each block's
    unit holds its up/down-samplers, the root unit the rest. Backward reduce-scatters
    the gradients, so no DDP or hand all-reduce runs on a sharded model. Parameters
    stay fp32 (autocast computes in bf16); state dicts go through full_state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if not dist.is_initialized():
        fail("--fsdp shards over the processes of torchrun: launch with torchrun (--nproc_per_node=1 also works)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    unet = next((m for m in model.modules() if hasattr(m, "down_blocks")), None)  # a diffusers U-Net
    blocks = [b for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks] if b is not None] if unet is not None else []
    units = [m for b in blocks for part in ("resnets", "attentions") for m in (getattr(b, part, None) or [])] + blocks
    for m in units:  # inner units first: a unit holds what its inner units do not
        fully_shard(m, mesh=mesh)
    print0(f"FSDP2: {type(model).__name__} in {len(units) + 1} units, sharded over {dist.get_world_size()} processes")
    return fully_shard(model, mesh=mesh)


def resharded(model):
    """Under --fsdp a forward without backward (grids, the held-out batch) leaves the
    root unit's parameters gathered, as plain tensors among the sharded ones; the EMA
    update and the state-dict calls need them sharded again. No-op otherwise."""
    if hasattr(model, "reshard"):
        model.reshard()
    return model


def full_state(model, opt=None):
    """The model's (and its optimiser's) full state dicts on CPU, the same for a
    plain, DDP or FSDP model, so a checkpoint resumes under any of them. Collective
    under FSDP: every rank calls it; rank 0 gets the state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(resharded(model), options=o)
    return sd if opt is None else (sd, get_optimizer_state_dict(model, opt, options=o))


def load_full_state(model, sd, opt=None, opt_sd=None, what="checkpoint"):
    """full_state's inverse: every rank loads the full dicts and keeps its shard. A
    dict of another model (or an optimiser state keyed by parameter index) stops the run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    with or_fail(f"{what} does not fit this run's {type(model).__name__} or its optimiser", "start a new --run_name",
                 errors=(RuntimeError, KeyError, ValueError)):
        set_model_state_dict(resharded(model), sd, options=StateDictOptions(full_state_dict=True))
        if opt is not None:  # not strict: parameters that never had a gradient (D's unused output layers) have no state
            set_optimizer_state_dict(model, opt, opt_sd, options=StateDictOptions(full_state_dict=True, strict=False))


def check_state_fits(device, G=None, D=None, total_bytes=None, shards=1):
    """On a GPU, before the first step: the training state that does not shrink with
    the batch, fp32 weights + gradients + Adam (16 B per trainable parameter; G also
    keeps an fp32 EMA, 4 B), divided over `shards` processes under --fsdp. More than
    the GPU holds stops the run with the numbers, instead of an out-of-memory error at
    the first optimiser step (SDXL stage 2 under DDP: 92.5 GB)."""
    if total_bytes is None:
        if device.type != "cuda":
            return
        total_bytes = torch.cuda.get_device_properties(device).total_memory
    n = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad) if m is not None else 0
    g, d = 20 * n(G) / 2 ** 30 / shards, 16 * n(D) / 2 ** 30 / shards
    if g + d > total_bytes / 2 ** 30:
        fail(f"the training state needs {g + d:.1f} GB per process (G with its EMA {g:.1f} GB, D {d:.1f} GB: fp32 "
             f"weights, gradients and Adam{f', over {shards} shards' if shards > 1 else ''}) but {device} holds "
             f"{total_bytes / 2 ** 30:.1f} GB: shard it over more GPUs with --fsdp under torchrun "
             f"(docs/scaling.md)")


def check_batch(batch, per_device, world):
    if batch % (per_device * world):
        fail(f"--batch {batch} is not divisible by --batch_per_device {per_device} x world size {world}")
    return batch // (per_device * world)


def param_groups(model, weight_decay, attn_weight_decay):
    """Table A1: weight decay, with a separate strength on attention parameters."""
    attn, rest = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (attn if ("attn" in n or "attention" in n or "transformer_blocks" in n) else rest).append(p)
    return [dict(params=rest, weight_decay=weight_decay), dict(params=attn, weight_decay=attn_weight_decay)]


def make_optimizer(name, groups, lr, betas):
    """Adam(W) or RAdam (Table A1), with decoupled weight decay. Fused on CUDA: one
    kernel, and no foreach temporaries the size of the weights."""
    if name == "radam":
        return torch.optim.RAdam(groups, lr=lr, betas=betas, decoupled_weight_decay=True)
    cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if cuda else None)


def lr_at(step, steps, lr):
    """Cosine decay over the run from lr = (start, end), --lr's schedule (Table A1: 1e-4 -> 1e-5)."""
    start, end = lr_schedule(lr)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(1, steps)))


@torch.no_grad()
def update_ema(ema, model, beta):
    """EMA of the weights; buffers are copied. (Under --fsdp only the EMA can be left
    gathered here, by a grid's forward; the trained model was resharded by its backward.)"""
    for pe, p in zip(resharded(ema).parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1 - beta)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def check_tracker(name):
    """--log_to's package (tensorboard or wandb, named as on pip), checked by 03's and 04's
    validate before any work: one line naming what to install."""
    import importlib.util
    if name != "none" and importlib.util.find_spec(name) is None:
        fail(f"--log_to {name} needs the '{name}' package, which is not installed: pip install {name}")


class MetricsLog:
    """JSONL metrics on rank 0. On resume from checkpoint N (N steps done), the lines of
    step N and later are dropped: the resumed run writes them again.
    path None: nothing is written (sizing mode). --log_to sends the same scalars and
    the grids to TensorBoard (<run>/tensorboard) or to W&B in offline mode (<run>/wandb,
    `wandb sync` uploads it later), imported only then."""

    def __init__(self, path, resume_step=0, log_to="none", config=None):
        self.path, self.tb, self.wandb = path, None, None
        if is_main() and path:
            lines = []
            if resume_step and os.path.isfile(path):
                lines = [l.rstrip("\n") + "\n" for l in open(path) if self._step(l) < resume_step]  # steps 0..N-1 made it
            save_text("".join(lines), path)
            run_dir = os.path.dirname(path)
            if log_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step or None)
            elif log_to == "wandb":
                import wandb
                self.wandb = wandb.init(dir=run_dir, mode="offline", project="diffusion2gan", name=os.path.basename(run_dir),
                                        config=json.loads(json.dumps(config or {}, default=str)))

    @staticmethod
    def _step(line):
        """A line's step; a line that a kill cut short (appends are not atomic) counts as past the resume."""
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return math.inf

    def write(self, **kw):
        if is_main() and self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in kw.items()}) + "\n")  # 6 digits
            flat = {f"{k}/{j}" if isinstance(v, dict) else k: u for k, v in kw.items() if k != "step"
                    for j, u in (v.items() if isinstance(v, dict) else [(k, v)]) if isinstance(u, (int, float))}
            if self.tb:
                for k, v in flat.items():
                    self.tb.add_scalar(k, v, kw["step"])
            if self.wandb:
                self.wandb.log(flat, step=kw["step"])

    def image(self, path, step):
        """A grid PNG that was just written, to the tracker."""
        if self.tb:
            from PIL import Image
            self.tb.add_image("grid", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self.wandb:
            import wandb
            self.wandb.log({"grid": wandb.Image(path)}, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def grad_norm(model, clip=0.0):
    """The global norm of a (plain, DDP or FSDP) model's gradients, for the log; with
    clip > 0 (--grad_clip) the gradients are first scaled down to that norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def all_reduce_mean(t):
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def finite_or_stop(value, step, ckpt_path, what="loss"):
    """NaN/Inf guard: stop with the step named; the last good checkpoint stays."""
    if not math.isfinite(value):
        kept = f"the last good checkpoint '{ckpt_path}' is kept" if ckpt_path and os.path.isfile(ckpt_path) else "no checkpoint was written yet"
        fail(f"{what} became {value} at step {step}; stopping ({kept}). Try a lower --lr or --grad_clip")


STUDENT_KEYS = ("ema", "config", "teacher", "stage", "step")  # what a student_ema.pt holds (03 and 04 write it; 04 and 05 read it)


def student_of(ck):
    """The student_ema.pt that a training checkpoint implies (its EMA, config, teacher, stage and step)."""
    return {k: ck[k] for k in STUDENT_KEYS}


def save_training_state(ck, run_dir):
    """student_ema.pt, then ckpt_latest.pt. A kill between the two writes leaves a student one
    checkpoint newer than ckpt_latest.pt: still a student of this run (a resume replays the same
    steps exactly and rewrites both), so readers of the student need no check of the pair."""
    atomic(os.path.join(run_dir, "student_ema.pt"), lambda f: torch.save(student_of(ck), f))
    atomic(os.path.join(run_dir, "ckpt_latest.pt"), lambda f: torch.save(ck, f))


def load_student_file(path, what, remedy=None):
    """A student_ema.pt (refused if it is a training checkpoint or another kind of file)."""
    ck = load_checkpoint(path, what, mmap=True, keys=STUDENT_KEYS, remedy=remedy)
    if "opt" in ck:
        fail(f"'{path}' is a training checkpoint, not a {what}: pass the student_ema.pt beside it")
    check_finite(ck["ema"], f"{what} '{path}'", "its run diverged: take an earlier student or rerun that stage")
    return ck


def load_student(ck, teacher, cfg, path, device):
    """G(z, c) from a student_ema.pt `ck` (read from `path`), checked against the teacher it runs
    beside: the one teacher check and build of 04 (--init, --export) and 05 (--students)."""
    if ck.get("teacher") != teacher.teacher_id:
        fail(f"student '{path}' was distilled from '{ck.get('teacher')}', not from this teacher '{teacher.teacher_id}'")
    G = Student(teacher, dict(cfg, cfg_range=ck["config"].get("cfg_range"))).to(device)
    G.load_state_dict(ck["ema"])
    G.cfg = ck["config"]
    return G


def check_finite(state, what, remedy):
    """Stop with one line naming the file and the first tensor of `state` (a state dict, or
    a dict of them) that holds a NaN or an infinity: read before any work, not at step k."""
    for k, v in state.items():
        if isinstance(v, dict):
            check_finite(v, f"{what} [{k}]", remedy)
        elif torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            fail(f"{what}: '{k}' holds non-finite values (NaN or inf); {remedy}")


def load_checkpoint(path, what, mmap=False, keys=(), remedy=None):
    """A torch checkpoint, or a one-line error naming it: missing, unreadable, or (with
    `keys`) a dict without the entries this kind of checkpoint has, i.e. another file.
    mmap=True only maps the file (cheap at any size): what the up-front checks use."""
    with or_fail(f"{what} '{path}' is unreadable", remedy):
        ck = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        fail(f"'{path}' is not a {what}: it lacks {', '.join(map(repr, missing))} (another kind of file?)")
    return ck


@torch.no_grad()
def held_out_batch(teacher, cfg, device, seed0=1_000_000_000, w=None):
    """Fixed held-out seeds (never in the pairs): z, c and the teacher's x (at
    guidance w when given); 10 of them on the toys and CIFAR10, 4 at SD's size."""
    n = 10 if cfg.get("data") or teacher.family == "edm" else 4
    seeds = list(range(seed0, seed0 + n))
    if teacher.family == "edm":
        z, cond = teacher.noise_and_condition(seeds)
        if cfg["num_classes"]:
            cond = torch.arange(n) % cfg["num_classes"]  # one of each class, in order
    else:
        z = seed_noise(seeds, teacher.z_shape)
        prompts = toy_scene(seeds)[1] if cfg.get("data") == "toy" else \
            ["a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake"]
        cond = [prompts[i % len(prompts)] for i in range(n)]
    x = teacher.solve(z, cond, guidance=w).float().cpu()
    return z, cond, x


def held_out_fidelity(x, x_teacher):
    """The held-out batch's MSE to the teacher (same z): the mean over its samples,
    ± the standard error of that mean, so that two students a few samples apart
    are not read as different."""
    per = (x.float().cpu() - x_teacher.float().cpu()).pow(2).flatten(1).mean(1)
    return f"{per.mean():.5f} ± {per.std() / len(per) ** 0.5:.5f}"


def mid_guidance(cfg):
    """The guidance scale shown in grids of a guidance-conditioned run."""
    if not cfg.get("cfg_range"):
        return None
    lo, hi = cfg["cfg_range"]
    return (lo + hi) / 2


# ----------------------------------------------------------------------------
# 13. The training loop of 03 and 04: Trainer runs a stage's step function (its
# equations) and owns everything around it.

def sync_grads(model, bucket_mb=256):
    """All-reduce gradients by hand (as StyleGAN2-ADA does), for 04, whose R1 double
    backward does not work under DDP's autograd hooks. Buckets of ~bucket_mb keep the
    extra memory small (one flat copy of all gradients: 3.4 GB for SD1.5, 10 GB for SDXL)."""
    if not dist.is_initialized():
        return
    params = [p for p in model.parameters() if p.grad is not None]
    while params:
        bucket, size = [], 0
        while params and (not bucket or size + params[0].grad.nbytes <= bucket_mb << 20):
            bucket.append(params.pop(0))
            size += bucket[-1].grad.nbytes
        flat = torch.cat([p.grad.flatten() for p in bucket])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(g.view_as(p))


class Trainer:
    """The machinery of a training stage, once for 03 and 04, so that each stage's step
    function holds only its equations. Built, it has set up the processes and devices,
    the stop signals (before the models load), the teacher and its pairs (training_setup).
    `loop(step_fn, ...)` then runs step_fn(step, micro_batches) for every step and does the
    rest: learning-rate schedules, the EMA, metrics, grids, checkpoints, the stop, and in
    sizing mode the timing and FLOPs. A step function reads its micro-batches, seeds each
    with `seed`, backpropagates inside `accumulating`, steps each optimiser with `update`,
    and returns `reduce(...)`: its statistics averaged over the processes (with the stop
    vote, in one collective), which the loop logs."""

    def __init__(self, cfg, stage, manifest=None):
        self.cfg, self.stage, self.bench = cfg, stage, cfg["benchmark_steps"] > 0
        self.rank, _, self.world, self.device = setup_distributed(cfg["dist_timeout_min"])
        self.stop = StopSignal(None if self.bench else os.path.join(cfg["out_dir"], cfg["run_name"]))  # SIGTERM/SIGUSR1
        self.accum, self.run_dir, self.ckpt_path, self.teacher, self.data = training_setup(cfg, self.world, self.device, manifest)
        self.viewer = self.rank == 0 or cfg["fsdp"]  # the ranks that run the EMA for grids (under FSDP: all)
        self.parts, self.step, self.now, self.log_now, self.votes, self.ho = (), 0, 0, True, 0.0, None

    def models(self, G, D=None):
        """G's EMA, the check that the training state fits the device, and (--fsdp) the shards.
        Returns [G, ema] or [G, ema, D]."""
        ema = copy.deepcopy(G).eval().requires_grad_(False)
        check_state_fits(self.device, G, D, shards=self.world if self.cfg["fsdp"] else 1)
        out = [G, ema] + ([D] if D is not None else [])
        return [fsdp_shard(m, self.device) for m in out] if self.cfg["fsdp"] else out

    def held_out(self):
        """The grids' fixed held-out seeds (z, c, the teacher's x, w) on the ranks that draw them
        (solved once, while the teacher is on the device)."""
        if self.ho is None and self.viewer and not self.bench:
            w = mid_guidance(self.cfg)
            self.ho = (*held_out_batch(self.teacher, self.cfg, self.device, w=w), w)
        return self.ho

    def sample(self, G):
        z, c, _, w = self.ho
        with torch.no_grad():
            return G(z.to(self.device), student_cond(self.teacher, c, self.device), w).float()

    def resume(self, ck, *parts):
        """parts: (key, model, optimiser key, optimiser) of what ckpt_latest.pt holds; from `ck`
        (the --resume checkpoint validate read, or None) each is loaded and the step taken."""
        self.parts = parts
        if ck:
            check_resume(ck["config"], self.cfg)
            for key, model, opt_key, opt in parts:
                check_finite({key: ck[key], **({opt_key: ck[opt_key]} if opt else {})}, f"checkpoint '{self.ckpt_path}'",
                             "delete it to start again, or restore an earlier one")
                load_full_state(model, ck[key], opt, ck[opt_key] if opt else None, what=f"checkpoint '{self.ckpt_path}'")
            self.step = ck["step"]
            print0(f"resumed from '{self.ckpt_path}' at step {self.step}")

    def seed(self, step, chunk, phase=0):
        """The RNG of micro-batch `chunk` (augmentation, dropout, D's noise): a function of
        (seed, step, chunk, phase) only, so that any split over processes and a resume replay it."""
        torch.manual_seed(self.cfg["seed"] * 1_000_003 + step * 4099 + chunk + phase * (1 << 40))

    def batches(self, step):
        """This process's micro-batches of the step, on the device: chunk, idx, z, x, w, cond."""
        dev, idx = self.device, step_indices(self.cfg["seed"], step, self.cfg["batch"], len(self.data))
        out = []
        for chunk, part in micro_batches(idx, self.world, self.rank, self.accum):
            b = self.data.get(part)
            out.append(dict(chunk=chunk, idx=part, z=b["z"].to(dev), x=b["x"].to(dev), w=b.get("w"),
                            cond=student_cond(self.teacher, b["cond"], dev)))
        return out

    @contextmanager
    def accumulating(self, model, m):
        """Micro-batch m's backward: gradients reduced over the processes on the step's last one
        only (DDP's no_sync before it; FSDP2's set_requires_gradient_sync)."""
        last = m == self.accum - 1
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(last)
        with model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last else nullcontext():
            yield

    def ddp(self, model):
        """DDP over the processes unless --fsdp (which reduces gradients itself) or one process."""
        if self.world > 1 and not self.cfg["fsdp"]:
            return nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)  # no 2nd copy of the grads
        return model

    def update(self, opt, model, sync=False):
        """One optimiser step: (sync: the hand all-reduce of the gradients, not under FSDP), the
        gradient norm when logged or clipped (--grad_clip), the step, the gradients freed.
        Returns the norm, or None."""
        if sync and not self.cfg["fsdp"]:
            sync_grads(model)
        clip = self.cfg["grad_clip"]
        norm = grad_norm(model, clip) if self.log_now or clip > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def reduce(self, **stats):
        """The step's statistics (this process's tensors; other values pass) averaged over the
        processes, in the one all-reduce that also carries every rank's stop vote. A non-finite
        one stops the run here, named, before anything of this step is saved."""
        keys = [k for k, v in stats.items() if torch.is_tensor(v)]
        *values, self.votes = all_reduce_mean(torch.stack([*(stats[k].float() for k in keys), self.stop.vote(self.device)])).tolist()
        stats.update(zip(keys, values))
        for k in keys:
            finite_or_stop(stats[k], self.now, self.ckpt_path, k)
        return stats

    def save(self, step):
        """ckpt_latest.pt (every part, for --resume) and the EMA student that the next stages read."""
        state = {}
        for key, model, opt_key, opt in self.parts:  # collective under FSDP: every rank, in the same order
            if opt is None:
                state[key] = full_state(model)
            else:
                state[key], state[opt_key] = full_state(model, opt)
        if self.rank == 0:
            save_training_state(dict(state, step=step, config=self.cfg, teacher=self.teacher.teacher_id, stage=self.stage),
                                self.run_dir)

    def grid(self, step, ema, rows, log):
        """grid_<step>.png, same held-out z in every column: the teacher, then `rows`, then the EMA student."""
        x_st = self.sample(ema) if self.viewer else None
        if self.rank == 0:
            imgs = torch.cat([self.teacher.to_images(r.to(self.device)) for r in (self.ho[2], *rows.values(), x_st)]).cpu()
            log.image(save_image_grid(imgs, os.path.join(self.run_dir, f"grid_{step:06d}.png"), ncol=len(self.ho[2])), step)

    def loop(self, step_fn, schedules, G, ema, rows=None, show=(), kind=lambda step: "", log_also=lambda step: False,
             report=None):
        """Steps from the resumed one to --steps (or --max_steps_this_run more; sizing mode:
        --benchmark_steps). schedules: {config key of a learning rate: its optimiser}. rows:
        {name: held-out samples} shown in the grids between the teacher and the student, and
        in the final fidelity line. kind(step): a step of its own FLOP count in sizing mode
        (04: with R1). log_also(step): steps logged besides every --log_every. report: (models,
        settings) of sizing mode's JSON line."""
        cfg, dev, rows = self.cfg, self.device, rows or {}
        log = MetricsLog(None if self.bench else os.path.join(self.run_dir, "metrics.jsonl"), self.step, cfg["log_to"], cfg)
        if self.rank == 0 and not self.bench:
            save_json(cfg, os.path.join(self.run_dir, "config.json"))
        self.held_out()
        self.teacher.release_unet()
        from tqdm import tqdm
        start = self.step
        end = cfg["benchmark_steps"] if self.bench else min(cfg["steps"], start + (cfg["max_steps_this_run"] or cfg["steps"]))
        if start >= end and not self.bench:
            print0(f"already complete at step {start} of {cfg['steps']}: nothing to run ({self.run_dir}/student_ema.pt is that step's student)")
        bar = tqdm(range(start, end), initial=start, total=end if self.bench else cfg["steps"], desc=f"stage {self.stage}",
                   disable=self.rank != 0)
        t0, seen, flops = time.time(), 0, StepFlops(end)
        for step in bar:
            if self.bench and step == flops.first_timed:  # sizing mode: time the steps after the warm-up
                synchronize(dev)
                t_bench, n_bench = time.perf_counter(), end - step
            if self.bench:
                flops.begin(step, kind(step))
            lrs = {k: lr_at(step, cfg["steps"], cfg[k]) for k in schedules}
            for k, opt in schedules.items():
                for g in opt.param_groups:
                    g["lr"] = lrs[k]
            self.now, self.log_now = step, step % cfg["log_every"] == 0 or log_also(step) or step == cfg["steps"] - 1
            stats = step_fn(step, self.batches(step))
            update_ema(ema, G, 0.0 if step < cfg["ema_start"] else cfg["ema_beta"])
            seen += cfg["batch"]
            if self.log_now:
                rate = seen / (time.time() - t0)
                log.write(step=step, **stats, img_s=rate, **lrs)
                bar.set_postfix({k: f"{stats[k]:.4f}" for k in show} | dict(img_s=f"{rate:.0f}"))
            if self.bench:
                flops.end()
                continue
            stopping = self.votes > 0 and step + 1 < end  # checkpoint, then exit
            if (step + 1) % cfg["ckpt_every"] == 0 or step + 1 == end or stopping:
                self.save(step + 1)
            if (step + 1) % cfg["grid_every"] == 0 or step + 1 == cfg["steps"]:
                self.grid(step + 1, ema, rows, log)
            if stopping:
                log.close()
                self.stop.exit(step + 1)
        self.stop.restore()
        log.close()
        if self.bench:
            synchronize(dev)
            sizing_report(cfg, self.world, dev, (time.perf_counter() - t_bench) / n_bench, n_bench, *report, flops)
        elif self.viewer and end == cfg["steps"] and end > start:
            x_st, x = self.sample(ema).cpu(), self.ho[2]
            fids = [f"{name} {held_out_fidelity(r, x)}" for name, r in rows.items()] + [f"stage {self.stage} {held_out_fidelity(x_st, x)}"]
            print0(f"held-out fidelity (MSE student vs teacher, same z, mean ± s.e. over {len(x)} samples): {', '.join(fids)}; "
                   f"wrote {self.run_dir}/student_ema.pt")
        cleanup()


# ----------------------------------------------------------------------------
# 14. Timing (01 --benchmark, 02 and 05 --speed).

def synchronize(device):
    """Wait for the GPU's queued work (CUDA runs asynchronously: a clock read without
    it stops at kernel launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=1):
    """fn() run `repeats` times, the GPU synchronised around each call. Returns the
    median seconds and the last call's result."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out
