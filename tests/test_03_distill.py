"""Stage 1 (03) on the shared tiny toy run: exact resume, a student older than its
checkpoint repaired, ema_start, DDP / FSDP against one process (in the gradient's
scale too), the NaN guard, bad input, pixel LPIPS and the guidance-conditioned student."""
import json
import os

import pytest
import torch

import common as C
from conftest import S1, close_weights, run_script, weights


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

def test_a_checkpoint_writes_the_student_first(tmp_path, monkeypatch):
    """A kill between save_training_state's two writes leaves student_ema.pt new and
    ckpt_latest.pt old, never the reverse: the student a reader finds is always one of the run."""
    written, atomic = [], C.atomic

    def killed_after_one_write(path, write):
        if written:
            raise KeyboardInterrupt("the kill")
        written.append(os.path.basename(path))
        return atomic(path, write)
    monkeypatch.setattr(C, "atomic", killed_after_one_write)
    with pytest.raises(KeyboardInterrupt):
        C.save_training_state(dict(model={}, ema={"w": torch.ones(1)}, opt={}, config={}, teacher="t", stage=1, step=4), str(tmp_path))
    assert written == ["student_ema.pt"] and not (tmp_path / "ckpt_latest.pt").exists()


def test_a_student_ahead_of_its_checkpoint_is_read_and_a_resume_rewrites_it_the_same(toy_run):
    """What that kill leaves (the step-4 student beside the step-2 checkpoint) is a student
    of the run: 04 and 05 read it, and --resume replays steps 2-4 to the same student."""
    import shutil
    run = toy_run / "ahead"
    args = ["--out_dir", toy_run, "--run_name", "ahead", "--steps", 4, *S1]
    run_script("03_ode_distill.py", *args, "--max_steps_this_run", 2)
    shutil.copy(run / "ckpt_latest.pt", run / "step2.pt")
    run_script("03_ode_distill.py", *args, "--resume")
    four = weights(run / "student_ema.pt")
    shutil.copy(run / "step2.pt", run / "ckpt_latest.pt")  # what the kill leaves
    assert C.load_student_file(str(run / "student_ema.pt"), "student")["step"] == 4
    p = run_script("03_ode_distill.py", *args, "--resume")
    assert "resumed from" in p.stdout and "at step 2" in p.stdout, p.stdout
    again, ck = weights(run / "student_ema.pt"), weights(run / "ckpt_latest.pt")
    assert again["step"] == ck["step"] == 4 and again.keys() == set(C.STUDENT_KEYS)
    assert all(torch.equal(again["ema"][k], four["ema"][k]) and torch.equal(ck["ema"][k], four["ema"][k]) for k in four["ema"])


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

def test_first_pairs_trains_on_the_pairs_a_smaller_run_makes(toy_run, tmp_path):
    """Table 6 varies the pair count: --first_pairs 32 of the 64 shared pairs trains
    exactly as on a folder that 01 made with --num_pairs 32 (pair i has seed i)."""
    run_script("01_make_pairs.py", "--out_dir", tmp_path, "--num_pairs", 32, "--shard_size", 32, "--batch_per_device", 32)
    lp = ["--lpips_ckpt", toy_run / "lpips" / "latent_lpips.pt", "--steps", 2, *S1]
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "first32", "--first_pairs", 32, *lp)
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "only32", "--pairs", tmp_path / "pairs", *lp)
    a, b = weights(toy_run / "first32" / "student_ema.pt"), weights(toy_run / "only32" / "student_ema.pt")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_stage1_bad_input(toy_run, tmp_path):
    def fails(*args):
        p = run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 2, *args, check=False)
        assert p.returncode != 0
        return p.stderr.strip().splitlines()[-1]
    assert "not divisible" in fails("--batch", 10, "--batch_per_device", 4)
    msg = fails("--lpips_ckpt", tmp_path / "missing.pt", *S1)
    assert "LatentLPIPS checkpoint" in msg and "missing.pt" in msg and "not found" in msg, msg
    assert "--first_pairs 65, but" in fails("--first_pairs", 65, *S1)
    m = json.load(open(toy_run / "pairs" / "manifest.json"))
    other = tmp_path / "pairs"
    other.mkdir()
    for f in os.listdir(toy_run / "pairs"):
        if f.endswith(".safetensors"):
            os.symlink(toy_run / "pairs" / f, other / f)
    json.dump(dict(m, teacher="someone_else.safetensors:sha256=0"), open(other / "manifest.json", "w"))
    msg = fails("--pairs", other, *S1)
    assert "different setup" in msg and "teacher: found 'someone_else" in msg

def test_stage1_pixel_lpips_and_guidance_student(toy_run, tmp_path, monkeypatch):
    """--loss lpips (offline: random-weight pixel VGG) trains; a toy student with a
    w input starts exactly as the teacher's one-step map for every w."""
    monkeypatch.setattr(C, "load_pixel_lpips", lambda device: C.LatentLPIPS(3, 1.0, 1).to(device))
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "lpips_px", "--steps", 2, "--loss", "lpips", *S1)
    assert (toy_run / "lpips_px" / "student_ema.pt").exists()
    cfg = dict(C.get_preset("toy"), preset="toy", cfg_range=(1.0, 3.0))
    teacher = C.EDMTeacher(cfg, torch.device("cpu"))
    G, base = C.Student(teacher, cfg).eval(), C.Student(teacher, dict(cfg, cfg_range=None)).eval()
    z, c = teacher.noise_and_condition(range(4))
    with torch.no_grad():
        for w in (1.0, 2.0, torch.tensor([1.0, 1.5, 2.5, 3.0])):
            assert torch.equal(G(z, c, w), base(z, c))


def test_cifar10_on_the_official_network_format_in_bf16(tmp_path, monkeypatch, toy_run):
    """Table A1 trains CIFAR10 in bfloat16 (the preset's --dtype). The stand-in keeps the
    official EDMPrecond contract: its forward asserts that the inner network returns the
    dtype it was given, which a bf16-autocast convolution breaks. 01 (the teacher in float32,
    the preset's, and in bf16 autocast), 03 (bf16 autocast) and 05 (its teacher in bf16) run
    on it. Stand-ins for the pixel LPIPS (a 3-channel one of 02) and the TF Inception."""
    import importlib
    import pickle
    import numpy as np
    from PIL import Image
    from fake_edm import make_fake_edm_pickle
    from standin_eval import stand_in_cifar_inception
    pkl, pypath = make_fake_edm_pickle(str(tmp_path / "edm"))
    monkeypatch.syspath_prepend(pypath)
    raw = pickle.load(open(pkl, "rb"))["ema"]
    x, sigma = torch.randn(2, 3, 32, 32), torch.full((2,), 2.0)
    with pytest.raises(AssertionError), torch.autocast("cpu", torch.bfloat16):
        raw(x, sigma, torch.eye(10)[:2])
    out = tmp_path / "run"
    pairs = ["--preset", "cifar10", "--teacher", pkl, "--num_pairs", 8, "--shard_size", 8, "--batch_per_device", 8, "--num_steps", 4]
    run_script("01_make_pairs.py", *pairs, "--out_dir", out)
    run_script("01_make_pairs.py", *pairs, "--out_dir", tmp_path / "bf16", "--teacher_dtype", "bfloat16")
    read = lambda d: C.load_shard(C.shard_path(d / "pairs", 0))["x"].double()
    err = ((read(tmp_path / "bf16") - read(out)).norm() / read(out).norm()).item()
    assert 0 < err < 2e-2, err  # bf16 ran, and is close to the float32 teacher
    # the pixel LPIPS at 64 px, not the preset's 224: on a CPU without bf16 instructions its
    # bf16 convolutions at 224 px take minutes, and the dtype contract is the same at any size
    monkeypatch.setitem(C.PRESETS["cifar10"], "lpips_resize", 64)
    run_script("03_ode_distill.py", "--preset", "cifar10", "--teacher", pkl, "--out_dir", out, "--steps", 2, "--batch", 4,
               "--batch_per_device", 4, "--lpips_ckpt", toy_run / "lpips" / "latent_lpips.pt", "--log_every", 1, "--ckpt_every", 2)
    logs = [json.loads(l) for l in open(out / "distill" / "metrics.jsonl")]
    assert json.load(open(out / "distill" / "config.json"))["dtype"] == "bfloat16" and all(np.isfinite(l["loss"]) for l in logs)
    S5 = importlib.import_module("05_evaluate")
    monkeypatch.setattr(S5, "load_cifar_inception", stand_in_cifar_inception)
    real = tmp_path / "cifar_train"
    real.mkdir()
    for i, im in enumerate(np.random.RandomState(0).randint(0, 255, (8, 32, 32, 3)).astype(np.uint8)):
        Image.fromarray(im).save(real / f"{i}.png")
    S5.main([str(a) for a in ["--preset", "cifar10", "--teacher", pkl, "--out_dir", out, "--num_samples", 8, "--batch_per_device", 8,
                              "--num_steps", 4, "--fid_ref", real, "--teacher_dtype", "bfloat16", "--grid_rows", 2,
                              "--diversity_seeds", 2]])
    m = json.load(open(out / "eval" / "metrics.json"))
    assert {"teacher", "stage 1"} <= set(m) and all(np.isfinite(r["fid_8"]) for r in m.values())
