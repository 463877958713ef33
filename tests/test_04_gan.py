"""Stage 2 (04) on the shared tiny toy run: G starts from the stage-1 EMA, G's and D's
gradients recomputed, exact and seeded resume, DDP and FSDP2 (with R1) against each
other and one process, the NaN guard."""
import json

import pytest
import torch

import common as C
from conftest import S1, STAGE2_ARGS, close_runs, run_script, weights


def stage1_with_an_ema(toy_run):
    """A 4-step stage-1 run whose EMA (beta 0.5 from step 0) differs from its raw weights (made once)."""
    if not (toy_run / "wire1" / "student_ema.pt").exists():
        run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "wire1", "--steps", 4, "--ema_start", 0,
                   "--ema_beta", 0.5, *S1)


def test_stage2_starts_from_the_stage1_ema_and_its_fakes_enter_d_detached(toy_run):
    """04's G starts as the stage-1 EMA (not the raw stage-1 weights); with lambda_GAN = 0
    its step-0 gradient is the regression loss's alone, recomputed here from the same pairs
    and augmentation draw: D's loss on the (detached) fakes adds nothing to it."""
    import importlib
    stage1_with_an_ema(toy_run)
    s1, raw = weights(toy_run / "wire1" / "student_ema.pt"), weights(toy_run / "wire1" / "ckpt_latest.pt")["model"]
    args = ["--out_dir", str(toy_run), "--init", str(toy_run / "wire1" / "student_ema.pt"), "--run_name", "wire2", "--steps", "1",
            "--batch", "8", "--batch_per_device", "8", "--lambda_gan", "0", "--r1_gamma", "0", "--mix_match", "0", "--lr", "1e-30",
            "--log_every", "1", "--grid_every", "100", "--ckpt_every", "1"]
    run_script("04_gan_finetune.py", *args)
    g = weights(toy_run / "wire2" / "ckpt_latest.pt")["model"]  # after one step at lr 1e-30: G as it started
    assert all(torch.allclose(g[k], v, atol=1e-20) for k, v in s1["ema"].items())
    assert not all(torch.allclose(raw[k], v) for k, v in s1["ema"].items())
    logged = json.loads(open(toy_run / "wire2" / "metrics.jsonl").readline())["grad_norm_g"]
    S4 = importlib.import_module("04_gan_finetune")
    cfg, _ = S4.get_config(args)
    _, _, _, teacher, data = C.training_setup(cfg, 1, torch.device("cpu"))
    cfg.update(loss=s1["config"]["loss"], lpips_augment=s1["config"]["lpips_augment"])
    G = C.Student(teacher, cfg)
    G.load_state_dict(s1["ema"])
    loss_fn = C.build_loss(cfg, teacher, torch.device("cpu"))
    (chunk, idx), = C.micro_batches(C.step_indices(cfg["seed"], 0, 8, len(data)), 1, 0, 1)
    torch.manual_seed(cfg["seed"] * 1_000_003 + chunk)  # 04's augmentation RNG for step 0, chunk 0
    b = data.get(idx)
    loss_fn(G(b["z"], b["cond"]), b["x"]).mean().backward()
    assert logged == pytest.approx(C.grad_norm(G), rel=1e-5)

def one_step(toy_run, run_name, *flags):
    """04 for one step from the stage-1 EMA at batch 8 (no mix-and-match), then the same step
    rebuilt here: its logged metrics, its config, the stage-1 student, the regression loss, D
    as 04 built it, and step 0's batch with its micro-batch index."""
    import importlib
    stage1_with_an_ema(toy_run)
    args = ["--out_dir", str(toy_run), "--init", str(toy_run / "wire1" / "student_ema.pt"), "--run_name", run_name, "--steps", "1",
            "--batch", "8", "--batch_per_device", "8", "--mix_match", "0", "--log_every", "1", "--grid_every", "100",
            "--ckpt_every", "1", *flags]
    run_script("04_gan_finetune.py", *args)
    logged = json.loads(open(toy_run / run_name / "metrics.jsonl").readline())
    S4, cpu = importlib.import_module("04_gan_finetune"), torch.device("cpu")
    cfg, _ = S4.get_config(args)
    _, _, _, teacher, data = C.training_setup(cfg, 1, cpu)  # seeds torch as 04 does: D's heads come out the same
    s1 = weights(toy_run / "wire1" / "student_ema.pt")
    cfg.update({k: s1["config"][k] for k in S4.LOSS_KEYS})
    loss_fn = C.build_loss(cfg, teacher, cpu)
    D = S4.Discriminator(teacher, cfg["z_cond"], cfg["multiscale"], cfg["d_t"], cfg["noise_aug"])
    (chunk, idx), = C.micro_batches(C.step_indices(cfg["seed"], 0, 8, len(data)), 1, 0, 1)
    G = C.Student(teacher, cfg)
    G.load_state_dict(s1["ema"])
    return logged, S4, cfg, G, loss_fn, D, data.get(idx), chunk


def test_stage2_d_learns_from_loss_d_and_the_weighted_r1_only(toy_run):
    """04's step-0 gradient of D, recomputed: Eq. 5 on real and (detached) fake pairs plus
    gamma/2 x interval x R1 on one real sample, and nothing from G's loss (D is frozen for it)."""
    logged, S4, cfg, G, _, D, b, _ = one_step(toy_run, "wire3", "--lambda_gan", "1", "--r1_gamma", "0.5", "--r1_every", "3")
    with torch.no_grad():
        fake = G(b["z"], b["cond"])
    S4.gan_loss_d(D(b["x"], b["z"], b["cond"]), D(fake, b["z"], b["cond"])).backward()
    S4.r1_penalty(D, b["x"][:1], b["z"][:1], b["cond"][:1], weight=0.5 * 0.5 * 3)
    assert logged["grad_norm_d"] == pytest.approx(C.grad_norm(D), rel=1e-4)


def test_stage2_g_is_scored_by_the_updated_d(toy_run):
    """Alternating updates (StyleGAN2, GigaGAN): D steps first, then G's step-0 gradient is
    Eq. 6 through the D of after that step (ckpt_latest.pt's D after one step), recomputed
    here from the same pairs and augmentation draw; through the D of before it differs."""
    logged, S4, cfg, G, loss_fn, D, b, chunk = one_step(toy_run, "wire4", "--lambda_gan", "1", "--r1_gamma", "0", "--lr", "1e-30",
                                                        "--d_lr", "1e-2")
    D.requires_grad_(False)
    start = {k: v.clone() for k, v in G.state_dict().items()}

    def g_grad_norm():
        G.load_state_dict(start)
        G.zero_grad(set_to_none=True)
        torch.manual_seed(cfg["seed"] * 1_000_003 + chunk)  # 04's G-update RNG for step 0, chunk 0
        fake = G(b["z"], b["cond"])
        (loss_fn(fake, b["x"]).mean() + S4.gan_loss_g(D(fake, b["z"], b["cond"]))).backward()
        return C.grad_norm(G)
    before = g_grad_norm()
    D.load_state_dict(weights(toy_run / "wire4" / "ckpt_latest.pt")["D"])
    assert logged["grad_norm_g"] == pytest.approx(g_grad_norm(), rel=1e-5) and logged["grad_norm_g"] != pytest.approx(before, rel=1e-3)


def test_stage2_resume_is_exact_and_seeded(toy_run):
    """4 straight steps == 2 steps + kill + resume to 4 (G, EMA and D, which has
    randomly initialised readout heads: --seed must fix them)."""
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 4, *S1)
    args = ["--out_dir", toy_run, "--steps", 4, "--batch", 8, "--batch_per_device", 8, "--r1_every", 2, "--ckpt_every", 100,
            "--grid_every", 100, "--log_every", 1]
    straight = run_script("04_gan_finetune.py", *args, "--run_name", "gan_straight").stdout
    run_script("04_gan_finetune.py", *args, "--run_name", "gan_resumed", "--max_steps_this_run", 2)
    assert weights(toy_run / "gan_resumed" / "student_ema.pt")["step"] == 2  # written with the checkpoint
    p = run_script("04_gan_finetune.py", *args, "--run_name", "gan_resumed", "--resume", "--mix_match", 0.5, check=False)
    assert p.returncode != 0 and "mix_match: checkpoint 0.25, now 0.5" in p.stderr
    resumed = run_script("04_gan_finetune.py", *args, "--run_name", "gan_resumed", "--resume").stdout
    # the grid's and the fidelity line's "stage 1" is the stage-1 student, also after a resume
    fid = lambda out: next(l for l in out.splitlines() if l.startswith("held-out fidelity"))
    assert fid(straight) == fid(resumed).replace("gan_resumed", "gan_straight") and " ± " in fid(straight)
    a, b = weights(toy_run / "gan_straight" / "ckpt_latest.pt"), weights(toy_run / "gan_resumed" / "ckpt_latest.pt")
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema", "D"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    la = [json.loads(l) for l in open(toy_run / "gan_straight" / "metrics.jsonl")]
    lb = [json.loads(l) for l in open(toy_run / "gan_resumed" / "metrics.jsonl")]
    assert [(l["loss_d"], l["r1"]) for l in la] == [(l["loss_d"], l["r1"]) for l in lb] and len(la) == 4

@pytest.mark.slow  # ~20 s; the FSDP test below compares against the same DDP path (with R1)
def test_stage2_ddp_equals_single_process(toy_run):
    """Same global batch (8): 1 process x 2 accumulation steps vs 2 processes x 2, with
    D's gradients all-reduced by hand (DDP), so both ranks must also start from the
    same D (its readout heads are random). R1 takes one real sample per device, so
    this comparison runs without it."""
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 4, *S1)
    args = ["--out_dir", toy_run, *STAGE2_ARGS, "--r1_gamma", 0]
    run_script("04_gan_finetune.py", *args, "--run_name", "gan_one")
    run_script("04_gan_finetune.py", *args, "--run_name", "gan_two", torchrun=2)
    close_runs(toy_run, "gan_one", "gan_two", 4)

def test_stage2_fsdp_equals_ddp_with_r1(toy_run):
    """FSDP2 against DDP (2 processes each, batch 8 as 2 x 2 accumulation),
    both with R1 every step: FSDP keeps D gathered through R1's double backward. The
    FSDP run has gradient checkpointing and a grid every step, and stops after 1 step
    and resumes (G's no-grad forward for the grid's "stage 1" row comes before the resume)."""
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 4, *S1)
    r1 = ["--out_dir", toy_run, *STAGE2_ARGS, "--r1_gamma", 0.01, "--r1_every", 1, "--steps", 2]
    run_script("04_gan_finetune.py", *r1, "--run_name", "gan_two_r1", torchrun=2)
    fsdp = [*r1, "--run_name", "gan_fsdp_r1", "--fsdp", "--grad_ckpt", "--grid_every", 1]
    p = run_script("04_gan_finetune.py", *fsdp, "--max_steps_this_run", 1, torchrun=2)
    assert "FSDP2: Discriminator in 23 units, sharded over 2 processes" in p.stdout
    p = run_script("04_gan_finetune.py", *fsdp, "--resume", torchrun=2)
    assert "resumed from" in p.stdout and "at step 1" in p.stdout
    logs = close_runs(toy_run, "gan_two_r1", "gan_fsdp_r1", 2, ("r1",))
    assert all(l["r1"] > 0 for l in logs["gan_two_r1"])
    p = run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 4, "--run_name", "no_torchrun", "--fsdp", check=False)
    assert p.returncode != 0 and "launch with torchrun" in p.stderr.strip().splitlines()[-1]

def test_stage2_nan_guard(toy_run):
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 2, *S1)
    p = run_script("04_gan_finetune.py", "--out_dir", toy_run, "--run_name", "gan_nan", "--steps", 20, "--batch", 8,
                   "--batch_per_device", 8, "--lr", 1e30,
                   "--ckpt_every", 1, check=False)
    assert p.returncode != 0
    msg = p.stderr.strip().splitlines()[-1]
    assert "became" in msg and "at step" in msg and "last good checkpoint" in msg, msg


def test_an_unfinished_or_wrong_stage_init_is_refused_unless_told(toy_run):
    """--init is 03's finished student: one stopped by --max_steps_this_run (step 2 of 8)
    stops 04 before any work, naming the step, unless --partial_init; a stage-2 student
    is refused whatever the flags."""
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "half1", "--steps", 8, "--max_steps_this_run", 2, *S1)
    half = toy_run / "half1" / "student_ema.pt"
    assert weights(half)["step"] == 2
    args = ["--out_dir", toy_run, "--run_name", "from_half", *STAGE2_ARGS[2:], "--steps", 1]
    p = run_script("04_gan_finetune.py", *args, "--init", half, check=False)
    assert p.returncode != 0 and "stopped at step 2 of its --steps 8" in p.stderr and "--partial_init" in p.stderr, p.stderr
    assert not (toy_run / "from_half").exists()
    run_script("04_gan_finetune.py", *args, "--init", half, "--partial_init")
    p = run_script("04_gan_finetune.py", *args, "--run_name", "from_s2", "--init", toy_run / "from_half" / "student_ema.pt",
                   check=False)
    assert p.returncode != 0 and "stage-2 student" in p.stderr, p.stderr
