"""Every flag a script defines is one it reads; every bad value and every
missing or corrupt input file stops the script within seconds, with one `error:`
line that names the flag or the file, and no traceback."""
import importlib
import inspect
import json
import os
import re
import shutil
import time

import pytest
import torch

import common as C
from conftest import REPO, run_script

SCRIPTS = ("01_make_pairs", "02_train_latent_lpips", "03_ode_distill", "04_gan_finetune", "05_evaluate")
mod = importlib.import_module


def flags(script):
    return [f for group in mod(script).FLAGS.values() for f in group]


def stops(script, argv, capsys, limit=30):
    """Run main(argv) in-process; it must stop (SystemExit != 0) within `limit`
    seconds. Returns the one message line it printed."""
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        mod(script).main([str(a) for a in argv])
    assert time.time() - t0 < limit, f"{script} {argv}: took {time.time() - t0:.0f} s to stop"
    capsys.readouterr()
    msg = str(e.value.code)  # what Python prints as the process's last line, exit status 1
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_values_are_refused_by_flag(script, capsys):
    """Each numeric or structured flag, given a value its type refuses, names itself."""
    tried = 0
    for name, default, kind, _ in flags(script):
        if isinstance(kind, (tuple, dict)):  # choices (dict: --preset's, PRESETS)
            bad = "nonsense"
        elif getattr(kind, "bad", None) is not None:
            bad = kind.bad
        else:
            continue  # paths and free text: the file tests below
        line = stops(script, [f"--{name}", bad], capsys, limit=10)
        assert f"--{name}" in line, line
        tried += 1
    assert tried >= 8, f"{script}: only {tried} typed flags"


@pytest.mark.parametrize("script", ["01_make_pairs", "05_evaluate"])
def test_the_teacher_samples_in_float16_weights_on_sd_and_float32_on_edm(script):
    """01's pairs and 05's teacher row: SD/SDXL teachers in fp16 weights (11-bit mantissa: 10x
    closer to a float32 teacher than bf16 weights, tests/pair_precision.py), EDM teachers in
    float32 as EDM's generate.py; the flag overrides. The teacher is built in that dtype."""
    cfg = lambda *argv: C.parse_config("", mod(script).FLAGS, list(argv))[0]
    assert [cfg("--preset", p)["teacher_dtype"] for p in ("sd15", "sd15_cfg8", "sdxl")] == ["float16"] * 3
    assert [cfg("--preset", p)["teacher_dtype"] for p in ("toy", "toy_sd", "cifar10")] == ["float32"] * 3
    assert cfg("--preset", "sd15", "--teacher_dtype", "bfloat16")["teacher_dtype"] == "bfloat16"
    c = cfg("--preset", "toy", "--teacher_dtype", "bfloat16")
    assert C.load_teacher(c, torch.device("cpu"), c["teacher_dtype"]).dtype == torch.bfloat16


@pytest.mark.parametrize("script", ["03_ode_distill", "04_gan_finetune"])
def test_gpu_presets_run_in_bfloat16_by_default(script):
    """Table A1 trains every setting in bfloat16: the GPU presets need no --dtype flag;
    the toy (CPU) stays float32, and the flag still overrides."""
    config = lambda *argv: C.parse_config("", mod(script).FLAGS, list(argv), getattr(mod(script), "STAGE1", None)
                                          or getattr(mod(script), "STAGE2", None))[0]["dtype"]
    gpu = [p for p in ("cifar10", "sd15", "sd15_cfg8", "sdxl") if script != "04_gan_finetune" or p != "cifar10"]  # 04: no CIFAR10 row
    assert [config("--preset", p) for p in gpu] == ["bfloat16"] * len(gpu)
    assert config("--preset", "toy") == "float32" and config("--preset", "sd15", "--dtype", "float32") == "float32"


def test_preset_values_pass_the_same_checks(monkeypatch):
    """A (user's) preset with a bad value is refused, naming the preset and the key."""
    monkeypatch.setitem(C.PRESETS, "bad", dict(C.PRESETS["toy"], num_pairs=0))
    with pytest.raises(SystemExit, match=r"preset 'bad': num_pairs: must be positive"):
        mod("01_make_pairs").main(["--preset", "bad"])


def reachable_source(script):
    """The script's own code (without its FLAGS table) plus the source of every
    common.py function or class it uses, followed through common.py's own calls."""
    src = open(os.path.join(REPO, script + ".py")).read()
    src = re.sub(r"\nFLAGS = \{.*?\n\}\n", "\n", src, flags=re.S)
    texts, todo, seen = [src], set(re.findall(r"\bC\.(\w+)", src)), {"parse_config", "RUN_FLAGS", "get_preset"}
    while todo:
        name = todo.pop()
        if name in seen or not hasattr(C, name):
            continue
        seen.add(name)
        obj = getattr(C, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            body = inspect.getsource(obj)
            texts.append(body)
            todo |= set(re.findall(r"\b([A-Za-z_]\w*)\(", body)) | set(re.findall(r"\b([A-Z_]{3,})\b", body))
    return "\n".join(texts)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_is_read(script):
    """A flag that no code of the script reads (as cfg["name"] and the like) fails."""
    src = reachable_source(script)
    unread = [name for name, *_ in flags(script) if f'"{name}"' not in src and f"'{name}'" not in src]
    assert not unread, f"{script} defines flags it never reads: {unread}"


def test_unread_flag_is_caught(monkeypatch):
    """The check above can fail: a flag added to 03 that nothing reads."""
    s3 = mod("03_ode_distill")
    monkeypatch.setitem(s3.FLAGS, "extra", [("num_pairs_typo", 1, C.INT_POS, "never read")])
    assert "num_pairs_typo" not in reachable_source("03_ode_distill")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny toy run folder: pairs, LatentLPIPS, a stage-1 student."""
    d = tmp_path_factory.mktemp("inputs")
    run_script("01_make_pairs.py", "--out_dir", d, "--num_pairs", 8, "--shard_size", 4, "--num_steps", 4)
    lp = C.LatentLPIPS(3, 0.25, 2, 10)
    os.makedirs(d / "lpips")
    torch.save(dict(config=lp.config, state_dict=lp.state_dict(), latent_space=C.latent_space("edm", 3)), d / "lpips" / "latent_lpips.pt")
    run_script("03_ode_distill.py", "--out_dir", d, "--steps", 1, "--batch", 4, "--batch_per_device", 4)
    return d


def corrupt(path):
    with open(path, "wb") as f:
        f.write(b"\x00not what it should be")
    return path


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_corrupt_inputs(toy_run, tmp_path, capsys, request):
    """Each input file of each script, missing or corrupt: one error line naming it."""
    d = copy_run(toy_run, tmp_path / "run")
    lp, s1 = d / "lpips" / "latent_lpips.pt", d / "distill" / "student_ema.pt"
    bad_coco = tmp_path / "bad_coco"  # valid JSON, but an annotation without its caption
    os.makedirs(bad_coco / "annotations")
    (bad_coco / "annotations" / "captions_val2014.json").write_text('{"images": [], "annotations": [{"image_id": 1}]}')
    cases = [
        ("01_make_pairs", ["--teacher", tmp_path / "nope.safetensors"], "nope.safetensors"),
        ("01_make_pairs", ["--teacher", corrupt(tmp_path / "bad.safetensors"), "--out_dir", tmp_path / "o1"], "bad.safetensors"),
        ("01_make_pairs", ["--preset", "sd15", "--prompts", tmp_path / "none.txt"], "none.txt"),
        ("02_train_latent_lpips", ["--reconstruct", "--out_dir", tmp_path / "empty"], "latent_lpips.pt"),
        ("02_train_latent_lpips", ["--calibrate_only", "--out_dir", tmp_path / "empty"], "classifier.pt"),
        ("02_train_latent_lpips", ["--bapps", tmp_path / "no_bapps", "--out_dir", tmp_path / "o2"], "no_bapps"),
        ("02_train_latent_lpips", ["--preset", "sd15", "--images", tmp_path / "no_images", "--bapps", tmp_path], "no_images"),
        ("03_ode_distill", ["--out_dir", tmp_path / "empty"], "manifest.json"),
        ("03_ode_distill", ["--out_dir", d, "--lpips_ckpt", tmp_path / "no_lp.pt"], "no_lp.pt"),
        ("04_gan_finetune", ["--out_dir", d, "--init", tmp_path / "no_s1.pt"], "no_s1.pt"),
        ("05_evaluate", ["--out_dir", d, "--students", f"x={tmp_path / 'no_x.pt'}"], "no_x.pt"),
        ("05_evaluate", ["--out_dir", d, "--students", "x"], "--students"),
        ("05_evaluate", ["--preset", "sd15", "--coco", tmp_path / "no_coco"], "no_coco"),
        ("05_evaluate", ["--preset", "sd15", "--coco", bad_coco], "captions_val2014.json"),
        ("05_evaluate", ["--out_dir", d, "--eval_w", "1,x"], "--eval_w"),
        # a readable checkpoint of another kind, where a student or a training state belongs
        ("04_gan_finetune", ["--out_dir", d, "--init", lp], "latent_lpips.pt"),
        ("04_gan_finetune", ["--out_dir", d, "--init", d / "distill" / "ckpt_latest.pt"], "ckpt_latest.pt"),
        ("05_evaluate", ["--out_dir", d, "--students", f"x={d / 'distill' / 'ckpt_latest.pt'}"], "ckpt_latest.pt"),
        ("03_ode_distill", ["--out_dir", d, "--run_name", "wrong", "--resume"], "ckpt_latest.pt"),
    ]
    os.makedirs(d / "wrong")  # its ckpt_latest.pt is a student file
    shutil.copy(s1, d / "wrong" / "ckpt_latest.pt")
    # the same run with one file corrupted at a time
    for target, script, argv in [
        (d / "pairs" / "manifest.json", "03_ode_distill", ["--out_dir", d]),
        (d / "pairs" / "manifest.json", "01_make_pairs", ["--out_dir", d, "--num_pairs", 8, "--shard_size", 4, "--num_steps", 4]),
        (d / "pairs" / "shard_000001.safetensors", "03_ode_distill", ["--out_dir", d]),
        (d / "pairs" / "shard_000001.safetensors", "01_make_pairs", ["--out_dir", d, "--num_pairs", 8, "--shard_size", 4,
                                                                      "--num_steps", 4]),
        (lp, "03_ode_distill", ["--out_dir", d]),
        (lp, "02_train_latent_lpips", ["--out_dir", d, "--reconstruct"]),
        (s1, "04_gan_finetune", ["--out_dir", d]),
        (d / "distill" / "ckpt_latest.pt", "03_ode_distill", ["--out_dir", d, "--resume"]),
        (s1, "05_evaluate", ["--out_dir", d]),
        (d / "eval" / "toy_classifier.pt", "05_evaluate", ["--out_dir", d]),
    ]:
        cases.append((script, argv, target))
    shown = []
    for script, argv, name in cases:
        if isinstance(name, os.PathLike):  # corrupt this file, in a fresh copy of the run
            fresh = copy_run(toy_run, tmp_path / f"c{len(os.listdir(tmp_path))}")
            target = fresh / os.path.relpath(name, d)
            os.makedirs(target.parent, exist_ok=True)
            corrupt(target)
            argv = [fresh if a == d else a for a in argv]
            name = os.path.basename(target)
        line = stops(script, argv, capsys)
        shown.append(f"{script} ... {name}\n    -> {line[:150]}")
        assert name in line, (script, argv, line)
    if request.config.getoption("capture") == "no":  # -s: show every stop's message
        with capsys.disabled():
            print("\n" + "\n".join(shown))


def test_no_traceback_from_the_command_line(tmp_path):
    """The same stops as a user sees them: exit status non-zero, one error line, no traceback."""
    for script, argv in [("03_ode_distill.py", ["--batch", 0]), ("01_make_pairs.py", ["--cfg_range", "abc"]),
                         ("05_evaluate.py", ["--out_dir", tmp_path, "--students", "x=missing.pt"])]:
        p = run_script(script, *argv, check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert len([l for l in p.stderr.splitlines() if "error:" in l]) == 1, p.stderr


def test_manifest_decides_what_the_teacher_fixed(toy_run, capsys):
    """03/04 take the teacher's steps and guidance from the pairs' manifest and say so."""
    m = json.load(open(toy_run / "pairs" / "manifest.json"))
    cfg = mod("03_ode_distill").get_config(["--out_dir", str(toy_run)])
    C.training_setup(cfg, 1, torch.device("cpu"))
    out = capsys.readouterr().out
    assert cfg["num_steps"] == m["num_steps"] == 4 and f"from the pairs' manifest: num_steps 4, guidance {m['guidance']}" in out


def test_common_holds_only_shared_names():
    """Every top-level name of common.py is used by two or more scripts,
    directly (C.name) or through another common.py name they use; no script imports
    another."""
    import ast
    src = open(os.path.join(REPO, "common.py")).read()
    names = {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = ast.get_source_segment(src, node)
        elif isinstance(node, ast.Assign):
            names.update({t.id: ast.get_source_segment(src, node) for t in node.targets if isinstance(t, ast.Name)})
    uses = {n: {m for m in names if m != n and re.search(r"(?<![\w.])" + re.escape(m) + r"\b", body)} for n, body in names.items()}
    users = {n: set() for n in names}
    for script in SCRIPTS:
        text = open(os.path.join(REPO, script + ".py")).read()
        assert not re.search(r"import_module\(\s*[\"']0\d_|^import 0\d_|^from 0\d_", text, re.M), f"{script} imports a script"
        todo, seen = set(re.findall(r"\bC\.(\w+)", text)) & set(names), set()
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo |= uses[n]
        for n in seen:
            users[n].add(script)
    single = {n: sorted(u) for n, u in users.items() if len(u) < 2}
    assert not single, f"common.py names used by fewer than two scripts: {single}"


def test_checkpoint_that_does_not_fit_is_refused():
    """Resume goes through full state dicts (DDP and FSDP alike); another
    model's weights, or an optimiser state keyed the pre-FSDP way, stop the run with
    one line naming the checkpoint."""
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    sd, osd = C.full_state(m, opt)
    C.load_full_state(m, sd, opt, osd)  # the round trip loads
    with pytest.raises(SystemExit, match=r"checkpoint 'x.pt' does not fit this run's Sequential.*size mismatch"):
        C.load_full_state(m, dict(sd, **{"0.weight": torch.zeros(5, 5)}), what="checkpoint 'x.pt'")
    with pytest.raises(SystemExit, match=r"or its optimiser: KeyError"):
        C.load_full_state(m, sd, opt, opt.state_dict())  # keyed by index (the optimiser's own layout)


def test_resume_survives_a_metrics_line_cut_by_a_kill(tmp_path):
    """metrics.jsonl is appended to, so a kill can leave its last line cut short; --resume
    from checkpoint N (steps 0..N-1 done) keeps the lines before step N, which the resumed
    run makes again, and drops the torn one instead of stopping."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 10, "loss": 0.5}\n{"step": 20, "loss": 0.25}\n{"step": 30, "lo')
    log = C.MetricsLog(str(path), resume_step=20)
    log.write(step=20, loss=0.2)
    assert [json.loads(l)["step"] for l in open(path)] == [0, 10, 20]
    assert json.loads(open(path).readlines()[-1])["loss"] == 0.2  # step 20 of the resumed run, once
    path.write_text('{"step": 0, "loss": 1.0}')  # whole, but its newline was not written
    C.MetricsLog(str(path), resume_step=5).write(step=6, loss=0.9)
    assert [json.loads(l)["step"] for l in open(path)] == [0, 6]


def test_reconstruct_replaces_an_unreadable_metrics_file(toy_run, tmp_path):
    d = copy_run(toy_run, tmp_path / "run")
    (d / "lpips" / "metrics.json").write_text("{")
    p = run_script("02_train_latent_lpips.py", "--out_dir", d, "--reconstruct", "--recon_steps", 2)
    assert "is unreadable" in p.stdout and json.load(open(d / "lpips" / "metrics.json"))


PATH_FLAGS = {s: [n for n, d, k, _ in flags(s) if k is None and not isinstance(d, bool) and n != "run_name"] for s in SCRIPTS}
TRUSTED = ("student_ema.pt", "ckpt_latest.pt", "latent_lpips.pt", "classifier.pt", "manifest.json", ".safetensors", ".png")


def tree(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_bad_input_by_class(toy_run, tmp_path, capsys):
    """Every path flag of every script, given a path of the wrong kind (a file where a folder
    goes, or the reverse); text that is not UTF-8; a NaN or infinity in what is read (pairs,
    checkpoints, LatentLPIPS weights, students), named with its file (and shard and row); a
    file of the wrong kind or truncated. Each stops with one `error:` line naming the flag or
    the file and the cause, and writes nothing a rerun would trust (no file changes, and
    nothing new but a run's config.json and metrics.jsonl)."""
    from safetensors.torch import load_file, save_file
    d, t = copy_run(toy_run, tmp_path / "run"), tmp_path / "bad"
    os.makedirs(t / "adir")
    afile = t / "afile.txt"
    afile.write_text("x\n")
    s1, lp = d / "distill" / "student_ema.pt", d / "lpips" / "latent_lpips.pt"
    (t / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    os.makedirs(t / "coco" / "annotations")
    (t / "coco" / "annotations" / "captions_val2014.json").write_bytes(b'{"images": [], "annotations": [{"caption": "\xe9"}]}')
    shutil.copytree(d / "pairs", t / "latin_pairs")
    m = t / "latin_pairs" / "manifest.json"
    m.write_bytes(m.read_bytes().replace(b'"toy"', b'"t\xe9y"', 1))

    def poisoned(src, dst, part, key=None):  # a copy of a torch file with one tensor of `part` set to NaN
        ck = torch.load(src, weights_only=False)
        key = key or next(k for k, v in ck[part].items() if torch.is_tensor(v) and v.is_floating_point())
        ck[part][key] = ck[part][key].float().fill_(float("nan"))
        torch.save(ck, dst)
        return dst
    poisoned(s1, t / "nan_student.pt", "ema")
    poisoned(lp, t / "nan_lpips.pt", "state_dict")
    os.makedirs(d / "nan_resume")
    poisoned(d / "distill" / "ckpt_latest.pt", d / "nan_resume" / "ckpt_latest.pt", "model")
    shutil.copytree(d / "pairs", t / "nan_pairs")
    shard = C.shard_path(t / "nan_pairs", 1)
    x = load_file(shard)
    x["x"][2] = float("inf")
    save_file(x, shard)
    shutil.copytree(d / "pairs", t / "short_pairs")
    whole = open(C.shard_path(d / "pairs", 1), "rb").read()
    open(C.shard_path(t / "short_pairs", 1), "wb").write(whole[:len(whole) // 2])
    open(t / "short_student.pt", "wb").write(open(s1, "rb").read()[:os.path.getsize(s1) // 2])
    import numpy as np
    np.savez(t / "nan_ref.npz", mu=np.full(4, np.nan), sigma=np.eye(4))
    o = lambda name: ["--out_dir", t / name]  # a fresh output folder
    run = ["--out_dir", d]
    cases = [  # (class, script, argv, what the line must name)
        ("kind", "01_make_pairs", ["--out_dir", afile], "--out_dir"),
        ("kind", "02_train_latent_lpips", ["--out_dir", afile], "--out_dir"),
        ("kind", "03_ode_distill", ["--out_dir", afile], "--out_dir"),
        ("kind", "04_gan_finetune", ["--out_dir", afile], "--out_dir"),
        ("kind", "05_evaluate", ["--out_dir", afile], "--out_dir"),
        ("kind", "01_make_pairs", [*o("o1"), "--teacher", t / "adir"], "--teacher"),
        ("kind", "02_train_latent_lpips", [*o("o2"), "--teacher", t / "adir"], "--teacher"),
        ("kind", "03_ode_distill", [*run, "--teacher", t / "adir"], "--teacher"),
        ("kind", "04_gan_finetune", [*run, "--teacher", t / "adir"], "--teacher"),
        ("kind", "05_evaluate", [*run, "--teacher", t / "adir"], "--teacher"),
        ("kind", "02_train_latent_lpips", ["--preset", "sd15", "--images", afile, "--bapps", t / "adir"], "--images"),
        ("kind", "02_train_latent_lpips", [*o("o3"), "--bapps", afile], "--bapps"),
        ("kind", "03_ode_distill", [*run, "--pairs", afile], "--pairs"),
        ("kind", "04_gan_finetune", [*run, "--pairs", afile], "--pairs"),
        ("kind", "03_ode_distill", [*run, "--lpips_ckpt", t / "adir"], "--lpips_ckpt"),
        ("kind", "04_gan_finetune", [*run, "--lpips_ckpt", t / "adir"], "--lpips_ckpt"),
        ("kind", "04_gan_finetune", [*run, "--init", t / "adir"], "--init"),
        ("kind", "04_gan_finetune", ["--preset", "toy_sd", *run, "--export", afile], "--export"),
        ("kind", "05_evaluate", [*run, "--students", f"x={t / 'adir'}"], "a folder, not a file"),
        ("kind", "05_evaluate", [*run, "--classifier", t / "adir"], "--classifier"),
        ("kind", "05_evaluate", ["--preset", "sd15", "--coco", afile], "--coco"),
        ("kind", "05_evaluate", ["--preset", "cifar10", "--teacher", afile, "--fid_ref", afile], "--fid_ref"),
        ("utf-8", "01_make_pairs", ["--preset", "sd15", "--prompts", t / "latin1.txt"], "latin1.txt' is unreadable: UnicodeDecodeError"),
        ("utf-8", "03_ode_distill", [*run, "--pairs", t / "latin_pairs"], "manifest.json' is corrupt: UnicodeDecodeError"),
        ("utf-8", "05_evaluate", ["--preset", "sd15", "--coco", t / "coco"], "captions_val2014.json' is not a COCO"),
        ("finite", "03_ode_distill", [*run, "--pairs", t / "nan_pairs", "--run_name", "nanp", "--steps", 1, "--batch", 8,
                                      "--batch_per_device", 8], "shard_000001.safetensors' row 2 holds a non-finite"),
        ("finite", "04_gan_finetune", [*run, "--init", t / "nan_student.pt"], "nan_student.pt': 'net."),
        ("finite", "05_evaluate", [*run, "--students", f"x={t / 'nan_student.pt'}", "--num_steps", 4], "nan_student.pt': 'net."),
        ("finite", "03_ode_distill", [*run, "--lpips_ckpt", t / "nan_lpips.pt"], "nan_lpips.pt': 'net."),
        ("finite", "03_ode_distill", [*run, "--run_name", "nan_resume", "--resume", "--allow_config_change"], "ckpt_latest.pt' [model]"),
        ("finite", "05_evaluate", ["--preset", "cifar10", "--teacher", afile, "--fid_ref", t / "nan_ref.npz"], "not a finite"),
        ("file", "03_ode_distill", [*run, "--lpips_ckpt", s1], "is neither our LatentLPIPS checkpoint nor an official"),
        ("file", "04_gan_finetune", [*run, "--init", lp], "latent_lpips.pt"),
        ("file", "04_gan_finetune", [*run, "--init", t / "short_student.pt"], "short_student.pt' is unreadable"),
        ("file", "03_ode_distill", [*run, "--pairs", t / "short_pairs"], "corrupt pair shard"),
        ("file", "05_evaluate", [*run, "--students", f"x={C.shard_path(d / 'pairs', 0)}"], "is not a student"),
        ("file", "05_evaluate", [*run, "--classifier", s1], "toy classifier"),
        ("file", "01_make_pairs", [*o("o4"), "--teacher", s1], "toy teacher"),
    ]
    for script in SCRIPTS:  # the table covers every path flag of every script
        named = {a[2:] for c in cases if c[1] == script for a in map(str, c[2]) if a.startswith("--")}
        assert set(PATH_FLAGS[script]) - {"students", "prompts"} <= named, (script, set(PATH_FLAGS[script]) - named)
    shown = []
    for kind, script, argv, expect in cases:
        before = {**tree(d), **tree(t)}
        line = stops(script, argv, capsys)
        shown.append(f"{kind:6} {script} {' '.join(map(str, argv))[-60:]}\n       -> {line[:140]}")
        assert expect in line, (script, argv, line)
        after = {**tree(d), **tree(t)}
        changed = [p for p in before if after.get(p) != before[p]]
        new = [p for p in set(after) - set(before) if p.endswith(TRUSTED)]
        assert not changed and not new, (script, argv, changed, new)
    print("\n".join(shown))
