import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


def run_script(name, *args, env=None, check=True, torchrun=0):
    """Run a numbered script; returns a CompletedProcess (args, returncode, stdout,
    stderr). Its main() runs in this process, which saves the ~6 s of importing torch
    and diffusers per call on a 2-core machine; torchrun, a custom environment, or
    D2G_SUBPROCESS=1 run it as a real subprocess instead."""
    if not torchrun and env is None and os.environ.get("D2G_SUBPROCESS", "0") != "1":
        p = _in_process(name, [str(a) for a in args])
    else:
        p = _subprocess(name, args, env, torchrun)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _in_process(name, args):
    """main(args) with stdout/stderr captured, from the repo folder, as a process
    would exit: SystemExit's message to stderr and its status (a str: 1), an
    exception's traceback to stderr with status 1. The global RNG starts from a state
    that depends on the command line, as a fresh process's does not repeat across runs:
    a script that relies on torch's global RNG without seeding it from --seed gives two
    runs that differ (so "seeded" claims can fail); the caller's RNG is restored after."""
    import contextlib
    import importlib
    import io
    import traceback
    import torch
    import signal
    out, err, code, cwd, rng = io.StringIO(), io.StringIO(), 0, os.getcwd(), torch.random.get_rng_state()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}  # a run that stops early may leave its own
    os.chdir(REPO)
    torch.manual_seed(zlib.crc32(repr((name, args)).encode()))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                importlib.import_module(name[:-3]).main(args)
            except SystemExit as e:
                if e.code not in (None, 0):
                    code = e.code if isinstance(e.code, int) else 1
                    if not isinstance(e.code, int):
                        print(e.code, file=sys.stderr)
            except Exception:
                code = 1
                traceback.print_exc()
    finally:
        os.chdir(cwd)
        torch.random.set_rng_state(rng)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


def _subprocess(name, args, env, torchrun):
    cmd = [sys.executable, os.path.join(REPO, name), *map(str, args)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               os.path.join(REPO, name), *map(str, args)]
    e = dict(os.environ, OMP_NUM_THREADS="1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"))
    e.update(env or {})
    limit = float(os.environ.get("D2G_SUBPROCESS_TIMEOUT", 0)) or None  # a hang then fails with what it printed
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=REPO, timeout=limit)
    except subprocess.TimeoutExpired as t:
        text = lambda b: (b.decode(errors="replace") if isinstance(b, bytes) else b) or ""
        return subprocess.CompletedProcess(cmd, 124, text(t.stdout), text(t.stderr) + f"\ntimed out after {limit} s")


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    import tiny_sd
    d = str(tmp_path_factory.mktemp("sd15") / "model")
    tiny_sd.make_tiny_sd15(d)
    return d


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    import tiny_sd
    d = str(tmp_path_factory.mktemp("sdxl") / "model")
    tiny_sd.make_tiny_sdxl(d)
    return d


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a red cube on the table\nthe quick brown fox\nan astronaut in space\n\na painting of a rabbit\n")
    return str(p)


# ---- the toy run that the stage tests (test_03_*, test_04_*, test_05_*) share ----

S1 = ["--batch", 8, "--batch_per_device", 8, "--ckpt_every", 2, "--grid_every", 100, "--log_every", 1]


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """Pairs (64) and a small LatentLPIPS, shared by the stage tests (each writes its own --run_name)."""
    out = tmp_path_factory.mktemp("toy")
    run_script("01_make_pairs.py", "--out_dir", out, "--num_pairs", 64, "--shard_size", 32, "--batch_per_device", 32)
    run_script("02_train_latent_lpips.py", "--out_dir", out, "--cls_steps", 20, "--num_triplets", 200, "--cal_steps", 20)
    return out


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def close_weights(a, b, parts, tol):
    """Two checkpoints' state dicts agree key by key, to `tol` of each tensor's scale."""
    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            if a[part][k].is_floating_point():
                err = (a[part][k] - b[part][k]).abs().max().item() / max(a[part][k].abs().max().item(), 1e-3)
                assert err < tol, (part, k, err)


STAGE2_ARGS = ["--steps", 4, "--batch", 8, "--batch_per_device", 2, "--log_every", 1, "--ckpt_every", 100, "--grid_every", 100]


def close_runs(toy_run, a, b, steps, keys=()):
    """Two stage-2 runs log the same losses and end with the same G, EMA and D (relative 1e-3)."""
    logs = {r: [json.loads(l) for l in open(toy_run / r / "metrics.jsonl")] for r in (a, b)}
    print({r: [(l["loss_d"], l["r1"]) for l in v] for r, v in logs.items()})
    assert len(logs[a]) == len(logs[b]) == steps, b
    for key in ("loss_d", "loss_g", "logit_real", "logit_fake", "grad_norm_d", "grad_norm_g", *keys):
        assert max(abs(x[key] - y[key]) / max(abs(x[key]), 1e-3) for x, y in zip(logs[a], logs[b])) < 1e-3, (b, key)
    close_weights(weights(toy_run / a / "ckpt_latest.pt"), weights(toy_run / b / "ckpt_latest.pt"), ("model", "ema", "D"), 1e-3)
    return logs
