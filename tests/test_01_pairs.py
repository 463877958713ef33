"""01_make_pairs.py determinism, resume and bad input."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common as C
from conftest import REPO, run_script
from fake_edm import make_fake_edm_pickle

TOY = ["--num_pairs", 48, "--shard_size", 16, "--batch_per_device", 16]


def read_all(out_dir):
    files = sorted(glob.glob(os.path.join(out_dir, "pairs", "shard_*.safetensors")))
    shards = [C.load_shard(f) for f in files]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0] if k != "prompts"}


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory):
    """One uninterrupted single-process toy run."""
    out = tmp_path_factory.mktemp("ref")
    run_script("01_make_pairs.py", "--out_dir", out, *TOY, env={"OMP_NUM_THREADS": "1"})  # as each torchrun worker
    return out


def test_toy_pairs_content(toy_reference):
    pairs = read_all(toy_reference)
    assert pairs["x"].shape == (48, 3, 16, 16) and pairs["seed"].tolist() == list(range(48))
    teacher = C.EDMTeacher(dict(C.get_preset("toy"), preset="toy"), torch.device("cpu"))
    z, labels = teacher.noise_and_condition(pairs["seed"].tolist())
    assert torch.equal(labels, pairs["label"])  # c is regenerated from the seed
    m = C.read_manifest(os.path.join(toy_reference, "pairs"))
    assert m["complete"] and m["nfe"] == 35 and m["solver"] == "edm-heun-18" and m["num_pairs"] == 48
    assert os.path.isfile(os.path.join(toy_reference, "pairs", "pairs.png"))


def test_a_toy_pair_is_the_teachers_ode_solution_from_its_seed(toy_reference):
    """Pair i stores x = solve(z_i, c_i): the teacher's Heun-18 ODE from the z and class
    label that pair i's seed draws (recomputed here at another batch size)."""
    pairs = read_all(toy_reference)
    teacher = C.EDMTeacher(dict(C.get_preset("toy"), preset="toy"), torch.device("cpu"))
    z, c = teacher.noise_and_condition([5, 17, 40])
    x = teacher.solve(z, c).float()
    assert (x - pairs["x"][[5, 17, 40]]).abs().max() < 1e-4 and x.abs().max() > 0.5
    other, _ = teacher.noise_and_condition([6, 18, 41])  # the neighbours' noise gives other images
    assert (teacher.solve(other, c).float() - pairs["x"][[5, 17, 40]]).abs().max() > 0.5


def test_same_pairs_across_batch_sizes(toy_reference, tmp_path):
    """z and c are bit-identical for any batch size; x agrees to float32 rounding
    (BLAS rounds a batch-7 GEMM differently from a batch-16 one)."""
    run_script("01_make_pairs.py", "--out_dir", tmp_path, *TOY[:4], "--batch_per_device", 7)
    a, b = read_all(toy_reference), read_all(tmp_path)
    assert torch.equal(a["seed"], b["seed"]) and torch.equal(a["label"], b["label"])
    diff = (a["x"] - b["x"]).abs().max().item()
    print(f"batch 16 vs batch 7: max |dx| = {diff:.2e}")
    assert diff < 1e-4


def test_torchrun_equals_single_process(toy_reference, tmp_path):
    """2 ranks on CPU (gloo) write exactly the same shards as 1 process."""
    p = run_script("01_make_pairs.py", "--out_dir", tmp_path, *TOY, torchrun=2)
    a, b = read_all(toy_reference), read_all(tmp_path)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "pairs/s" in p.stdout


def test_resume_after_kill(toy_reference, tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "01_make_pairs.py"), "--out_dir", str(tmp_path), *map(str, TOY[:2]),
           "--shard_size", "8", "--batch_per_device", "8"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pattern = os.path.join(tmp_path, "pairs", "shard_*.safetensors")
    deadline = time.time() + 120
    while len(glob.glob(pattern)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {f: os.stat(f).st_mtime_ns for f in glob.glob(pattern)}
    assert 2 <= len(done) < 6, "the kill should land mid-run"
    p = run_script("01_make_pairs.py", "--out_dir", tmp_path, *TOY[:2], "--shard_size", 8, "--batch_per_device", 8)
    assert f"{len(done)} done" in p.stdout
    for f, t in done.items():
        assert os.stat(f).st_mtime_ns == t, f"{f} was redone"
    a, b = read_all(toy_reference), read_all(tmp_path)
    assert torch.equal(a["label"], b["label"]) and (a["x"] - b["x"]).abs().max() < 1e-4
    assert not glob.glob(os.path.join(tmp_path, "pairs", "*.tmp*"))


def test_edm_pickle_is_exact(tmp_path):
    """The NVlabs-pickle path (one-hot labels, round_sigma) on the closed-form
    Gaussian denoiser: with many steps the pairs equal the exact ODE solution."""
    pkl, pypath = make_fake_edm_pickle(str(tmp_path / "edm"))
    run_script("01_make_pairs.py", "--preset", "cifar10", "--teacher", pkl, "--out_dir", tmp_path / "run",
               "--num_pairs", 6, "--shard_size", 4, "--batch_per_device", 3, "--num_steps", 288,
               env={"PYTHONPATH": pypath})
    pairs = read_all(tmp_path / "run")
    z = torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(6)])
    exact = 0.3 + (80 * z.double() - 0.3) * (0.7 ** 2 / (0.7 ** 2 + 80 ** 2)) ** 0.5
    assert (pairs["x"].double() - exact).abs().max() < 1e-3


def _fails(*args, env=None):
    p = run_script("01_make_pairs.py", *args, env=env, check=False)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), p.stderr[-2000:]
    return last


def test_bad_input(tmp_path, toy_reference):
    out = tmp_path / "bad"
    assert "not found" in _fails("--teacher", tmp_path / "nope.safetensors", "--out_dir", out)
    msg = _fails("--preset", "sd3", "--out_dir", out)
    assert "--preset" in msg and "invalid choice" in msg and "toy_sd" in msg, msg
    assert "must be positive" in _fails("--num_pairs", 0, "--out_dir", out)
    assert "must be positive" in _fails("--num_pairs", -5, "--out_dir", out)
    pkl, _ = make_fake_edm_pickle(str(tmp_path / "edm"))
    assert "torch_utils" in _fails("--preset", "cifar10", "--teacher", pkl, "--out_dir", out, "--num_pairs", 2)
    assert not glob.glob(os.path.join(out, "pairs", "shard_*"))
    # pairs from a different teacher: perturb one weight of the toy teacher
    from safetensors.torch import load_file, save_file
    sd = load_file(C.PRESETS["toy"]["teacher"])
    k = next(iter(sd))
    sd[k] = sd[k] + 1e-3
    other = str(tmp_path / "other_teacher.safetensors")
    save_file(sd, other)
    msg = _fails("--out_dir", toy_reference, "--teacher", other, *TOY)
    assert "different setup" in msg and "teacher:" in msg
    # pairs from a different preset
    msg = _fails("--preset", "cifar10", "--teacher", pkl, "--out_dir", toy_reference, "--num_pairs", 48,
                 env={"PYTHONPATH": str(tmp_path / "edm")})
    assert "preset:" in msg


def test_corrupt_shard_is_refused(toy_reference, tmp_path):
    import shutil
    shutil.copytree(toy_reference, tmp_path / "run")
    f = C.shard_path(tmp_path / "run" / "pairs", 1)
    with open(f, "r+b") as fh:
        fh.truncate(100)
    msg = _fails("--out_dir", tmp_path / "run", *TOY)
    assert "corrupt pair shard" in msg and "shard_000001" in msg
