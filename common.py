"""
Shared pieces of the Diffusion2GAN reference implementation.

Read beside the paper (Kang et al., "Distilling Diffusion Models into Conditional
GANs"). Sections, in order:
  1. presets           (Table A1 values; the toy preset is the embedded default)
  2. distributed       (one setup_distributed() for python / torchrun, CPU / CUDA)
  3. files             (atomic writes, PNG grids, errors with a clear cause)
  4. toy world         (procedural 10-class images, EDM teacher, classifier)
  5. EDM               (preconditioning, loss, Heun sampler, official pickle)
  6. latent diffusion  (SD1.5 / SDXL loader, DDIM + CFG, Eq. 7-8)
  7. pairs on disk     (seeds, shards, manifest)
"""
import argparse
import hashlib
import json
import math
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------
# 1. Presets. Every value can be overridden on the command line by a flag of the
# same name. Paper values come from Table A1; the toy preset is scaled down to
# what runs in minutes on 2 CPU cores.

PRESETS = {
    "toy": dict(
        family="edm", teacher=os.path.join(REPO, "assets", "toy_teacher.safetensors"),
        resolution=16, channels=3, num_classes=10,
        num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, guidance=1.0,
        num_pairs=4096, shard_size=512, batch_per_device=256, pair_dtype="float32",
    ),
    "cifar10": dict(
        family="edm", teacher=None,  # the official NVlabs EDM pickle, e.g. edm-cifar10-32x32-cond-vp.pkl
        resolution=32, channels=3, num_classes=10,
        num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, guidance=1.0,
        num_pairs=1_000_000, shard_size=10_000, batch_per_device=512, pair_dtype="float32",
    ),
    "sd15": dict(
        family="ldm", teacher="stable-diffusion-v1-5/stable-diffusion-v1-5",
        resolution=512, channels=4, num_classes=0,
        num_steps=50, guidance=3.0,  # SD-CFG-3; pass --guidance 8 for SD-CFG-8
        num_pairs=3_000_000, shard_size=1000, batch_per_device=32, pair_dtype="float16",
    ),
    "sdxl": dict(
        family="ldm", teacher="stabilityai/stable-diffusion-xl-base-1.0",
        resolution=1024, channels=4, num_classes=0,
        num_steps=50, guidance=7.0,  # SDXL-CFG-7
        num_pairs=8_000_000, shard_size=1000, batch_per_device=8, pair_dtype="float16",
    ),
}


def get_preset(name):
    if name not in PRESETS:
        raise SystemExit(f"error: unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name])


def add_preset_args(parser, defaults):
    """Build argparse flags from a script's block of defaults, plus one flag per
    preset key. A default of None means 'take it from the preset'."""
    keys = dict(defaults)
    for p in PRESETS.values():
        for k in p:
            keys.setdefault(k, None)
    for key, val in keys.items():
        ref = val if val is not None else next((p[key] for p in PRESETS.values() if p.get(key) is not None), "")
        if isinstance(ref, bool):
            parser.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, default=val)
        else:
            parser.add_argument(f"--{key}", type=type(ref), default=val)
    return parser


def resolve_config(args):
    """The preset's values, overridden by every flag that was given (not None)."""
    cfg = get_preset(args.preset)
    for key, val in vars(args).items():
        if val is not None or key not in cfg:
            cfg[key] = val
    if cfg.get("out_dir") is None:
        cfg["out_dir"] = os.path.join("runs", args.preset)
    return cfg


# ----------------------------------------------------------------------------
# 2. Distributed. The run is distributed only when torchrun set RANK, LOCAL_RANK
# and WORLD_SIZE; otherwise it is one process on the best device available.

def setup_distributed():
    """Returns (rank, local_rank, world_size, device). Works under plain python
    and torchrun, with gloo on CPU and nccl on CUDA."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return rank, local_rank, world, device
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return 0, 0, 1, device


def is_main():
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def cleanup():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def autocast(device, dtype):
    """One --dtype flag for autocast: float32 means no autocast."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------
# 3. Files. Every write goes to a temporary name first and is renamed when
# complete, so a killed run never leaves a file that a resume would trust.

def fail(msg):
    """Stop with a one-line cause (no traceback): bad input, not a bug."""
    raise SystemExit(f"error: {msg}")


def _tmp_name(path):
    return f"{path}.tmp{os.getpid()}"


def atomic_torch_save(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def atomic_save_safetensors(tensors, path, metadata=None):
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def to_uint8(img):
    """[-1, 1] float images (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    img = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).numpy()


def save_image_grid(images, path, ncol=8, scale=1, pad=1):
    """Write a PNG grid of (B, 3, H, W) images in [-1, 1], row-major, atomically.
    `scale` enlarges small images with nearest-neighbour so toy grids are legible."""
    from PIL import Image
    imgs = to_uint8(images)
    b, h, w, _ = imgs.shape
    nrow = math.ceil(b / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = imgs[i]
    im = Image.fromarray(grid)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path) + ".png"
    im.save(tmp)
    os.replace(tmp, path)
    return path


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------
# 4. The toy world: 10 classes of anti-aliased shapes on 16x16 RGB. Within a
# class, the colour, background, position and size vary and are all set by the
# image's seed, so the noise-to-image map of a teacher has real structure.

TOY_CLASSES = ["disc", "square", "triangle", "plus", "ring", "h-bar", "v-bar", "diamond", "cross", "frame"]


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
    coords = torch.arange(S, dtype=torch.float32) + 0.5
    imgs = torch.empty(n, 3, resolution, resolution)
    for i in range(n):
        px = coords[None, :] - cx[i]
        py = coords[:, None] - cy[i]
        inside = (_toy_sdf(int(out_labels[i]), px, py, r[i]) < 0).float()
        mask = F.avg_pool2d(inside[None, None], supersample)[0]  # anti-aliased coverage
        imgs[i] = mask * fg[i][:, None, None] + (1 - mask) * bg[i][:, None, None]
    return imgs * 2 - 1, out_labels


def _hsv_to_rgb(h, s, v):
    k = torch.tensor([5.0, 3.0, 1.0])
    t = (k + h * 6) % 6
    return v - v * s * torch.clamp(torch.minimum(t, 4 - t), 0, 1)


def toy_dataset(n, split="train"):
    """n toy images with labels. Splits use disjoint seed ranges."""
    base = {"train": 0, "val": 50_000_000, "test": 60_000_000}[split]
    return toy_images(range(base, base + n))


class ToyClassifier(nn.Module):
    """A small CNN on toy images. It judges teacher/student samples (class
    accuracy) and gives FID-toy features; it is never the training loss network."""

    def __init__(self, num_classes=10, ch=32):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())
        self.body = nn.Sequential(block(3, ch), nn.AvgPool2d(2), block(ch, 2 * ch), nn.AvgPool2d(2),
                                  block(2 * ch, 4 * ch), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * ch, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def train_toy_classifier(path, steps=600, batch=128, seed=0, log=print):
    """Train (or load a cached) ToyClassifier. ~1 minute on 2 CPU cores."""
    model = ToyClassifier()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    torch.manual_seed(seed)
    x, y = toy_images(range(70_000_000, 70_000_000 + 12_000))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        xb = x[idx] + 0.05 * torch.randn(batch, *x.shape[1:], generator=g)  # robust to slight sample noise
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    xv, yv = toy_dataset(2000, "val")
    acc = classify(model.eval(), xv).eq(yv).float().mean().item()
    log(f"toy classifier: held-out accuracy {acc:.4f}")
    atomic_torch_save(model.state_dict(), path)
    return model


@torch.no_grad()
def classify(model, x, batch=512):
    return torch.cat([model(x[i:i + batch].float()).argmax(1) for i in range(0, len(x), batch)])


# ----------------------------------------------------------------------------
# 5. EDM (Karras et al. 2022). The toy teacher is a diffusers UNet2DModel with
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


def edm_loss(D, y, labels, p_mean=-1.2, p_std=1.2, sigma_data=0.5, generator=None):
    """EDM training loss: lambda(sigma) * ||D(y + sigma n; sigma) - y||^2."""
    rnd = torch.randn(len(y), 1, 1, 1, generator=generator)
    sigma = (rnd * p_std + p_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    n = torch.randn(y.shape, generator=generator) * sigma
    return (weight * (D(y + n, sigma, labels) - y) ** 2).mean()


def guided_denoiser(net, guidance):
    """Classifier-free guidance for a class-conditional EDM net (null class =
    num_classes): D_w = D_uncond + w (D_cond - D_uncond). w = 1 is the plain net."""
    if guidance == 1.0:
        return net

    def D(x, sigma, labels):
        null = torch.full_like(labels, net.num_classes)
        d = net(torch.cat([x, x]), torch.cat([sigma.reshape(-1)] * 2) if torch.is_tensor(sigma) and sigma.ndim else sigma,
                torch.cat([null, labels]))
        d_uncond, d_cond = d.chunk(2)
        return d_uncond + guidance * (d_cond - d_uncond)
    return D


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
    if path is None or not os.path.isfile(path):
        fail(f"toy teacher weights not found at '{path}'. Train them with "
             f"'python 01_make_pairs.py --preset toy --train_teacher' or pass --teacher PATH")
    from safetensors.torch import load_file
    net = build_toy_teacher()
    try:
        sd = {k: v.float() for k, v in load_file(path).items()}
        net.load_state_dict(sd)
    except Exception as e:  # wrong file, other architecture, corrupt file
        fail(f"'{path}' is not a toy teacher checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return net.eval().requires_grad_(False)


def load_edm_pickle(path):
    """The official NVlabs EDM network pickle, used as a black-box denoiser
    D(x, sigma, class_labels). Unpickling needs NVlabs' torch_utils and dnnlib."""
    if path is None or not os.path.isfile(path):
        fail(f"EDM teacher pickle not found at '{path}' (pass --teacher PATH.pkl, e.g. edm-cifar10-32x32-cond-vp.pkl)")
    import pickle
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except ModuleNotFoundError as e:
        fail(f"unpickling '{path}' needs NVlabs' EDM code ('{e.name}' is missing): clone "
             f"github.com/NVlabs/edm and put it on PYTHONPATH so that torch_utils and dnnlib import")
    except Exception as e:
        fail(f"'{path}' is not a readable EDM pickle ({type(e).__name__}: {e})")
    net = data["ema"] if isinstance(data, dict) and "ema" in data else data
    if not hasattr(net, "sigma_data"):
        fail(f"'{path}' does not hold an EDM network (no 'ema' entry with sigma_data)")
    return net.eval().requires_grad_(False)


class EDMTeacher:
    """The EDM family (toy teacher, or the official CIFAR10 pickle) behind the one
    teacher interface: noise/condition from a seed, the ODE solver, x0(x_t, t, c)
    and the student's one-step map G(z, c) = D(sigma_max z; sigma_max, c)."""

    family = "edm"

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        path = cfg["teacher"]
        if cfg["preset"] == "toy" or (path and path.endswith(".safetensors")):
            self.net, self.kind = load_toy_teacher(path).to(device), "toy"
        else:
            self.net, self.kind = load_edm_pickle(path).to(device), "edm-pickle"
        self.num_classes = cfg["num_classes"]
        self.z_shape = (cfg["channels"], cfg["resolution"], cfg["resolution"])
        self.teacher_id = f"{os.path.basename(path)}:sha256={file_sha256(path)[:16]}"

    def noise_and_condition(self, seeds, indices=None):
        """z ~ N(0, I) and a class label, both drawn from each pair's own seed on
        the CPU generator: identical whatever the batch size or number of ranks."""
        z = torch.empty(len(seeds), *self.z_shape)
        labels = torch.empty(len(seeds), dtype=torch.long)
        for i, s in enumerate(seeds):
            g = torch.Generator().manual_seed(int(s))
            z[i] = torch.randn(self.z_shape, generator=g)
            labels[i] = torch.randint(self.num_classes, (1,), generator=g)
        return z, labels

    def denoiser(self, guidance=1.0):
        """D(x; sigma, labels) with integer labels (one-hot for the NVlabs net)."""
        if self.kind == "toy":
            return guided_denoiser(self.net, guidance)
        if guidance != 1.0:
            fail("the official EDM CIFAR10 network has no unconditional mode; use --guidance 1")
        net = self.net

        def D(x, sigma, labels):
            onehot = F.one_hot(labels, net.label_dim).float() if net.label_dim else None
            return net(x, sigma, onehot).float()
        return D

    @torch.no_grad()
    def solve(self, z, labels):
        c = self.cfg
        rs = getattr(self.net, "round_sigma", None) if self.kind != "toy" else None
        return edm_heun_sampler(self.denoiser(c["guidance"]), z.to(self.device), labels.to(self.device),
                                c["num_steps"], c["sigma_min"], c["sigma_max"], c["rho"], round_sigma=rs)

    @property
    def nfe(self):
        return (2 * self.cfg["num_steps"] - 1) * (2 if self.cfg["guidance"] != 1.0 else 1)

    def solver_name(self):
        return f"edm-heun-{self.cfg['num_steps']}"

    def to_images(self, x):
        return x.float().clamp(-1, 1)

    def shard_fields(self, labels):
        return dict(labels=labels)


def load_teacher(cfg, device):
    """The one entry point for every teacher family (DESIGN: 'one interface')."""
    if cfg["family"] == "edm":
        return EDMTeacher(cfg, device)
    return LDMTeacher(cfg, device)


# ----------------------------------------------------------------------------
# 6. Latent diffusion teachers (SD1.5 / SDXL). Every SD1.5/SDXL difference lives
# here: one vs two text encoders, SDXL's pooled embedding and add_time_ids
# micro-conditioning, the VAE scaling factor (0.18215 / 0.13025, read from the
# VAE config) and the latent size (resolution / 8).

LDM_COMPONENTS = {
    "sd15": ("unet", "vae", "scheduler", "text_encoder", "tokenizer"),
    "sdxl": ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}


def resolve_pretrained(src):
    """A local diffusers folder as is; a hub id through the local cache, or a
    download that fails fast (with the model id named) when the hub is unreachable."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src) or src.startswith((".", "/")) or src.count("/") != 1:
        fail(f"teacher '{src}' is neither a diffusers folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.txt", "*.safetensors", "*.model"]
    try:
        return snapshot_download(src, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        fail(f"model '{src}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
             f"download it first or pass a local folder with --teacher")
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        fail(f"cannot reach the hub to fetch model '{src}' ({e}); pass a local diffusers folder with --teacher")
    try:
        return snapshot_download(src, allow_patterns=patterns, etag_timeout=10)
    except Exception as e:
        fail(f"could not fetch model '{src}' from the hub ({type(e).__name__}: {str(e).splitlines()[0]})")


def detect_ldm_kind(path):
    """'sdxl' if the folder has SDXL's second text encoder or text_time conditioning."""
    ucfg = os.path.join(path, "unet", "config.json")
    add = json.load(open(ucfg)).get("addition_embed_type") if os.path.isfile(ucfg) else None
    return "sdxl" if os.path.isdir(os.path.join(path, "text_encoder_2")) or add == "text_time" else "sd15"


def load_prompts(path):
    """Prompts from a .txt / .jsonl file or a folder of them, one per line. A
    .jsonl line is a string or an object with 'prompt', 'caption' or 'text'."""
    if path is None:
        fail("--prompts is required for sd15/sdxl pairs (a .txt/.jsonl file or a folder of them)")
    if not os.path.exists(path):
        fail(f"prompt path '{path}' does not exist")
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".txt", ".jsonl"))) \
        if os.path.isdir(path) else [path]
    prompts = []
    for fn in files:
        with open(fn, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                if fn.endswith(".jsonl"):
                    obj = json.loads(line)
                    line = obj if isinstance(obj, str) else next((obj[k] for k in ("prompt", "caption", "text") if k in obj), None)
                    if line is None:
                        fail(f"'{fn}': a .jsonl line has none of the keys prompt/caption/text")
                prompts.append(line)
    if not prompts:
        fail(f"no prompts found in '{path}' (empty file, or a folder without .txt/.jsonl files)")
    return prompts


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
    """SD1.5 / SDXL behind the one teacher interface. The ODE is diffusers' DDIM
    (configured from the teacher's own scheduler config) with classifier-free
    guidance; cond and uncond go through the U-Net as one batch, exactly as in
    StableDiffusion(XL)Pipeline, so the stored x equals the pipeline's latents."""

    family = "ldm"

    def __init__(self, cfg, device, load_vae=True):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection
        self.cfg, self.device, self.kind = cfg, device, cfg["preset"]
        src = cfg["teacher"]
        path = resolve_pretrained(src)
        found = detect_ldm_kind(path)
        if found != self.kind:
            fail(f"teacher '{src}' is an {found.upper()} model but --preset is {self.kind}; use --preset {found}")
        for comp in LDM_COMPONENTS[self.kind]:
            if comp == "vae" and not load_vae:
                continue
            if not os.path.isdir(os.path.join(path, comp)):
                fail(f"teacher folder '{path}' is missing the '{comp}' component needed by {self.kind}")
        self.dtype = getattr(torch, cfg.get("dtype") or "float32")
        frozen = dict(torch_dtype=self.dtype)
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **frozen).to(device).eval().requires_grad_(False)
        self.scheduler = DDIMScheduler.from_config(json.load(open(os.path.join(path, "scheduler", "scheduler_config.json"))))
        self.vae = None
        if load_vae:  # SDXL's VAE overflows in fp16: keep it fp32 when its config asks (force_upcast)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
            self.vae = vae.to(device, torch.float32 if vae.config.get("force_upcast", False) else self.dtype).eval().requires_grad_(False)
        self.tokenizers, self.text_encoders = [], []
        suffixes = ["", "_2"] if self.kind == "sdxl" else [""]
        for sfx in suffixes:
            tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer" + sfx)
            te_cls = CLIPTextModelWithProjection if sfx == "_2" else CLIPTextModel
            te = te_cls.from_pretrained(path, subfolder="text_encoder" + sfx, **frozen).to(device).eval().requires_grad_(False)
            vocab = te.config.vocab_size
            if len(tok) > vocab or len(tok) < vocab // 2:
                fail(f"tokenizer{sfx} of '{src}' has {len(tok)} tokens but text_encoder{sfx} expects {vocab}: the "
                     f"tokenizer did not load properly (an offline hub id can silently give a degenerate tokenizer); "
                     f"pass a complete local folder with --teacher")
            self.tokenizers.append(tok)
            self.text_encoders.append(te)
        index = os.path.join(path, "model_index.json")
        self.force_zeros_uncond = self.kind == "sdxl" and (json.load(open(index)).get("force_zeros_for_empty_prompt", True)
                                                            if os.path.isfile(index) else True)
        vae_cfg = json.load(open(os.path.join(path, "vae", "config.json")))
        self.vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.scaling_factor = vae_cfg.get("scaling_factor", 0.18215)
        self.pixel_res = cfg["resolution"]
        r = self.pixel_res // self.vae_scale
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
        cfg_hash = hashlib.sha256(open(os.path.join(path, "unet", "config.json"), "rb").read()).hexdigest()[:12]
        self.teacher_id = f"{src}:unet-config={cfg_hash}"
        self.prompts, self.prompts_id = None, None
        if cfg.get("prompts"):
            self.prompts = load_prompts(cfg["prompts"])
            self.prompts_id = f"{os.path.basename(os.path.normpath(cfg['prompts']))}:n={len(self.prompts)}:sha256=" + \
                hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]
            if len(self.prompts) < cfg["num_pairs"] and not cfg.get("cycle_prompts"):
                fail(f"'{cfg['prompts']}' has {len(self.prompts)} prompts but --num_pairs is {cfg['num_pairs']}; "
                     f"pass --cycle_prompts to reuse them (pair i takes prompt i mod {len(self.prompts)}) or lower --num_pairs")

    # --- conditions -----------------------------------------------------------
    def noise_and_condition(self, seeds, indices):
        """z from each pair's seed on the CPU generator; prompt i for pair i."""
        z = torch.stack([torch.randn(self.z_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return z, [self.prompts[i % len(self.prompts)] for i in indices]

    def shard_fields(self, prompts):
        return dict(prompts=prompts)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """Text conditioning as the pipelines build it. Returns the U-Net kwargs."""
        embeds, pooled = [], None
        for tok, te in zip(self.tokenizers, self.text_encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            if self.kind == "sd15":
                embeds.append(te(ids.to(self.device))[0])
            else:  # SDXL: penultimate hidden states of both encoders; pooled from the projection encoder
                out = te(ids.to(self.device), output_hidden_states=True)
                if pooled is None and out[0].ndim == 2:
                    pooled = out[0]
                embeds.append(out.hidden_states[-2])
        kw = dict(encoder_hidden_states=torch.cat(embeds, dim=-1).to(self.dtype))
        if self.kind == "sdxl":
            h = w = self.pixel_res  # micro-conditioning: original size, crop (0, 0), target size
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device).repeat(len(prompts), 1)
            kw["added_cond_kwargs"] = dict(text_embeds=pooled.to(self.dtype), time_ids=time_ids)
        return kw

    def encode_uncond(self, n):
        """The negative: the empty prompt (SD1.5), or zeros for SDXL when the
        pipeline's force_zeros_for_empty_prompt is set (its default)."""
        kw = self.encode_prompts([""] * n)
        if self.force_zeros_uncond:
            kw["encoder_hidden_states"] = torch.zeros_like(kw["encoder_hidden_states"])
            kw["added_cond_kwargs"]["text_embeds"] = torch.zeros_like(kw["added_cond_kwargs"]["text_embeds"])
        return kw

    # --- the ODE ----------------------------------------------------------------
    def eps(self, x, t, cond):
        return self.unet(x.to(self.dtype), t, **cond).sample.float()

    @torch.no_grad()
    def solve(self, z, prompts, guidance=None):
        """DDIM with classifier-free guidance (Eq. 1's x). The state stays float32."""
        w = self.cfg["guidance"] if guidance is None else guidance
        w = torch.as_tensor(w, dtype=torch.float32, device=self.device).reshape(-1, 1, 1, 1)
        cfg_on = bool((w != 1).any()) or self.cfg.get("cfg_range") is not None
        cond = self.encode_prompts(prompts)
        if cfg_on:
            cond = cat_cond(self.encode_uncond(len(prompts)), cond)
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

    def x0(self, x_t, t, cond, unet=None):
        """Eq. 7: the data prediction of a U-Net (the teacher's by default)."""
        unet = unet or self.unet
        out = unet(x_t.to(next(unet.parameters()).dtype), t, **cond).sample.float()
        return x0_from_model_output(out, x_t.float(), self.alphas_cumprod[t].to(x_t.device), self.prediction_type)

    def student(self, unet, z, cond):
        """Eq. 8: G(z, c) = (z - sigma_T eps(z, c, T)) / alpha_T."""
        return self.x0(z, self.T, cond, unet)

    @property
    def nfe(self):
        return self.cfg["num_steps"] * (2 if self.cfg["guidance"] > 1 or self.cfg.get("cfg_range") else 1)

    def solver_name(self):
        return f"ddim-{self.cfg['num_steps']}"

    @torch.no_grad()
    def to_images(self, x):
        if self.vae is None:
            fail("decoding latents needs the teacher's VAE")
        img = self.vae.decode((x / self.scaling_factor).to(self.vae.dtype)).sample
        return img.float().clamp(-1, 1)


def cat_cond(a, b):
    """Concatenate two U-Net condition dicts along the batch (uncond first)."""
    out = dict(encoder_hidden_states=torch.cat([a["encoder_hidden_states"], b["encoder_hidden_states"]]))
    if "added_cond_kwargs" in a:
        out["added_cond_kwargs"] = {k: torch.cat([a["added_cond_kwargs"][k], b["added_cond_kwargs"][k]])
                                    for k in a["added_cond_kwargs"]}
    return out


# ----------------------------------------------------------------------------
# 7. Pairs on disk. Shard k holds pairs [k*S, (k+1)*S) as a .safetensors file
# (x, seed, and label or prompts), written to a temporary name and renamed when
# complete. manifest.json records what made them; stages 03-05 refuse pairs
# whose manifest does not match the model they train.

MANIFEST_KEYS = ("preset", "family", "teacher", "solver", "nfe", "guidance", "z_shape", "x_shape",
                 "pair_dtype", "num_pairs", "shard_size", "seed", "prompts", "cfg_range")


def shard_path(pairs_dir, k):
    return os.path.join(pairs_dir, f"shard_{k:06d}.safetensors")


def check_manifest(found, expected, what):
    """Refuse a mismatch and name every field that differs."""
    diff = [f"{k}: found {found.get(k)!r}, expected {expected.get(k)!r}"
            for k in MANIFEST_KEYS if k in expected and found.get(k) != expected.get(k)]
    if diff:
        fail(f"{what} was made by a different setup; " + "; ".join(diff))


def read_manifest(pairs_dir):
    path = os.path.join(pairs_dir, "manifest.json")
    if not os.path.isfile(path):
        fail(f"no pairs at '{pairs_dir}' (manifest.json missing); run 01_make_pairs.py first")
    with open(path) as f:
        return json.load(f)


def write_shard(path, x, seeds, labels=None, prompts=None, w=None):
    tensors = {"x": x, "seed": torch.as_tensor(seeds, dtype=torch.int64)}
    if labels is not None:
        tensors["label"] = labels.to(torch.int64)
    if w is not None:
        tensors["w"] = w.float()
    meta = {"prompts": json.dumps(prompts)} if prompts is not None else None
    atomic_save_safetensors(tensors, path, metadata=meta)


def open_shard(path, expected_count=None):
    """Open a shard memory-mapped; a corrupt or truncated shard stops the run."""
    from safetensors import safe_open
    try:
        f = safe_open(path, framework="pt")
        n = f.get_slice("seed").get_shape()[0]
    except Exception as e:
        fail(f"corrupt pair shard '{path}' ({type(e).__name__}: {e}); delete it and rerun 01_make_pairs.py to regenerate it")
    if expected_count is not None and n != expected_count:
        fail(f"pair shard '{path}' holds {n} pairs, expected {expected_count}; delete it and rerun 01_make_pairs.py")
    return f


def load_shard(path, expected_count=None):
    f = open_shard(path, expected_count)
    out = {k: f.get_tensor(k) for k in f.keys()}
    meta = f.metadata() or {}
    if "prompts" in meta:
        out["prompts"] = json.loads(meta["prompts"])
    return out
