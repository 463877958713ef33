"""Cluster readiness, on CPU: a run that SIGTERM or SIGUSR1 stops writes its checkpoint
on every rank, exits with C.PREEMPTED and resumes exactly; two torchrun launches as two
nodes give one process's result, with the shared files written by global rank 0 only;
--log_to; the FLOP count of the sizing report against a hand count."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import common as C
from conftest import REPO, S1, close_weights, run_script, weights

RUN = ["--steps", 16, "--batch", 8, "--batch_per_device", 4, "--ckpt_every", 100, "--grid_every", 100, "--log_every", 1,
       "--ema_start", 0]


def popen(script, args, torchrun=0, env=None, nnodes=1, port=None):
    """A numbered script as a background process: plain python, or torchrun with `torchrun`
    processes per node (nnodes > 1: this launch is one node of a c10d rendezvous on loopback)."""
    cmd = [sys.executable, os.path.join(REPO, script), *map(str, args)]
    if torchrun:
        where = ["--standalone"] if nnodes == 1 else [f"--nnodes={nnodes}", "--rdzv_backend=c10d",
                                                       f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=d2g_test"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={torchrun}", *cmd[1:]]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files, not pipes: a full pipe would block it
    p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=e, cwd=REPO)
    p.logs = out, err
    return p


def finish(p, limit=600):
    """Wait for p; its exit status, stdout and stderr."""
    p.wait(timeout=limit)
    text = []
    for f in p.logs:
        f.seek(0)
        text.append(f.read())
        f.close()
    return p.returncode, *text


def signal_mid_run(p, metrics, sig, target=None, after=3, limit=300):
    """Send `sig` to process p (or to `target`'s pid) once `metrics` has `after` lines."""
    t0 = time.time()
    while not (os.path.isfile(metrics) and len(open(metrics).readlines()) >= after):
        assert p.poll() is None, finish(p)
        assert time.time() - t0 < limit, "the run logged no step"
        time.sleep(0.05)
    os.kill(target() if target else p.pid, sig)


def worker_pid(torchrun, rank):
    """The pid of the worker of this global rank among torchrun's children (/proc: RANK)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == torchrun.pid and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"torchrun {torchrun.pid} has no worker of rank {rank}")


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def check_stopped(run_dir, rc, out, err, steps, plain):
    """The stop: exit status (plain python: C.PREEMPTED; torchrun reports any stop of its
    workers as 1), the marker, and a checkpoint at the marker's step, before the end."""
    marker = json.load(open(os.path.join(run_dir, "preempted.json")))
    assert rc == (C.PREEMPTED if plain else 1), (rc, err[-3000:])
    assert marker["exit_status"] == C.PREEMPTED and 0 < marker["step"] < steps, marker
    ck = weights(os.path.join(run_dir, "ckpt_latest.pt"))
    assert ck["step"] == marker["step"] and weights(os.path.join(run_dir, "student_ema.pt"))["step"] == marker["step"]
    assert f"exit status {C.PREEMPTED}" in out, out[-2000:]
    return marker


def same_state(a, b, parts):
    """Two checkpoints hold bit-identical tensors in `parts`."""
    a, b = weights(a), weights(b)
    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_sigterm_stops_03_with_a_checkpoint_and_resumes_exactly(toy_run):
    """Plain python: SIGTERM mid-run, exit status 75 and a checkpoint at the step it
    stopped; --resume then ends with the straight run's G, EMA and Adam state, and the
    marker is gone."""
    args = ["--out_dir", toy_run, *RUN]
    with one_thread():  # as the 1-thread process below: the thread count changes float sums
        run_script("03_ode_distill.py", *args, "--run_name", "sig_straight")
    p = popen("03_ode_distill.py", [*args, "--run_name", "sig_stopped"])
    signal_mid_run(p, toy_run / "sig_stopped" / "metrics.jsonl", signal.SIGTERM)
    rc, out, err = finish(p)
    marker = check_stopped(toy_run / "sig_stopped", rc, out, err, 16, plain=True)
    print("stopped at step", marker["step"])
    with one_thread():
        run_script("03_ode_distill.py", *args, "--run_name", "sig_stopped", "--resume")
    assert not (toy_run / "sig_stopped" / "preempted.json").exists()
    same_state(toy_run / "sig_straight" / "ckpt_latest.pt", toy_run / "sig_stopped" / "ckpt_latest.pt", ("model", "ema"))
    a, b = (weights(toy_run / r / "ckpt_latest.pt")["opt"]["state"] for r in ("sig_straight", "sig_stopped"))
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


@pytest.mark.slow  # 3 torchrun launches of 2 processes, ~40 s each
@pytest.mark.parametrize("script,sig,who", [("03_ode_distill.py", signal.SIGTERM, "torchrun"),
                                            ("04_gan_finetune.py", signal.SIGTERM, "torchrun"),
                                            ("04_gan_finetune.py", signal.SIGUSR1, "rank 1")],
                         ids=["03-SIGTERM-to-torchrun", "04-SIGTERM-to-torchrun", "04-SIGUSR1-to-rank1"])
def test_signal_under_torchrun_stops_every_rank_and_resumes_exactly(toy_run, script, sig, who):
    """2 processes under torchrun; the signal goes to torchrun (what SLURM signals), which
    passes it on to its workers, or to rank 1's worker alone (the ranks agree through one
    all-reduce). Both ranks write the checkpoint at the same step, exit with 75, and the
    resumed run's EMA (and G, D) equal the straight run's exactly."""
    extra = []
    if script.startswith("04"):  # from a stage-1 student
        if not (toy_run / "s1_for_04" / "student_ema.pt").exists():
            run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "s1_for_04", "--steps", 4, *S1)
        extra = ["--init", toy_run / "s1_for_04" / "student_ema.pt", "--r1_every", 2]
    args = ["--out_dir", toy_run, *RUN, *extra, "--dist_timeout_min", 1]  # ranks that disagree fail in a minute, not hang
    tag = f"{script[:2]}_{sig.name}"
    if not (toy_run / f"{script[:2]}_tr_straight" / "student_ema.pt").exists():
        run_script(script, *args, "--run_name", f"{script[:2]}_tr_straight", torchrun=2)
    env = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGUSR1"}  # torchrun --signals_to_handle
    p = popen(script, [*args, "--run_name", tag], torchrun=2, env=env)
    signal_mid_run(p, toy_run / tag / "metrics.jsonl", sig, target=(lambda: worker_pid(p, 1)) if who == "rank 1" else None)
    rc, out, err = finish(p)
    marker = check_stopped(toy_run / tag, rc, out, err, 16, plain=False)
    if who == "rank 1":  # torchrun itself was not signalled: its failure report names the workers' status
        assert f"exitcode  : {C.PREEMPTED}" in err, err[-3000:]
    print(script, sig.name, who, "stopped at", marker)
    run_script(script, *args, "--run_name", tag, "--resume", torchrun=2)
    parts = ("model", "ema", "D") if script.startswith("04") else ("model", "ema")
    same_state(toy_run / f"{script[:2]}_tr_straight" / "ckpt_latest.pt", toy_run / tag / "ckpt_latest.pt", parts)


@pytest.mark.slow  # 2 subprocesses of 02
def test_sigusr1_stops_02_phase1_and_resumes_exactly(tmp_path):
    """Phase 1 of 02 (plain python): SIGUSR1 after its first saved state (step 5), exit
    status 75 with the state of the step it stopped at; --resume gives the straight run's
    classifier exactly."""
    base = ["--cls_steps", 150, "--num_triplets", 200, "--cal_steps", 20, "--cls_ckpt_every", 5]
    assert finish(popen("02_train_latent_lpips.py", ["--out_dir", tmp_path / "a", *base]))[0] == 0
    p = popen("02_train_latent_lpips.py", ["--out_dir", tmp_path / "b", *base])
    lp = tmp_path / "b" / "lpips"
    t0 = time.time()
    while not (lp / "classifier_latest.pt").exists():
        assert p.poll() is None and time.time() - t0 < 120, finish(p)
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGUSR1)
    rc, out, err = finish(p)
    marker = json.load(open(lp / "preempted.json"))
    assert rc == C.PREEMPTED and 0 < marker["step"] < 150, (rc, err[-2000:])
    assert weights(lp / "classifier_latest.pt")["step"] == marker["step"] and not (lp / "latent_lpips.pt").exists()
    assert finish(popen("02_train_latent_lpips.py", ["--out_dir", tmp_path / "b", *base, "--resume"]))[0] == 0
    a, b = (weights(tmp_path / r / "lpips" / "classifier.pt")["state_dict"] for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigusr1_stops_01_after_its_finished_shards_and_a_rerun_completes_them(tmp_path):
    """01 (plain python), SIGUSR1 once two shards are written: exit status 75, the marker
    counts the finished shards, and every shard on disk is complete (the one in progress
    is dropped, not written short). The same command then makes the rest, and every shard
    equals a straight run's."""
    args = ["--num_pairs", 12, "--shard_size", 2, "--batch_per_device", 1, "--num_steps", 8]
    p = popen("01_make_pairs.py", ["--out_dir", tmp_path / "b", *args])
    pairs = tmp_path / "b" / "pairs"
    t0 = time.time()
    while not os.path.exists(C.shard_path(pairs, 1)):
        assert p.poll() is None and time.time() - t0 < 120, finish(p)
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGUSR1)
    rc, out, err = finish(p)
    marker = json.load(open(pairs / "preempted.json"))
    shards = sorted(pairs.glob("shard_*.safetensors"))
    assert rc == C.PREEMPTED and 2 <= marker["step"] == len(shards) < 6, (rc, marker, err[-2000:])
    assert all(len(C.load_shard(f)["seed"]) == 2 for f in shards) and "rerun the same command" in out
    assert not json.load(open(pairs / "manifest.json"))["complete"]
    assert finish(popen("01_make_pairs.py", ["--out_dir", tmp_path / "b", *args]))[0] == 0
    assert json.load(open(pairs / "manifest.json"))["complete"] and not (pairs / "preempted.json").exists()
    with one_thread():  # as the 1-thread processes above: the thread count changes float sums
        run_script("01_make_pairs.py", "--out_dir", tmp_path / "a", *args)
    for k in range(6):
        a, b = (C.load_shard(C.shard_path(tmp_path / r / "pairs", k)) for r in "ab")
        assert all(torch.equal(a[key], b[key]) for key in a), k


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(script, args, audit):
    """Two torchrun launches, one process each, that meet as two nodes; each file they
    complete is recorded with its writer's global rank (tests/write_audit)."""
    env = {"PYTHONPATH": os.path.join(REPO, "tests", "write_audit"), "D2G_WRITE_AUDIT": str(audit)}
    port = free_port()
    ps = [popen(script, args, torchrun=1, env=env, nnodes=2, port=port) for _ in range(2)]
    for p in ps:
        rc, out, err = finish(p)
        assert rc == 0, err[-3000:]
    return [line.split("\t") for line in open(audit).read().splitlines()]


@pytest.mark.slow  # 2 x 2 torchrun launches, ~90 s
def test_two_nodes_equal_one_process_and_rank0_writes_the_shared_files(tmp_path):
    """01 and 03 over two torchrun launches (two 'nodes' of one process: RANK 1 has
    LOCAL_RANK 0): 01's shards are byte-identical to one process's, each written by the
    rank that owns it, and its manifest by global rank 0 only; 03 logs one process's
    losses (relative 1e-4) and only global rank 0 writes its run folder."""
    one, two = tmp_path / "one", tmp_path / "two"
    pairs = ["--num_pairs", 64, "--shard_size", 16, "--batch_per_device", 16]
    run_script("01_make_pairs.py", "--out_dir", one, *pairs)
    writes = two_nodes("01_make_pairs.py", ["--out_dir", two, *pairs], tmp_path / "audit01")
    shards = sorted(f for f in os.listdir(one / "pairs") if f.startswith("shard_"))
    assert len(shards) == 4 and shards == sorted(f for f in os.listdir(two / "pairs") if f.startswith("shard_"))
    for f in shards:
        assert (one / "pairs" / f).read_bytes() == (two / "pairs" / f).read_bytes(), f
    by = {}
    for rank, path in writes:
        by.setdefault(os.path.basename(path), set()).add(rank)
    print(by)
    assert by["manifest.json"] == {"0"} and by["pairs.png"] == {"0"}, by
    assert [by[f] for f in shards] == [{"0"}, {"1"}, {"0"}, {"1"}], by  # shards[rank::world]

    run_script("02_train_latent_lpips.py", "--out_dir", one, "--cls_steps", 20, "--num_triplets", 200, "--cal_steps", 20)
    lp = ["--lpips_ckpt", one / "lpips" / "latent_lpips.pt", "--pairs", one / "pairs"]
    s1 = ["--steps", 4, "--batch", 8, "--batch_per_device", 4, "--ckpt_every", 2, "--grid_every", 2, "--log_every", 1]
    run_script("03_ode_distill.py", "--out_dir", one, *lp, *s1)
    writes = two_nodes("03_ode_distill.py", ["--out_dir", two, *lp, *s1], tmp_path / "audit03")
    run_files = [(rank, p) for rank, p in writes if p.startswith(str(two / "distill"))]
    print(run_files)
    assert {os.path.basename(p) for _, p in run_files} >= {"config.json", "metrics.jsonl", "ckpt_latest.pt", "student_ema.pt",
                                                           "grid_000002.png"}
    assert {rank for rank, _ in run_files} == {"0"}, run_files
    la, lb = ([json.loads(l) for l in open(d / "distill" / "metrics.jsonl")] for d in (one, two))
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(x["loss"]), (x, y)
    close_weights(weights(one / "distill" / "ckpt_latest.pt"), weights(two / "distill" / "ckpt_latest.pt"), ("model", "ema"), 1e-4)


def test_log_to_tensorboard_writes_the_scalars_and_grids(toy_run):
    """--log_to tensorboard: the same scalars as metrics.jsonl at the same steps, and
    each grid PNG as an image."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "tb", "--steps", 4, *S1[:4], "--ckpt_every", 4,
               "--grid_every", 2, "--log_every", 1, "--log_to", "tensorboard")
    ea = EventAccumulator(str(toy_run / "tb" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    logged = [json.loads(l) for l in open(toy_run / "tb" / "metrics.jsonl")]
    for key in ("loss", "grad_norm", "lr", "img_s"):
        assert [e.step for e in ea.Scalars(key)] == [l["step"] for l in logged], key
        assert [e.value for e in ea.Scalars(key)] == pytest.approx([l[key] for l in logged], rel=1e-5), key
    assert [e.step for e in ea.Images("grid")] == [2, 4]


def test_log_to_wandb_writes_an_offline_run_with_the_grids(toy_run, monkeypatch):
    """--log_to wandb: an offline run under <run>/wandb (nothing uploaded), holding each grid."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--run_name", "wb", "--steps", 4, *S1[:4], "--ckpt_every", 4,
               "--grid_every", 2, "--log_every", 1, "--log_to", "wandb")
    runs = list((toy_run / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), runs
    assert len(list(runs[0].glob("files/media/images/grid_*.png"))) == 2


def test_log_to_without_its_package_is_one_line(toy_run, monkeypatch):
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb") else find(name, *a))
    for tracker in ("tensorboard", "wandb"):
        p = run_script("04_gan_finetune.py", "--out_dir", toy_run, "--run_name", "nolog", "--log_to", tracker, check=False)
        assert p.returncode != 0 and p.stderr.strip() == (f"error: --log_to {tracker} needs the '{tracker}' package, which is "
                                                          f"not installed: pip install {tracker}"), p.stderr
    assert not (toy_run / "nolog").exists()  # refused before any work


def hand_count(net, *inputs):
    """FLOPs of one forward and backward of `net`, from the layer shapes: 2 x MACs for a
    conv or linear layer forward, the same again for its weight gradient and for its input
    gradient when that input needs one; attention 4 B L^2 C forward, 2.5x that backward
    (5 matmuls: the scores recomputed, then the gradients of q, k and v)."""
    total = [0]

    def layer(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            f = 2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            f = 2 * out.numel() * m.in_features
        total[0] += f * (2 + inp[0].requires_grad)

    def attention(m, inp, out):
        b, c, h, w = inp[0].shape
        total[0] += 4 * b * (h * w) ** 2 * c * 3.5

    hooks = [m.register_forward_hook(layer) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks += [m.register_forward_hook(attention) for m in net.modules() if type(m).__name__ == "Attention"]
    net(*inputs).square().mean().backward()
    for h in hooks:
        h.remove()
    return total[0]


def test_flop_count_of_the_sizing_report_equals_a_hand_count(toy_run):
    """03's sizing report (--loss mse: the step is G's forward and backward) counts the
    FLOPs per training image that the toy U-Net's layer shapes give by hand, with
    accumulation (batch 8 = 2 x 4 per device): and TFLOP/s = FLOPs per image x img/s."""
    p = run_script("03_ode_distill.py", "--out_dir", toy_run, "--benchmark_steps", 3, "--batch", 8, "--batch_per_device", 4,
                   "--loss", "mse")
    rep = json.loads(p.stdout.split("benchmark: ")[1].splitlines()[0])
    teacher = C.load_teacher(C.get_preset("toy"), torch.device("cpu"))
    G = C.Student(teacher, C.get_preset("toy"))
    z, cond = teacher.noise_and_condition(list(range(4)))
    per_img = hand_count(G, z, C.student_cond(teacher, cond, torch.device("cpu"))) / 4
    print(rep["gflop_per_img"], per_img / 1e9)
    assert rep["gflop_per_img"] == pytest.approx(per_img / 1e9, rel=1e-5)
    assert rep["tflop_s_per_device"] == pytest.approx(rep["gflop_per_img"] * rep["img_s_per_device"] / 1e3, rel=2e-3)
    assert rep["frac_of_peak"] is None  # a CPU has no entry in the peak table


def test_stage2_sizing_counts_r1_and_every_d_pass(toy_run):
    """04's count runs through R1's double backward (autograd.grad on x) and each part of
    the step adds FLOPs: R1 > no R1 > 1.5x stage 1's step at the same batch. With R1
    every 2 steps, each kind is counted once and the timed steps 2 (R1) and 3 (none)
    average the two."""
    def report(script, *args, steps=2):
        p = run_script(script, "--out_dir", toy_run, "--benchmark_steps", steps, "--batch", 4, "--batch_per_device", 4, *args)
        return json.loads(p.stdout.split("benchmark: ")[1].splitlines()[0])
    with_r1, without = report("04_gan_finetune.py", "--r1_every", 1), report("04_gan_finetune.py", "--r1_gamma", 0)
    stage1, mixed = report("03_ode_distill.py"), report("04_gan_finetune.py", "--r1_every", 2, steps=4)
    print(with_r1["gflop_per_img"], without["gflop_per_img"], stage1["gflop_per_img"], mixed)
    assert with_r1["gflop_per_img"] > without["gflop_per_img"] > 1.5 * stage1["gflop_per_img"]
    assert mixed["gflop_per_img_each"] == dict(r1=with_r1["gflop_per_img"], no_r1=without["gflop_per_img"])
    assert mixed["gflop_per_img"] == pytest.approx((with_r1["gflop_per_img"] + without["gflop_per_img"]) / 2, rel=1e-5)


def test_peak_table_names_the_gpus():
    names = {"NVIDIA A100-SXM4-80GB": 312, "NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H200": 989}
    for name, peak in names.items():
        assert next(p for n, p in C.BF16_PEAK_TFLOPS if n in name) == peak, name


# the sbatch(1) and srun(1) options (Slurm 23.02 man pages) that docs/slurm.sbatch may use
SBATCH_OPTIONS = {"job-name", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "signal", "requeue",
                  "open-mode", "output", "error", "partition", "account", "qos", "mem", "exclusive"}
SRUN_OPTIONS = {"kill-on-bad-exit", "ntasks-per-node", "cpus-per-task"}


SLURM_STAGES = {"01": ("01_make_pairs.py", "pairs", ["PROMPTS=p.txt"]),
                "02": ("02_train_latent_lpips.py", "lpips", ["IMAGES=/data/in", "BAPPS=/data/bapps"]),
                "03": ("03_ode_distill.py", "distill", []),
                "04": ("04_gan_finetune.py", "gan", []),
                "05": ("05_evaluate.py", None, ["COCO=/data/coco2014"])}


def sbatch(tmp_path, *assign, stop=None):
    """docs/slurm.sbatch under bash with stand-ins for srun (it logs its command line and
    exits 1, as torchrun does for any stop; with `stop`, it first leaves the marker a
    stopped stage writes there) and scontrol; the exit status, stderr and the log."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (bin_ / "srun").write_text('#!/bin/sh\necho "srun $*" >> "$LOG"\n[ -n "$STOP" ] && mkdir -p "$STOP" && '
                               'echo \'{"step": 7}\' > "$STOP/preempted.json"\nexit 1\n')
    (bin_ / "scontrol").write_text('#!/bin/sh\necho "scontrol $*" >> "$LOG"\n[ "$1" = show ] && echo node1\nexit 0\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    log = tmp_path / "log"
    log.unlink(missing_ok=True)
    overrides = ("STAGE", "PRESET", "OUT", "RUN", "LPIPS", "ARGS", "ENV", "PROMPTS", "IMAGES", "BAPPS", "COCO", "INIT")
    env = {k: v for k, v in os.environ.items() if k not in overrides}  # the script's own overrides: only the test's
    env = dict(env, PATH=f"{bin_}:{os.environ['PATH']}", LOG=str(log), SLURM_JOB_NODELIST="node1",
               SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="42", SLURM_CPUS_PER_TASK="64", ENV=":", STOP=stop or "",
               **dict(a.split("=", 1) for a in assign))
    p = subprocess.run(["bash", os.path.join(REPO, "docs", "slurm.sbatch")], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    return p.returncode, p.stderr, log.read_text() if log.exists() else ""


def test_slurm_example_uses_options_that_exist():
    """docs/slurm.sbatch: its #SBATCH and srun options are sbatch's and srun's, and its
    torchrun options are in `torchrun --help`."""
    import re
    text = open(os.path.join(REPO, "docs", "slurm.sbatch")).read()
    assert set(re.findall(r"^#SBATCH --([a-z-]+)", text, re.M)) <= SBATCH_OPTIONS
    command = " ".join(l.rstrip("\\").strip() for l in text[text.index("\nsrun ") + 1:].split("rc=$?")[0].splitlines())
    srun, rest = command.split(" torchrun ")
    launcher = rest.split('"$SCRIPT"')[0]
    assert set(re.findall(r"--([a-z-]+)", srun)) <= SRUN_OPTIONS, srun
    from torch.distributed.run import get_args_parser
    torchrun_help = get_args_parser().format_help()
    assert "--signals_to_handle" in launcher
    for flag in re.findall(r"(--[a-z_]+)", launcher):
        assert re.search(rf"{flag}\b", torchrun_help), flag


@pytest.mark.parametrize("stage", sorted(SLURM_STAGES))
def test_slurm_example_runs_each_stage_with_its_flags_and_requeues_on_a_stop(tmp_path, capsys, stage):
    """STAGE=01..05 with stand-ins for srun and scontrol: the stage's script gets flags that
    are in its --help, the preset's folder, and ARGS at the end. A stop (the stage left its
    preempted.json: 01 in pairs/, 02 in lpips/, 03/04 in the run) requeues the job and
    exits 0; a failure passes its status on, also when the last start's marker is still
    there; 05 writes no marker and is never requeued."""
    import re
    script, marker, needs = SLURM_STAGES[stage]
    rc, err, log = sbatch(tmp_path, f"STAGE={stage}", "ARGS=--seed 3", *needs,
                          stop=f"runs/sd15/{marker or 'eval'}")
    line = next(l for l in log.splitlines() if l.startswith("srun "))
    args = line.split(f" {script} ")[1]
    assert args.startswith("--preset sd15 --out_dir runs/sd15 ") and args.endswith(" --seed 3"), line
    with pytest.raises(SystemExit):
        __import__(script[:-3]).main(["--help"])
    help_ = capsys.readouterr().out
    for flag in re.findall(r"(--[a-z_]+)", args):
        assert re.search(rf"{flag}\b", help_), (script, flag)
    if marker:
        assert rc == 0 and "scontrol requeue 42" in log and "--rdzv_endpoint=node1:29500" in log, (rc, err, log)
        rc, err, log = sbatch(tmp_path, f"STAGE={stage}", *needs)  # the stop's marker is still there
    assert rc == 1 and "requeue" not in log, (rc, err, log)


def test_slurm_example_refuses_an_unknown_stage_or_a_missing_input(tmp_path):
    rc, err, log = sbatch(tmp_path, "STAGE=06")
    assert rc == 2 and err.startswith("error: STAGE='06'") and not log, err
    rc, err, log = sbatch(tmp_path, "STAGE=01")
    assert rc != 0 and "PROMPTS" in err and not log, err
