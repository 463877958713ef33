"""
Stage 1 of Diffusion2GAN (§3.1-3.2, Eq. 1, 3, 4, 8): ODE distillation. The
one-step student G(z, c), initialised from the teacher in the data-prediction
parameterisation (Eq. 8; EDM: D(sigma_max z; sigma_max)), regresses the teacher's
ODE output x for the same noise z and condition c:

    L = E_{z,c,x} d(G(z, c), x),   d = E-LatentLPIPS by default (Eq. 3-4)

Input:  <out_dir>/pairs (01), <out_dir>/lpips/latent_lpips.pt (02) or --lpips_ckpt
Output: <out_dir>/distill/{student_ema.pt, ckpt_latest.pt, metrics.jsonl, grid_*.png}
        student_ema.pt is what 04 and 05 read.

Toy (CPU, ~3 min):   python 03_ode_distill.py
CIFAR10 (1 GPU):     python 03_ode_distill.py --preset cifar10 --teacher edm-cifar10-32x32-cond-vp.pkl   (lpips: README, Install)
SD1.5 (8 GPUs):      torchrun --nproc_per_node=8 03_ode_distill.py --preset sd15 --lpips_ckpt sd15_latest_vgg16_tuned.pth
Table 1 ablation:    python 03_ode_distill.py --loss mse --out_dir runs/toy --run_name distill_mse
Table 6 (pairs):     python 03_ode_distill.py --out_dir runs/t6 --first_pairs 8192 --steps 1500 --run_name s1_8k
"""
import os

import torch

import common as C

FLAGS = {
    "run": C.RUN_FLAGS + [("run_name", "distill", None, "output subfolder of out_dir")] + C.TRAIN_RUN_FLAGS,
    "inputs": C.TRAIN_INPUT_FLAGS,
    "loss (Eq. 1-4, Table 1)": C.LOSS_FLAGS,
    "optimisation (Table A1)": C.TRAIN_BATCH_FLAGS + [
        ("optimizer", None, ("adam", "radam"), "Adam(W), or RAdam (CIFAR10)"),
        ("lr", None, C.LR, "learning rate, START,END for a cosine decay over --steps (Table A1: 1e-4,1e-5)"),
        ("betas", "0.9,0.999", C.BETAS, "Adam betas"),
        ("dropout", None, C.FRACTION, "dropout of G (Table A1: 0.1 for CIFAR10)"),
        ("grad_ckpt", None, bool, "gradient checkpointing of G (memory for compute; on in the SDXL row)"),
    ] + C.TRAIN_REST_FLAGS,
    "logging": C.TRAIN_LOG_FLAGS,
}

STAGE1 = {  # Table A1's stage-1 row per preset (toy: scaled to 2 CPU cores)
    "toy": dict(steps=300, batch=64, batch_per_device=64, grad_ckpt=False, optimizer="adam", lr=(2e-4, 2e-5),
                weight_decay=0.0, attn_weight_decay=0.0, dropout=0.0, ema_start=90, ema_beta=0.995, grid_every=100,
                ckpt_every=100),
    "cifar10": dict(steps=150_000, batch=512, batch_per_device=512, grad_ckpt=False, optimizer="radam", lr=4e-4,
                    weight_decay=0.0, attn_weight_decay=0.0, dropout=0.1, ema_start=20_000, ema_beta=0.9999,
                    grid_every=5000, ckpt_every=5000),
    "sd15": dict(steps=150_000, batch=256, batch_per_device=32, grad_ckpt=False, optimizer="adam", lr=(1e-4, 1e-5),
                 weight_decay=1e-2, attn_weight_decay=1e-5, dropout=0.0, ema_start=4000, ema_beta=0.9999, grid_every=2000,
                 ckpt_every=2000),
    "sdxl": dict(steps=20_000, batch=1024, batch_per_device=8, grad_ckpt=True, optimizer="adam", lr=(1e-4, 1e-5),
                 weight_decay=1e-2, attn_weight_decay=1e-5, dropout=0.0, ema_start=4000, ema_beta=0.9999, grid_every=2000,
                 ckpt_every=2000),
}
# micro-batches: the paper's per-GPU batch where one 80 GB GPU holds it (measured on an H100, docs/scaling.md:
# SD1.5 at 32 peaks at 57.4 GB; SDXL at 8 needs gradient checkpointing, 53.0 GB)
STAGE1["toy_sd"] = STAGE1["toy"]  # toy_sd's G is a U-Net of the toy's size
STAGE1["sd15_cfg8"] = dict(STAGE1["sd15"], steps=50_000, batch=2048)  # Table A1, SD-CFG-8
RESUME_CKPT_KEYS = ("model", "ema", "opt", "step", "config", "teacher", "stage")  # what ckpt_latest.pt holds


def get_config(argv=None):
    """The preset with this stage's Table A1 row, then the flags."""
    return C.parse_config(__doc__, FLAGS, argv, STAGE1)[0]


def set_dropout(net, rate):
    """Set the dropout rate everywhere: torch Dropout layers (the toy U-Net) and the
    float `dropout` attribute of the official NVlabs EDM blocks, which otherwise
    keep the rate stored in the pickle (0.13 for CIFAR10). Prints the rate in effect."""
    n = 0
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p, n = rate, n + 1
        elif isinstance(vars(m).get("dropout"), float):  # an instance attribute (not a diffusers config value)
            m.dropout, n = rate, n + 1
    C.print0(f"student dropout: {rate} in {n} layers")
    return n


def validate(cfg):
    """Every file this stage reads, before any work (the flags' types checked the values;
    training_setup checks the batch split before it builds anything), read once: returns
    the pairs' manifest, the --resume checkpoint (memory-mapped) and the loss's LPIPS."""
    C.check_tracker(cfg["log_to"])
    if cfg["benchmark_steps"]:
        return None, None, C.read_lpips(cfg)
    m = C.read_manifest(cfg["pairs"] or os.path.join(cfg["out_dir"], "pairs"))  # missing or corrupt pairs stop here
    ckpt = os.path.join(cfg["out_dir"], cfg["run_name"], "ckpt_latest.pt")
    resume = cfg["resume"] and os.path.isfile(ckpt)
    ck = C.load_checkpoint(ckpt, "stage-1 checkpoint", mmap=True, keys=RESUME_CKPT_KEYS) if resume else None
    return m, ck, C.read_lpips(cfg)


def main(argv=None):
    cfg = get_config(argv)
    manifest, ck, lpips = validate(cfg)
    run = C.Trainer(cfg, 1, manifest)  # processes, signals, the teacher and its pairs
    teacher, device = run.teacher, run.device
    loss_fn = C.build_loss(cfg, teacher, device, lpips)
    G = C.Student(teacher, cfg).to(device)
    set_dropout(G.net, cfg["dropout"])  # Table A1: CIFAR10 trains with dropout 0.1
    if cfg["grad_ckpt"]:
        C.enable_grad_ckpt(G.net)
    G, ema = run.models(G)
    opt = C.make_optimizer(cfg["optimizer"], C.param_groups(G, cfg["weight_decay"], cfg["attn_weight_decay"]),
                           C.lr_schedule(cfg["lr"])[0], cfg["betas"])
    run.resume(ck, ("model", G, "opt", opt), ("ema", ema, None, None))
    del ck  # memory-mapped: not held open (and on disk) once replaced
    model = run.ddp(G)

    def step(step, batches):  # Eq. 1: L = E d(G(z, c), x), d = E-LatentLPIPS (Eq. 3-4) by default
        loss = torch.zeros((), device=device)
        for m, b in enumerate(batches):
            run.seed(step, b["chunk"])  # the augmentation's and dropout's RNG
            with run.accumulating(model, m), C.autocast(device, cfg["dtype"]):
                d = loss_fn(model(b["z"], b["cond"], b["w"]), b["x"]).mean()
                (d / run.accum).backward()
            loss += d.detach() / run.accum
        stats = run.reduce(loss=loss)
        return dict(stats, grad_norm=run.update(opt, G))

    run.loop(step, {"lr": opt}, G, ema, show=("loss",),
             report=(dict(G=G), ("preset", "batch_per_device", "dtype", "grad_ckpt", "fsdp", "loss", "lpips_augment")))


if __name__ == "__main__":
    main()
