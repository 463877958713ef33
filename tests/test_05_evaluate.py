"""05 on the toy: every stage's row, seed groups, grids, and the teacher's guidance
taken from the students' checkpoints."""
import importlib
import json

import pytest
import torch

import common as C
from conftest import S1, run_script, weights


def test_stage2_and_eval(toy_run):
    run_script("03_ode_distill.py", "--out_dir", toy_run, "--steps", 4, *S1)
    p = run_script("04_gan_finetune.py", "--out_dir", toy_run, "--steps", 10, "--batch", 8, "--batch_per_device", 8,
                   "--r1_every", 4, "--log_every", 1000, "--grid_every", 1000, "--ckpt_every", 5)
    assert "D: 9 readout heads" in p.stdout
    log = [json.loads(l) for l in open(toy_run / "gan" / "metrics.jsonl")]
    r1_steps = [l["step"] for l in log if l["r1"] is not None]
    assert r1_steps == [0, 4, 8] and all(l["r1"] > 0 for l in log if l["r1"] is not None)
    gamma = importlib.import_module("04_gan_finetune").STAGE2["toy"]["r1_gamma"]  # R1's share of L_D, beside loss_d
    assert all(l["r1_term"] == pytest.approx(0.5 * gamma * l["r1"], rel=1e-3) for l in log if l["r1"] is not None)
    assert all(torch.isfinite(torch.tensor([l["loss_g"], l["loss_d"], l["logit_real"], l["logit_fake"]])).all() for l in log)
    ck = weights(toy_run / "gan" / "ckpt_latest.pt")
    assert ck["step"] == 10 and {"model", "ema", "D", "opt", "opt_d"} <= set(ck)
    assert (toy_run / "gan" / "student_ema.pt").exists() and (toy_run / "gan" / "grid_000010.png").exists()
    # resume continues from the checkpoint
    p = run_script("04_gan_finetune.py", "--out_dir", toy_run, "--steps", 12, "--batch", 8, "--batch_per_device", 8,
                   "--r1_every", 4, "--resume", "--ckpt_every", 100)
    assert "resumed" in p.stdout and "at step 10" in p.stdout
    # 05 on all stages, with an evaluation classifier of 2 steps (what it scores is not checked here)
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

def test_05_takes_the_teachers_guidance_from_the_students(tmp_path):
    """A student distilled at w = 2 is compared with the teacher at w = 2
    (70 NFE), not at the preset's w = 1; a contradicting --guidance is refused."""
    ev = importlib.import_module("05_evaluate")
    cfg = dict(C.get_preset("toy"), preset="toy", out_dir=str(tmp_path), guidance_flag=None, cfg_range=None)
    teacher = C.EDMTeacher(cfg, torch.device("cpu"))
    G = C.Student(teacher, cfg)
    path = tmp_path / "w2.pt"
    torch.save(dict(ema=G.state_dict(), config=dict(cfg, guidance=2.0), teacher=teacher.teacher_id, stage=1, step=0), path)
    cfg1 = dict(cfg, students=f"w2={path}")
    models, nfe = ev.model_table(cfg1, C.EDMTeacher(cfg1, torch.device("cpu")), torch.device("cpu"), ev.validate(dict(cfg1, classifier_seed=0, classifier=None, speed=False))[0])
    assert cfg1["guidance"] == 2.0 and nfe["teacher"] == 70 and nfe["w2"] == 1
    cfg2 = dict(cfg, students=f"w2={path}", guidance_flag=1.5)
    with pytest.raises(SystemExit, match="--guidance 1.5 contradicts .*guidance 2.0"):
        ev.model_table(cfg2, C.EDMTeacher(cfg2, torch.device("cpu")), torch.device("cpu"), ev.validate(dict(cfg2, classifier_seed=0, classifier=None, speed=False))[0])
    torch.save(dict(ema=G.state_dict(), config=dict(cfg, guidance=3.0), teacher=teacher.teacher_id, stage=1, step=0), tmp_path / "w3.pt")
    cfg3 = dict(cfg, students=f"w2={path},w3={tmp_path / 'w3.pt'}")
    with pytest.raises(SystemExit, match="different guidance scales"):
        ev.model_table(cfg3, C.EDMTeacher(cfg3, torch.device("cpu")), torch.device("cpu"), ev.validate(dict(cfg3, classifier_seed=0, classifier=None, speed=False))[0])
