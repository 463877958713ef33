"""
Stage 2 of Diffusion2GAN (§3.3, Eq. 5-6, Table 2, Table A1): fine-tune the
stage-1 student with a conditional GAN whose discriminator is the teacher U-Net
(noise-prediction parameterisation), conditioned on c and on the noise z:

    L_D = -log D(c, z, x) - log(1 - D(c, z, G(z, c)))        (Eq. 5, softplus form)
    L_G = d_E-LatentLPIPS(G(z, c), x) + lambda_GAN * -log D(c, z, G(z, c))   (Eq. 6)

One D update per G update. Each Table 2 component is a flag:
    --diffusion_d (always: D from the teacher's weights), --z_cond, --r1_gamma > 0
    (single-sample, every --r1_every D steps), --multiscale, --mix_match FRACTION,
    --noise_aug (SDXL preset).

Input:  <out_dir>/distill/student_ema.pt (03), <out_dir>/pairs, LatentLPIPS
Output: <out_dir>/gan/{student_ema.pt, ckpt_latest.pt, metrics.jsonl, grid_*.png}

Toy (CPU, ~3 min):   python 04_gan_finetune.py
SD1.5 (8 GPUs):      torchrun --nproc_per_node=8 04_gan_finetune.py --preset sd15 --lpips_ckpt sd15_latest_vgg16_tuned.pth --dtype bfloat16
Table 2 row:         python 04_gan_finetune.py --no-multiscale --mix_match 0 --run_name gan_no_ms
Export (diffusers):  python 04_gan_finetune.py --preset sd15 --export runs/sd15/export   (see README for the pipeline call)
"""
import argparse
import copy
import importlib
import os
import time

import torch
from tqdm import tqdm

import common as C

DEFAULTS = dict(
    preset="toy",
    out_dir=None,
    run_name="gan",
    init=None,               # stage-1 student (default <out_dir>/distill/student_ema.pt)
    pairs=None,
    teacher=None,
    lpips_ckpt=None,
    pixel_lpips="imagenet",
    loss=None,               # the regression term (stage 1's loss)
    lpips_augment=None,
    lpips_l1=False,          # + mean |G - x| in the regression term (the official add_l1_loss; not in the paper)
    lambda_gan=None,         # Table A1: 0.25 (SD1.5), 1.0 (SDXL)
    z_cond=True,             # "+ z conditional D"
    multiscale=True,         # "+ Multi-scale training": multi-scale inputs, 3 readouts per decoder scale
    r1_gamma=None,           # "+ Single-sample R1" strength (0 = off)
    r1_every=16,             # lazy R1 interval (D steps)
    mix_match=None,          # "+ Mix-and-match": fraction of fakes replaced by mismatched reals
    noise_aug=None,          # noise augmentation before D at a random t (SDXL)
    d_sigma=0.5,             # toy/EDM: D's fixed noise level
    d_timestep=0,            # SD: D's fixed timestep
    steps=None,
    batch=None,
    batch_per_device=None,
    lr=None, lr_end=None, d_lr=None, d_lr_end=None,
    betas="0.9,0.999",
    d_betas=None,            # Table A1: 0.9,0.999 (SD1.5); 0.0,0.99 (SDXL)
    weight_decay=None, attn_weight_decay=None,
    ema_start=None, ema_beta=None,
    grad_clip=0.0,
    dtype="float32",
    seed=0,
    log_every=10, grid_every=None, ckpt_every=None,
    resume=False,            # continue from <run>/ckpt_latest.pt (refused if a setting in RESUME_KEYS changed)
    allow_config_change=False,  # --resume anyway when a RESUME_KEYS setting changed (deliberately)
    max_steps_this_run=0,
    export=None,             # sd15/sdxl: write the stage-2 student as a diffusers folder (unet/ + scheduler/) and exit
    grad_ckpt=False,         # gradient checkpointing of G and D (memory for compute)
    benchmark_steps=0,       # sizing mode: N steps on random pairs, G from the teacher (e.g. --teacher random); report, exit
)

# toy: 300 steps are too few for D to learn at SD1.5's d_lr 1e-4 -> 1e-5 and lambda 0.25
# (its real/fake logits parted by < 0.5 and FID-toy moved within noise); a constant
# d_lr 2e-4 and lambda 1.0 (SDXL's) give D enough signal in the toy budget (README, Table 2).
STAGE2 = {
    "toy": dict(steps=300, batch=64, batch_per_device=64, lr=5e-5, lr_end=1e-5, d_lr=2e-4, d_lr_end=2e-4, lambda_gan=1.0,
                r1_gamma=0.01, mix_match=0.25, noise_aug=False, d_betas="0.0,0.99", weight_decay=0.0, attn_weight_decay=0.0,
                ema_start=0, ema_beta=0.99, grid_every=100, ckpt_every=100),
    "sd15": dict(steps=10_000, batch=256, batch_per_device=4, lr=1e-4, lr_end=1e-5, d_lr=1e-4, d_lr_end=1e-5, lambda_gan=0.25,
                 r1_gamma=0.01, mix_match=0.25, noise_aug=False, d_betas="0.9,0.999", weight_decay=1e-2,
                 attn_weight_decay=1e-5, ema_start=4000, ema_beta=0.9999, grid_every=1000, ckpt_every=1000),
    "sdxl": dict(steps=30_000, batch=512, batch_per_device=1, lr=1e-4, lr_end=1e-5, d_lr=1e-4, d_lr_end=1e-5, lambda_gan=1.0,
                 r1_gamma=0.0, mix_match=0.25, noise_aug=True, d_betas="0.0,0.99", weight_decay=1e-2,
                 attn_weight_decay=1e-5, ema_start=4000, ema_beta=0.9999, grid_every=1000, ckpt_every=1000),
}
# settings a --resume must not change silently (batch_per_device may: same global batch;
# --steps may, to extend a run)
RESUME_KEYS = ("batch", "loss", "lpips_augment", "lpips_l1", "lr", "lr_end", "d_lr", "d_lr_end", "betas", "d_betas",
               "weight_decay", "attn_weight_decay", "lambda_gan", "z_cond", "multiscale", "r1_gamma", "r1_every",
               "mix_match", "noise_aug", "d_sigma", "d_timestep", "ema_start", "ema_beta", "seed", "pairs_id", "teacher",
               "init", "dtype")
STAGE2["sd15_cfg8"] = dict(STAGE2["sd15"], batch=1024)  # Table A1, SD-CFG-8: 2048 -> 1024


def export_diffusers(cfg, teacher, device):
    """Write the stage-2 EMA student as a standard diffusers U-Net plus an
    LCMScheduler config. One pipeline step at the custom timestep T (the
    student's, Eq. 8) returns the x0 prediction: LCM's boundary terms at T are
    c_skip ~ 3e-9 and c_out ~ 1 - 1e-9, i.e. G(z, c) to float precision.
    (A DDIM config with steps_offset = T would be exact too, but SD1.5's pipeline
    resets steps_offset to 1 when it is built.)"""
    from diffusers import LCMScheduler
    if teacher.family != "ldm":
        C.fail("--export writes a diffusers UNet2DConditionModel: use --preset sd15 or sdxl")
    path = cfg["init"] or os.path.join(cfg["out_dir"], cfg["run_name"], "student_ema.pt")
    ck = C.load_checkpoint(path, "student")
    if ck.get("teacher") != teacher.teacher_id:
        C.fail(f"student '{path}' was distilled from '{ck.get('teacher')}', not from this teacher '{teacher.teacher_id}'")
    G = C.Student(teacher, dict(cfg, cfg_range=ck["config"].get("cfg_range")))
    G.load_state_dict(ck["ema"])
    G.net.save_pretrained(os.path.join(cfg["export"], "unet"))
    LCMScheduler.from_config(teacher.scheduler.config).save_pretrained(os.path.join(cfg["export"], "scheduler"))
    call = dict(num_inference_steps=1, timesteps=[teacher.T], guidance_scale="w" if G.w_cond else 1.0)
    C.atomic_write_json(dict(teacher=cfg["teacher"], student=path, pipeline_call=call), os.path.join(cfg["export"], "export.json"))
    print(f"exported to {cfg['export']}: unet/, scheduler/ (LCMScheduler); call the pipeline with {call}")


def get_config(argv=None):
    """Preset, then this stage's Table A1 row, then the flags given. Returns (cfg, args)."""
    parser = C.add_preset_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), DEFAULTS, STAGE2)
    args = parser.parse_args(argv)
    cfg = C.resolve_config(args)
    if cfg["arch"] not in STAGE2:
        C.fail(f"the paper's {cfg['arch']} setting has no GAN stage (Table A1); use a toy, sd15 or sdxl preset")
    table = STAGE2.get(cfg["preset"]) or STAGE2[cfg["arch"]]  # a user's own preset takes its architecture's table
    cfg.update({k: v for k, v in table.items() if getattr(args, k, None) is None})
    return cfg, args


def main(argv=None):
    cfg, args = get_config(argv)
    rank, _, world, device = C.setup_distributed(cfg["dist_timeout_min"])
    if cfg["export"]:
        return export_diffusers(cfg, C.LDMTeacher(cfg, device, load_vae=False) if cfg["family"] == "ldm" else
                                C.load_teacher(cfg, device), device) if rank == 0 else None
    accum, run_dir, ckpt_path, teacher, data = C.training_setup(cfg, world, device)
    stage1 = importlib.import_module("03_ode_distill")
    bench = cfg["benchmark_steps"] > 0  # sizing mode: G starts from the teacher; no stage-1 checkpoint is read
    s1 = None if bench else C.load_checkpoint(cfg["init"] or os.path.join(cfg["out_dir"], "distill", "student_ema.pt"), "stage-1 student")
    if s1 and s1.get("teacher") != teacher.teacher_id:
        C.fail(f"stage-1 student was distilled from '{s1.get('teacher')}', not from this teacher '{teacher.teacher_id}'")
    cfg["loss"] = args.loss or (s1["config"]["loss"] if s1 else cfg["loss"])
    cfg["lpips_augment"] = args.lpips_augment or (s1["config"]["lpips_augment"] if s1 else cfg["lpips_augment"])
    loss_fn = stage1.build_loss(cfg, teacher, device)
    G = C.Student(teacher, cfg).to(device)
    if s1:
        G.load_state_dict(s1["ema"])
    ema = copy.deepcopy(G).eval().requires_grad_(False)
    D = C.Discriminator(teacher, cfg["z_cond"], cfg["multiscale"], cfg["d_sigma"], cfg["d_timestep"], cfg["noise_aug"]).to(device)
    if cfg["grad_ckpt"]:
        C.enable_grad_ckpt(G.net)
        C.enable_grad_ckpt(D.unet)
    betas = tuple(float(b) for b in cfg["betas"].split(","))
    d_betas = tuple(float(b) for b in cfg["d_betas"].split(","))
    opt_g = C.make_optimizer("adam", C.param_groups(G, cfg["weight_decay"], cfg["attn_weight_decay"]), cfg["lr"], betas)
    opt_d = C.make_optimizer("adam", C.param_groups(D, cfg["weight_decay"], cfg["attn_weight_decay"]), cfg["d_lr"], d_betas)
    step = 0
    if cfg["resume"] and not bench and os.path.isfile(ckpt_path):
        ck = C.load_checkpoint(ckpt_path, "checkpoint")
        C.check_resume(ck["config"], cfg, RESUME_KEYS)
        for obj, key in ((G, "model"), (ema, "ema"), (D, "D"), (opt_g, "opt"), (opt_d, "opt_d")):
            obj.load_state_dict(ck[key])
        step = ck["step"]
        C.print0(f"resumed from '{ckpt_path}' at step {step}")
    C.print0(f"D: {len(D.heads)} readout heads, z_cond={cfg['z_cond']}, multiscale={cfg['multiscale']}, "
             f"R1 gamma={cfg['r1_gamma']} every {cfg['r1_every']}, mix-and-match={cfg['mix_match']}, noise_aug={cfg['noise_aug']}")
    log = C.MetricsLog(None if bench else os.path.join(run_dir, "metrics.jsonl"), step)
    if rank == 0 and not bench:
        C.atomic_write_json(cfg, os.path.join(run_dir, "config.json"))
        w_ho = C.mid_guidance(cfg)
        z_ho, c_ho, x_ho = C.held_out_batch(teacher, cfg, 10 if teacher.family == "edm" else 4, device, w=w_ho)
        G1 = G if step == 0 else copy.deepcopy(G)  # after a resume, G is no longer the stage-1 student
        if step:
            G1.load_state_dict(s1["ema"])
        with torch.no_grad():
            x_s1 = G1(z_ho.to(device), C.student_cond(teacher, c_ho, device), w_ho).float()  # the grid's "stage 1" row
        del G1
    teacher.release_unet()

    def save(step):  # the resumable state, and the EMA student that 05 reads (also from a run stopped early)
        if rank == 0:
            C.atomic_torch_save(dict(model=G.state_dict(), ema=ema.state_dict(), D=D.state_dict(), opt=opt_g.state_dict(),
                                     opt_d=opt_d.state_dict(), step=step, config=cfg), ckpt_path)
            C.atomic_torch_save(dict(ema=ema.state_dict(), config=cfg, teacher=teacher.teacher_id, stage=2, step=step),
                                os.path.join(run_dir, "student_ema.pt"))

    def grid(step):  # rows: teacher | stage 1 | stage 2 (same z)
        if rank == 0:
            with torch.no_grad():
                x_s2 = ema(z_ho.to(device), C.student_cond(teacher, c_ho, device), w_ho).float()
            imgs = torch.cat([teacher.to_images(x_ho.to(device)), teacher.to_images(x_s1), teacher.to_images(x_s2)]).cpu()
            C.save_image_grid(imgs, os.path.join(run_dir, f"grid_{step:06d}.png"), ncol=len(x_ho),
                              scale=max(1, 64 // imgs.shape[-1]))

    end = cfg["steps"] if not cfg["max_steps_this_run"] else min(cfg["steps"], step + cfg["max_steps_this_run"])
    end = cfg["benchmark_steps"] if bench else end
    bar = tqdm(range(step, end), initial=step, total=end if bench else cfg["steps"], desc="stage 2", disable=rank != 0)
    t0, seen, d_wins, timer = time.time(), 0, 0, C.StepTimer(device)
    if bench:
        timer.tick()
    for step in bar:
        lr, d_lr = C.lr_at(step, cfg["steps"], cfg["lr"], cfg["lr_end"]), C.lr_at(step, cfg["steps"], cfg["d_lr"], cfg["d_lr_end"])
        for g in opt_g.param_groups:
            g["lr"] = lr
        for g in opt_d.param_groups:
            g["lr"] = d_lr
        do_r1 = cfg["r1_gamma"] > 0 and step % cfg["r1_every"] == 0
        stats = torch.zeros(6, device=device)  # loss_g, loss_reg, loss_d, logit_real, logit_fake, r1
        mixed = torch.zeros(3, device=device)  # mix-and-match fakes of each kind in this step (all ranks)
        for m, (chunk, idx) in enumerate(C.micro_batches(C.step_indices(cfg["seed"], step, cfg["batch"], len(data)), world, rank, accum)):
            torch.manual_seed(cfg["seed"] * 1_000_003 + step * 4099 + chunk)
            b = data.get(idx)
            z, x_real, w = b["z"].to(device), b["x"].to(device), b.get("w")
            cond = C.student_cond(teacher, b["cond"], device)
            with C.autocast(device, cfg["dtype"]):
                x_fake = G(z, cond, w)
                # D step (Eq. 5): real vs fake, with mix-and-match fakes
                C.requires_grad(D, True)
                xf, zf, cf = x_fake.detach(), z, cond
                plan = C.mix_and_match_plan(cfg["seed"], step, [chunk * len(idx) + k for k in range(len(idx))], idx,
                                            cfg["mix_match"], len(data))
                if plan:  # partners: real pairs drawn from the data set (their own z and c)
                    p = data.get([j for _, _, j in plan])
                    pc = C.student_cond(teacher, p["cond"], device)
                    xf, zf, cf = C.mix_and_match(xf, z, cond, plan, p["x"].to(device), p["z"].to(device), pc)
                    mixed += torch.tensor([sum(kind == k for _, kind, _ in plan) for k in C.MIX_KINDS], device=device)
                lr_real, lr_fake = D(x_real, z, cond), D(xf, zf, cf)
                loss_d = C.gan_loss_d(lr_real, lr_fake)
            (loss_d / accum).backward()
            if do_r1 and m == 0:  # single-sample R1, lazy: scaled by the interval
                stats[5] += C.r1_penalty(D, x_real[:1], z[:1], C.cond_slice(cond, 1), weight=0.5 * cfg["r1_gamma"] * cfg["r1_every"])
            # G step (Eq. 6): regression + non-saturating GAN loss; D frozen
            C.requires_grad(D, False)
            with C.autocast(device, cfg["dtype"]):
                loss_reg = loss_fn(x_fake, x_real).mean()
                loss_g = loss_reg + cfg["lambda_gan"] * C.gan_loss_g(D(x_fake, z, cond))
            (loss_g / accum).backward()
            stats[:5] += torch.stack([loss_g.detach(), loss_reg.detach(), loss_d.detach(), C.d_score(lr_real).mean().detach(),
                                      C.d_score(lr_fake).mean().detach()]) / accum
        stats = C.all_reduce_mean(stats).tolist()
        mixed = (C.all_reduce_mean(mixed) * world).round().int().tolist()
        for name, v in zip(("loss_g", "loss_d", "r1"), (stats[0], stats[2], stats[5])):
            C.finite_or_stop(v, step, ckpt_path, name)
        for model, opt in ((D, opt_d), (G, opt_g)):
            C.sync_grads(model)
            if cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
        C.update_ema(ema, G, 0.0 if step < cfg["ema_start"] else cfg["ema_beta"])
        seen += cfg["batch"]
        if bench:  # the sizing timer synchronises the GPU: not in real runs
            timer.tick()
        d_wins = d_wins + 1 if stats[3] - stats[4] > 8 else 0
        if d_wins == 50:
            C.print0(f"warning: step {step}: D separates real and fake by {stats[3] - stats[4]:.1f} logits for 50 steps "
                     f"(D is overpowering G: consider a larger --r1_gamma or a lower --d_lr)")
        if step % cfg["log_every"] == 0 or do_r1 or step == cfg["steps"] - 1:
            rate = seen / (time.time() - t0)
            log.write(step=step, loss_g=stats[0], loss_reg=stats[1], loss_d=stats[2], logit_real=stats[3], logit_fake=stats[4],
                      r1=stats[5] if do_r1 else None, mixed=dict(zip(C.MIX_KINDS, mixed)), img_s=rate, lr=lr, d_lr=d_lr)
            bar.set_postfix(reg=f"{stats[1]:.4f}", d=f"{stats[2]:.3f}", real=f"{stats[3]:.2f}", fake=f"{stats[4]:.2f}")
        if bench:
            continue
        if (step + 1) % cfg["ckpt_every"] == 0 or step + 1 == end:
            save(step + 1)
        if (step + 1) % cfg["grid_every"] == 0 or step + 1 == cfg["steps"]:
            grid(step + 1)
    if bench:
        timer.report(cfg, world, dict(G=G, D=D), ("preset", "batch_per_device", "dtype", "grad_ckpt", "loss", "lpips_augment",
                                                  "z_cond", "multiscale", "r1_gamma", "r1_every", "mix_match", "noise_aug"))
    elif rank == 0 and end == cfg["steps"]:
        with torch.no_grad():
            x_st = ema(z_ho.to(device), C.student_cond(teacher, c_ho, device), w_ho).float().cpu()
        print(f"held-out fidelity (MSE student vs teacher, same z): stage 1 {(x_s1.cpu() - x_ho).pow(2).mean():.5f}, "
              f"stage 2 {(x_st - x_ho).pow(2).mean():.5f}; wrote {run_dir}/student_ema.pt")
    C.cleanup()


if __name__ == "__main__":
    main()
