"""Distributed details that bite on GPUs, checked on CPU: the process
group's timeout, and 05's feature extraction under torchrun."""
import datetime
import os
import re
import subprocess

import pytest
import torch

import common as C
from conftest import REPO


def test_process_group_timeout_is_passed(monkeypatch):
    import torch.distributed as dist
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    assert C.setup_distributed(7)[2] == 1
    assert seen == dict(backend="gloo", timeout=datetime.timedelta(minutes=7))
    C.setup_distributed()
    assert seen["timeout"] >= datetime.timedelta(minutes=60)  # the default: long enough for 01's last barrier


def test_every_script_takes_the_timeout_flag(capsys):
    import importlib
    import pytest
    for s in ("01_make_pairs", "02_train_latent_lpips", "03_ode_distill", "04_gan_finetune", "05_evaluate"):
        with pytest.raises(SystemExit):
            importlib.import_module(s).main(["--help"])
        assert "--dist_timeout_min" in capsys.readouterr().out, s


def test_quickstart_one_liner_fails_loudly(tmp_path):
    """The README's quick start exits non-zero when a stage fails, and
    stops there. `python` is a stand-in that fails for stage 02."""
    line = next(l for l in open(os.path.join(REPO, "README.md")) if l.startswith("python 01_make_pairs.py &&"))
    shim = tmp_path / "python"
    shim.write_text('#!/bin/sh\necho "ran $1" >> "$LOG"\n[ "$1" != 02_train_latent_lpips.py ]\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", LOG=str(tmp_path / "log"))
    p = subprocess.run(["bash", "-c", line], env=env, cwd=REPO)
    ran = re.findall(r"ran (\S+)", (tmp_path / "log").read_text())
    assert p.returncode != 0 and ran == ["01_make_pairs.py", "02_train_latent_lpips.py"]
    shim.write_text('#!/bin/sh\necho "ran $1" >> "$LOG"\n')
    (tmp_path / "log").unlink()
    assert subprocess.run(["bash", "-c", line], env=env, cwd=REPO).returncode == 0
    assert len((tmp_path / "log").read_text().splitlines()) == 5


@pytest.mark.slow  # ~20 s: two torchrun launches
def test_05_features_under_torchrun_equal_one_process(tiny_sd15, tmp_path):
    """05 under torchrun: each rank samples and extracts the features of its own
    seeds (no DataParallel); the gathered metrics equal a 1-process run."""
    import json
    from conftest import run_script
    from standin_eval import make_coco
    coco = make_coco(str(tmp_path / "coco"), n=10)  # the real statistics: all 10 images, split across ranks too
    args = ["--preset", "sd15", "--teacher", tiny_sd15, "--resolution", 16, "--num_steps", 2, "--coco", coco,
            "--num_samples", 8, "--batch_per_device", 2, "--div_prompts", 2, "--grid_rows", 2, "--diversity_seeds", 2,
            "--teacher_dtype", "float32"]
    m = {}
    for n in (1, 2):
        run_script(os.path.join("tests", "standin_eval.py"), *args, "--out_dir", tmp_path / f"p{n}", torchrun=n)
        m[n] = json.load(open(tmp_path / f"p{n}" / "eval" / "metrics.json"))["teacher"]
    print(m)
    for k in ("fid_8", "clip_8", "precision_8", "recall_8", "dreamdiv_2", "dreamsim_8"):
        assert abs(m[1][k] - m[2][k]) <= 1e-4 * max(1.0, abs(m[1][k])), k
