"""docs/forking.md's examples, applied as written to a copy of the code and run: a
--loss row and its flag in both stages, a discriminator head of any module and logit
shape, and a stage-1-only term."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import common as C
from conftest import REPO, S1, weights

SCRIPTS = ("common.py", "01_make_pairs.py", "02_train_latent_lpips.py", "03_ode_distill.py", "04_gan_finetune.py", "05_evaluate.py")


def doc_blocks():
    """{where: code} of forking.md's python blocks, whose first line says where each goes."""
    text = open(os.path.join(REPO, "docs", "forking.md")).read()
    return {m[1]: m[2] for m in re.finditer(r"```python\n# ([^\n]+)\n(.*?)```", text, re.S)}


def fork(path, edits):
    """A copy of the scripts with edits: {file: fn(source) -> source}; assets shared."""
    path.mkdir()
    for name in SCRIPTS:
        src = open(os.path.join(REPO, name)).read()
        (path / name).write_text(edits.get(name, lambda s: s)(src))
    os.symlink(os.path.join(REPO, "assets"), path / "assets")
    return path


def insert_after(anchor, code):
    """Insert `code` after the line that starts with `anchor`, at that line's indentation."""
    def edit(src):
        line = next(l for l in src.splitlines() if l.lstrip().startswith(anchor))
        pad = line[:len(line) - len(line.lstrip())]
        assert src.count(line) == 1, anchor
        return src.replace(line, line + "\n" + "".join(pad + l + "\n" for l in code.strip().splitlines()).rstrip("\n"))
    return edit


def run(folder, *args):
    p = subprocess.run([sys.executable, *map(str, args)], cwd=folder, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_a_loss_row_and_a_head_of_any_shape_run_in_both_stages(toy_run, tmp_path):
    blocks = doc_blocks()
    head = blocks["04_gan_finetune.py, after D = Discriminator(...)"]
    f = fork(tmp_path / "fork", {"common.py": lambda s: s + "\n\n" + blocks["common.py"],
                                 "04_gan_finetune.py": insert_after("D = Discriminator(", head)})
    # the row is dispatched by its exact name, and its flag's value reaches it
    check = ("import torch, common as C; lp = C.LatentLPIPS(3, 0.25, 2); a, b = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16); "
             "d = lambda w: (torch.manual_seed(0), C.RegressionLoss('elatent+wl1', lp, cfg=dict(l1_weight=w))(a, b))[1]; "
             "assert torch.allclose(d(0.5) - d(0.0), 0.5 * (a - b).abs().mean((1, 2, 3)), atol=1e-6); print('ok')")
    assert run(f, "-c", check).stdout.strip() == "ok"
    s1 = ["--out_dir", toy_run, "--steps", 2, *S1]
    run(f, "03_ode_distill.py", *s1, "--loss", "elatent+wl1", "--l1_weight", 0.5, "--run_name", "fork_s1")
    p = run(f, "04_gan_finetune.py", *s1, "--init", toy_run / "fork_s1" / "student_ema.pt", "--run_name", "fork_s2", "--r1_every", 1)
    assert "--loss elatent+wl1" in p.stdout and "--l1_weight 0.5" in p.stdout and "from the stage-1 student" in p.stdout, p.stdout
    cfg = json.load(open(toy_run / "fork_s2" / "config.json"))
    assert cfg["loss"] == "elatent+wl1" and cfg["l1_weight"] == 0.5
    lines = [json.loads(l) for l in open(toy_run / "fork_s2" / "metrics.jsonl")]
    assert len(lines) == 2 and all(l["r1"] > 0 and abs(l["logit_real"]) < 1e3 for l in lines)
    assert "heads.0.4.weight" in weights(toy_run / "fork_s2" / "ckpt_latest.pt")["D"]  # the Linear of the MLP head
    p = run(f, "04_gan_finetune.py", *s1, "--init", toy_run / "fork_s1" / "student_ema.pt", "--run_name", "fork_s2b",
            "--steps", 1, "--l1_weight", 0.2)
    assert json.load(open(toy_run / "fork_s2b" / "config.json"))["l1_weight"] == 0.2  # a flag given wins


@pytest.mark.slow  # two more stage-1 runs; the loss-row test above covers the fork mechanics in the default run
def test_a_stage1_only_term_changes_stage1s_loss(toy_run, tmp_path):
    blocks = doc_blocks()
    step = blocks["03_ode_distill.py, step"].strip().splitlines()

    def edit(src):
        src = insert_after('"logging": C.TRAIN_LOG_FLAGS,', "")(src)
        src = src.replace("\ndef get_config(", blocks["03_ode_distill.py, after FLAGS"] + "\n\ndef get_config(")
        line = next(l for l in src.splitlines() if l.lstrip().startswith("d = loss_fn(model("))
        pad = line[:len(line) - len(line.lstrip())]
        return src.replace(line, "\n".join(pad + l for l in step))
    f = fork(tmp_path / "fork", {"03_ode_distill.py": edit})
    args = ["--out_dir", toy_run, "--steps", 1, *S1]
    run(f, "03_ode_distill.py", *args, "--l1_extra", 1.0, "--run_name", "fork_l1")
    run(REPO, "03_ode_distill.py", *args, "--run_name", "plain_l1")
    loss = lambda run: json.loads(open(toy_run / run / "metrics.jsonl").readline())["loss"]
    assert loss("fork_l1") > loss("plain_l1") + 0.05  # the same first batch and seeds, plus mean |G - x| (~0.3 here)
