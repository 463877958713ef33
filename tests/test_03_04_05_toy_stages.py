"""The five stages chained on a tiny toy run (CPU, seconds per stage):
stage-1 resume exactness, DDP equals one process, NaN guard, bad input, stage 2
components, and 05's outputs."""
import json
import os

import pytest
import torch

import common as C
from conftest import run_script

S1 = ["--batch", 8, "--batch_per_device", 8, "--ckpt_every", 2, "--grid_every", 100, "--log_every", 1]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """Pairs (64) and a small LatentLPIPS, shared by the tests below."""
    out = tmp_path_factory.mktemp("toy")
    run_script("01_make_pairs.py", "--out_dir", out, "--num_pairs", 64, "--shard_size", 32, "--batch_per_device", 32)
    run_script("02_train_latent_lpips.py", "--out_dir", out, "--cls_steps", 20, "--num_triplets", 200, "--cal_steps", 20)
    return out


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_stage1_resume_is_exact(toy_run):
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "straight", "--steps", 6, *S1)
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "resumed", "--steps", 6, "--max_steps_this_run", 3, *S1)
    mid = weights(toy_run / "resumed" / "ckpt_latest.pt")
    # a run stopped early still leaves an EMA student for 04/05, written with the checkpoint
    assert mid["step"] == 3 and weights(toy_run / "resumed" / "student_ema.pt")["step"] == 3
    p = run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "resumed", "--steps", 6, "--resume", *S1,
                   "--lr", 1e-3, "--seed", 1, check=False)  # a changed run is refused, naming the fields
    msg = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "lr: checkpoint (0.0002, 2e-05), now (0.001, 0.001)" in msg and "seed: checkpoint 0, now 1" in msg, msg
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "resumed", "--steps", 6, "--resume", *S1)
    a, b = weights(toy_run / "straight" / "ckpt_latest.pt"), weights(toy_run / "resumed" / "ckpt_latest.pt")
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    la = [json.loads(l) for l in open(toy_run / "straight" / "metrics.jsonl")]
    lb = [json.loads(l) for l in open(toy_run / "resumed" / "metrics.jsonl")]
    assert [l["step"] for l in lb] == list(range(6)) and [l["loss"] for l in la] == [l["loss"] for l in lb]
    assert (toy_run / "straight" / "student_ema.pt").exists() and (toy_run / "straight" / "grid_000006.png").exists()


def test_resume_repairs_a_student_older_than_its_checkpoint(toy_run):
    """A kill between the two writes of a checkpoint (ckpt_latest.pt at step 4, then
    student_ema.pt) leaves the step-2 student beside the step-4 checkpoint. 04 --init and
    05 --students refuse that student; --resume, with no step left to run, says so,
    rewrites the student from the checkpoint and claims no other write."""
    import shutil
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 4, *S1)  # the stage-1 student that 04 starts from
    for script, run in (("03_ode_distill.py", "stale_s1"), ("04_gan_finetune.py", "stale_s2")):
        args = ["--out_dir", toy_run, "--run_name", run, "--steps", 4, "--batch", 8, "--batch_per_device", 8,
                "--ckpt_every", 2, "--grid_every", 100]
        run_script(script, *args, "--max_steps_this_run", 2)
        student, ckpt = toy_run / run / "student_ema.pt", toy_run / run / "ckpt_latest.pt"
        shutil.copy(student, toy_run / run / "step2.pt")
        run_script(script, *args, "--resume")
        shutil.copy(toy_run / run / "step2.pt", student)  # what the kill leaves
        assert weights(student)["step"] == 2 and weights(ckpt)["step"] == 4
        for reader in (["05_evaluate.py", "--out_dir", toy_run, "--students", f"x={student}"],
                       ["04_gan_finetune.py", "--out_dir", toy_run, "--init", student, "--run_name", "unused"]):
            p = run_script(*reader, check=False)
            assert p.returncode != 0 and "rerun that stage with --resume" in p.stderr.strip().splitlines()[-1], p.stderr
        p = run_script(script, *args, "--resume")
        assert "already complete at step 4" in p.stdout and "rewrote" in p.stdout and "; wrote" not in p.stdout, p.stdout
        s, ck = weights(student), weights(ckpt)
        assert s["step"] == 4 and s.keys() == set(C.STUDENT_KEYS) and all(torch.equal(s["ema"][k], ck["ema"][k]) for k in ck["ema"])


def test_ema_equals_g_before_ema_start_then_follows_it(toy_run):
    """The EMA is G itself for steps before --ema_start, then ema = beta ema + (1 - beta) G
    at every later step (checked across a stop, where both are on disk)."""
    args = ["--out_dir", toy_run, "--run_name", "ema", "--steps", 3, "--ema_start", 2, "--ema_beta", 0.5, "--lr", 1e-2, *S1]
    run_script("03_ode_distill.py", *args, "--max_steps_this_run", 2)
    two = weights(toy_run / "ema" / "ckpt_latest.pt")
    assert two["step"] == 2 and all(torch.equal(two["ema"][k], two["model"][k]) for k in two["model"])
    run_script("03_ode_distill.py", *args, "--resume")
    three = weights(toy_run / "ema" / "ckpt_latest.pt")
    for k, v in three["model"].items():
        if v.is_floating_point() and not torch.equal(v, two["model"][k]):  # a trained weight (buffers are copied)
            assert torch.allclose(three["ema"][k], 0.5 * two["ema"][k] + 0.5 * v, atol=1e-7), k
            assert not torch.allclose(three["ema"][k], v), k


def test_stage2_starts_from_the_stage1_ema_and_its_fakes_enter_d_detached(toy_run):
    """04's G starts as the stage-1 EMA (not the raw stage-1 weights); with lambda_GAN = 0
    its step-0 gradient is the regression loss's alone, recomputed here from the same pairs
    and augmentation draw: D's loss on the (detached) fakes adds nothing to it."""
    import importlib
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "wire1", "--steps", 4, "--ema_start", 0,
               "--ema_beta", 0.5, *S1)
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


def test_stage2_d_learns_from_loss_d_and_the_weighted_r1_only(toy_run):
    """04's step-0 gradient of D, recomputed: Eq. 5 on real and (detached) fake pairs plus
    gamma/2 x interval x R1 on one real sample, and nothing from G's loss (D is frozen for it)."""
    import importlib
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "wire1", "--steps", 4, "--ema_start", 0,
               "--ema_beta", 0.5, *S1)
    args = ["--out_dir", str(toy_run), "--init", str(toy_run / "wire1" / "student_ema.pt"), "--run_name", "wire3", "--steps", "1",
            "--batch", "8", "--batch_per_device", "8", "--lambda_gan", "1", "--r1_gamma", "0.5", "--r1_every", "3",
            "--mix_match", "0", "--log_every", "1", "--grid_every", "100", "--ckpt_every", "1"]
    run_script("04_gan_finetune.py", *args)
    logged = json.loads(open(toy_run / "wire3" / "metrics.jsonl").readline())["grad_norm_d"]
    S4, cpu = importlib.import_module("04_gan_finetune"), torch.device("cpu")
    cfg, _ = S4.get_config(args)
    _, _, _, teacher, data = C.training_setup(cfg, 1, cpu)  # seeds torch as 04 does: D's heads come out the same
    s1 = weights(toy_run / "wire1" / "student_ema.pt")
    cfg.update({k: s1["config"][k] for k in S4.LOSS_KEYS})
    C.build_loss(cfg, teacher, cpu)
    G = C.Student(teacher, cfg)
    G.load_state_dict(s1["ema"])
    D = S4.Discriminator(teacher, cfg["z_cond"], cfg["multiscale"], cfg["d_t"], cfg["noise_aug"])
    (chunk, idx), = C.micro_batches(C.step_indices(cfg["seed"], 0, 8, len(data)), 1, 0, 1)
    b = data.get(idx)
    with torch.no_grad():
        fake = G(b["z"], b["cond"])
    S4.gan_loss_d(D(b["x"], b["z"], b["cond"]), D(fake, b["z"], b["cond"])).backward()
    S4.r1_penalty(D, b["x"][:1], b["z"][:1], b["cond"][:1], weight=0.5 * 0.5 * 3)
    assert logged == pytest.approx(C.grad_norm(D), rel=1e-4)


def close_weights(a, b, parts, tol):
    """Two checkpoints' state dicts agree key by key, to `tol` of each tensor's scale."""
    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            if a[part][k].is_floating_point():
                err = (a[part][k] - b[part][k]).abs().max().item() / max(a[part][k].abs().max().item(), 1e-3)
                assert err < tol, (part, k, err)


def test_stage1_ddp_equals_one_process_in_gradient_scale(toy_run):
    """Same global batch (8): 1 process x 4 accumulation steps vs 2 processes x 2 (DDP).
    Adam's update hides the scale of the gradient, so the logged gradient norm is
    compared too: a missing `/ accum` (or a DDP that summed) makes the runs differ."""
    args = ["--out_dir", toy_run, "--steps", 2, "--batch", 8, "--batch_per_device", 2, "--log_every", 1, "--ckpt_every", 100,
            "--grid_every", 100]
    run_script("03_ode_distill.py", *args, "--run_name", "scale_one")
    run_script("03_ode_distill.py", *args, "--run_name", "scale_two", torchrun=2)
    logs = {r: [json.loads(l) for l in open(toy_run / r / "metrics.jsonl")] for r in ("scale_one", "scale_two")}
    print({r: [(l["loss"], l["grad_norm"]) for l in v] for r, v in logs.items()})
    for key in ("loss", "grad_norm"):
        assert max(abs(a[key] - b[key]) / abs(a[key]) for a, b in zip(*logs.values())) < 1e-4, key
    close_weights(weights(toy_run / "scale_one" / "ckpt_latest.pt"), weights(toy_run / "scale_two" / "ckpt_latest.pt"),
                  ("model", "ema"), 1e-4)


@pytest.mark.slow  # 30 s; the stage-2 test below runs the same FSDP helpers (and DDP), with a resume
def test_stage1_ddp_and_fsdp_equal_single_process(toy_run):
    """Same global batch (8): 1 process x 4 accumulation steps vs 2 processes x 2, under
    DDP and under FSDP2; the FSDP checkpoint is the same full state dict."""
    args = ["--out_dir", toy_run, "--steps", 4, "--batch", 8, "--batch_per_device", 2, "--log_every", 1, "--ckpt_every", 100,
            "--grid_every", 100]
    run_script("03_ode_distill.py", *args, "--run_name", "one")
    run_script("03_ode_distill.py", *args, "--run_name", "two", torchrun=2)
    # a grid every step: the EMA's no-grad forward leaves FSDP's root unit gathered, and the EMA update must still
    # work (an FSDP stop and resume: the stage-2 test)
    p = run_script("03_ode_distill.py", *args, "--run_name", "fsdp", "--fsdp", "--grid_every", 1, torchrun=2)
    assert "FSDP2: Student in 23 units, sharded over 2 processes" in p.stdout
    loss = {r: [json.loads(l)["loss"] for l in open(toy_run / r / "metrics.jsonl")] for r in ("one", "two", "fsdp")}
    print(loss)
    for r in ("two", "fsdp"):
        assert len(loss[r]) == 4 and max(abs(x - y) / abs(x) for x, y in zip(loss["one"], loss[r])) < 1e-4, r
    ck = {r: weights(toy_run / r / "ckpt_latest.pt") for r in ("one", "two", "fsdp")}
    close_weights(ck["one"], ck["two"], ("model", "ema"), 1e-4)
    close_weights(ck["two"], ck["fsdp"], ("model", "ema"), 1e-4)
    assert ck["fsdp"]["opt"]["state"].keys() == ck["two"]["opt"]["state"].keys()  # resumable under either


def test_stage1_nan_guard_keeps_last_checkpoint(toy_run):
    p = run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "nan", "--steps", 20, "--loss", "mse",
                   "--lr", 1e30, "--ckpt_every", 1, "--batch", 8, "--batch_per_device", 8, check=False)
    assert p.returncode != 0
    msg = p.stderr.strip().splitlines()[-1]
    assert "loss became" in msg and "at step" in msg and "last good checkpoint" in msg
    step = int(msg.split("at step ")[1].split(";")[0])
    assert weights(toy_run / "nan" / "ckpt_latest.pt")["step"] == step


def test_stage1_bad_input(toy_run, tmp_path):
    def fails(*args):
        p = run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 2, *args, check=False)
        assert p.returncode != 0
        return p.stderr.strip().splitlines()[-1]
    assert "not divisible" in fails("--batch", 10, "--batch_per_device", 4)
    assert "LatentLPIPS checkpoint not found" in fails("--lpips_ckpt", tmp_path / "missing.pt", *S1)
    m = json.load(open(toy_run / "pairs" / "manifest.json"))
    other = tmp_path / "pairs"
    other.mkdir()
    for f in os.listdir(toy_run / "pairs"):
        if f.endswith(".safetensors"):
            os.symlink(toy_run / "pairs" / f, other / f)
    json.dump(dict(m, teacher="someone_else.safetensors:sha256=0"), open(other / "manifest.json", "w"))
    msg = fails("--pairs", other, *S1)
    assert "different setup" in msg and "teacher: found 'someone_else" in msg


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
    assert fid(straight) == fid(resumed).replace("gan_resumed", "gan_straight")
    a, b = weights(toy_run / "gan_straight" / "ckpt_latest.pt"), weights(toy_run / "gan_resumed" / "ckpt_latest.pt")
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema", "D"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    la = [json.loads(l) for l in open(toy_run / "gan_straight" / "metrics.jsonl")]
    lb = [json.loads(l) for l in open(toy_run / "gan_resumed" / "metrics.jsonl")]
    assert [(l["loss_d"], l["r1"]) for l in la] == [(l["loss_d"], l["r1"]) for l in lb] and len(la) == 4


STAGE2_ARGS = ["--steps", 4, "--batch", 8, "--batch_per_device", 2, "--log_every", 1, "--ckpt_every", 100, "--grid_every", 100]


def _close_runs(toy_run, a, b, steps, keys=()):
    """Two stage-2 runs log the same losses and end with the same G, EMA and D (relative 1e-3)."""
    logs = {r: [json.loads(l) for l in open(toy_run / r / "metrics.jsonl")] for r in (a, b)}
    print({r: [(l["loss_d"], l["r1"]) for l in v] for r, v in logs.items()})
    assert len(logs[a]) == len(logs[b]) == steps, b
    for key in ("loss_d", "loss_g", "logit_real", "logit_fake", "grad_norm_d", "grad_norm_g", *keys):
        assert max(abs(x[key] - y[key]) / max(abs(x[key]), 1e-3) for x, y in zip(logs[a], logs[b])) < 1e-3, (b, key)
    close_weights(weights(toy_run / a / "ckpt_latest.pt"), weights(toy_run / b / "ckpt_latest.pt"), ("model", "ema", "D"), 1e-3)
    return logs


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
    _close_runs(toy_run, "gan_one", "gan_two", 4)


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
    logs = _close_runs(toy_run, "gan_two_r1", "gan_fsdp_r1", 2, ("r1",))
    assert all(l["r1"] > 0 for l in logs["gan_two_r1"])
    p = run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 4, "--run_name", "no_torchrun", "--fsdp", check=False)
    assert p.returncode != 0 and "launch with torchrun" in p.stderr.strip().splitlines()[-1]


def test_stage2_and_eval(toy_run):
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 4, *S1)
    p = run_script("04_gan_finetune.py", "--out_dir", toy_run, "--steps", 10, "--batch", 8, "--batch_per_device", 8,
                   "--r1_every", 4, "--log_every", 1000, "--grid_every", 1000, "--ckpt_every", 5)
    assert "D: 9 readout heads" in p.stdout
    log = [json.loads(l) for l in open(toy_run / "gan" / "metrics.jsonl")]
    r1_steps = [l["step"] for l in log if l["r1"] is not None]
    assert r1_steps == [0, 4, 8] and all(l["r1"] > 0 for l in log if l["r1"] is not None)
    assert all(torch.isfinite(torch.tensor([l["loss_g"], l["loss_d"], l["logit_real"], l["logit_fake"]])).all() for l in log)
    ck = weights(toy_run / "gan" / "ckpt_latest.pt")
    assert ck["step"] == 10 and {"model", "ema", "D", "opt", "opt_d"} <= set(ck)
    assert (toy_run / "gan" / "student_ema.pt").exists() and (toy_run / "gan" / "grid_000010.png").exists()
    # resume continues from the checkpoint
    p = run_script("04_gan_finetune.py", "--out_dir", toy_run, "--steps", 12, "--batch", 8, "--batch_per_device", 8,
                   "--r1_every", 4, "--resume", "--ckpt_every", 100)
    assert "resumed" in p.stdout and "at step 10" in p.stdout
    # 05 on all stages, with an evaluation classifier of 2 steps (what it scores is not checked here)
    import importlib
    importlib.import_module("05_evaluate").train_toy_classifier(str(toy_run / "clf2.pt"), steps=2, log=lambda *a: None)
    s2 = toy_run / "gan" / "student_ema.pt"
    p = run_script("05_evaluate.py", "--out_dir", toy_run, "--num_samples", 60, "--batch_per_device", 30, "--classifier",
                   toy_run / "clf2.pt", "--diversity_seeds", 4, "--students", f"s2 twice={s2};{s2}")
    m = json.load(open(toy_run / "eval" / "metrics.json"))
    g = json.load(open(toy_run / "eval" / "groups.json"))["s2 twice"]  # one row over 2 checkpoints: mean ± std
    assert m["s2 twice #1"]["fid_toy"] == m["s2 twice #2"]["fid_toy"] and g["fid_toy"]["n"] == 2
    assert g["fid_toy"]["mean"] == pytest.approx(m["stage 2"]["fid_toy"], rel=1e-9) and g["fid_toy"]["std"] < 1e-9
    assert "mean ± std" in p.stdout
    assert {"teacher", "stage 1", "stage 2", "real data"} <= set(m)
    assert m["teacher"]["nfe"] == 35 and m["stage 2"]["nfe"] == 1
    assert m["teacher"]["fidelity_mse"] == 0 and m["stage 1"]["fidelity_mse"] > 0
    assert abs(m["teacher"]["fidelity_feat"]) < 1e-5 and m["stage 1"]["fidelity_feat"] > 1e-4
    for f in ("results.md", "compare.png", "diversity.png"):
        assert (toy_run / "eval" / f).exists()
    assert "| teacher |" in p.stdout


def test_stage2_nan_guard(toy_run):
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 2, *S1)
    p = run_script("04_gan_finetune.py", "--out_dir", toy_run, "--run_name", "gan_nan", "--steps", 20, "--batch", 8,
                   "--batch_per_device", 8, "--lr", 1e30, "--d_lr", 1e30,
                   "--ckpt_every", 1, check=False)
    assert p.returncode != 0
    msg = p.stderr.strip().splitlines()[-1]
    assert "became" in msg and "at step" in msg and "last good checkpoint" in msg, msg


def test_stage1_pixel_lpips_and_guidance_student(toy_run, tmp_path, monkeypatch):
    """--loss lpips (offline: random-weight pixel VGG) trains; a toy student with a
    w input starts exactly as the teacher's one-step map for every w."""
    monkeypatch.setattr(C, "load_pixel_lpips", lambda device: C.LatentLPIPS(3, 1.0, 1).to(device))
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "lpips_px", "--steps", 2, "--loss", "lpips", *S1)
    assert (toy_run / "lpips_px" / "student_ema.pt").exists()
    cfg = dict(C.get_preset("toy"), preset="toy", cfg_range="1,3")
    teacher = C.EDMTeacher(cfg, torch.device("cpu"))
    G, base = C.Student(teacher, cfg).eval(), C.Student(teacher, dict(cfg, cfg_range=None)).eval()
    z, c = teacher.noise_and_condition(range(4))
    with torch.no_grad():
        for w in (1.0, 2.0, torch.tensor([1.0, 1.5, 2.5, 3.0])):
            assert torch.equal(G(z, c, w), base(z, c))


def test_05_takes_the_teachers_guidance_from_the_students(tmp_path):
    """A student distilled at w = 2 is compared with the teacher at w = 2
    (70 NFE), not at the preset's w = 1; a contradicting --guidance is refused."""
    import importlib
    ev = importlib.import_module("05_evaluate")
    cfg = dict(C.get_preset("toy"), preset="toy", out_dir=str(tmp_path), guidance_flag=None, cfg_range=None)
    teacher = C.EDMTeacher(cfg, torch.device("cpu"))
    G = C.Student(teacher, cfg)
    path = tmp_path / "w2.pt"
    torch.save(dict(ema=G.state_dict(), config=dict(cfg, guidance=2.0), teacher=teacher.teacher_id, stage=1, step=0), path)
    cfg1 = dict(cfg, students=f"w2={path}")
    models, nfe = ev.model_table(cfg1, C.EDMTeacher(cfg1, torch.device("cpu")), torch.device("cpu"), ev.validate(dict(cfg1, classifier_seed=0, classifier=None))[0])
    assert cfg1["guidance"] == 2.0 and nfe["teacher"] == 70 and nfe["w2"] == 1
    cfg2 = dict(cfg, students=f"w2={path}", guidance_flag=1.5)
    with pytest.raises(SystemExit, match="--guidance 1.5 contradicts .*guidance 2.0"):
        ev.model_table(cfg2, C.EDMTeacher(cfg2, torch.device("cpu")), torch.device("cpu"), ev.validate(dict(cfg2, classifier_seed=0, classifier=None))[0])
    torch.save(dict(ema=G.state_dict(), config=dict(cfg, guidance=3.0), teacher=teacher.teacher_id, stage=1, step=0), tmp_path / "w3.pt")
    cfg3 = dict(cfg, students=f"w2={path},w3={tmp_path / 'w3.pt'}")
    with pytest.raises(SystemExit, match="different guidance scales"):
        ev.model_table(cfg3, C.EDMTeacher(cfg3, torch.device("cpu")), torch.device("cpu"), ev.validate(dict(cfg3, classifier_seed=0, classifier=None))[0])
