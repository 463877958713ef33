"""LatentLPIPS / E-LatentLPIPS properties, the official checkpoint
layout, and bad input."""
import pytest
import torch
import torch.nn as nn

import common as C
from conftest import run_script


@pytest.fixture(scope="module")
def lp():
    torch.manual_seed(0)
    m = C.LatentLPIPS(4, 0.25, 3, 10)
    for lin in m.lins:  # non-uniform heads, as after calibration
        lin.weight.uniform_(0, 1)
    return m


@pytest.mark.parametrize("mode", ["mse", "huber", "latent", "elatent", "elatent+latent", "elatent+latent/2"])
def test_zero_nonneg_symmetric(lp, mode):
    loss = C.RegressionLoss(mode, lp, "bgc+cutout")
    a, b = torch.randn(6, 4, 16, 16), torch.randn(6, 4, 16, 16)
    torch.manual_seed(1)
    assert torch.allclose(loss(a, a), torch.zeros(6), atol=1e-6)  # d(x, x) = 0, also under augmentation
    torch.manual_seed(2)
    dab = loss(a, b)
    torch.manual_seed(2)
    dba = loss(b, a)
    assert (dab >= 0).all() and (dab > 0).all()
    assert torch.allclose(dab, dba, rtol=1e-5, atol=1e-6)  # symmetric for the same draw of T


def test_same_augmentation_reaches_both_inputs(lp):
    loss = C.RegressionLoss("elatent", lp, "bg+cutout")
    x = torch.randn(8, 4, 16, 16)
    for seed in range(5):  # identical pairs give zero whatever T is drawn
        torch.manual_seed(seed)
        assert loss(x, x.clone()).abs().max() < 1e-6
    torch.manual_seed(0)
    assert (loss(x, x.flip(3)) > 1e-3).all()  # a flip of one input is seen
    aug = C.Augment("bgc+cutout")
    a, b = aug(x, x.clone())
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_unknown_augment_letter():
    """--lpips_augment's type refuses what is not an augmentation (argparse names the flag)."""
    import argparse
    for bad in ("bgx", "bg+mixup", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="must be the letters b, g, c, o"):
            C.AUGMENT(bad)
    assert C.augment_letters("bgc+cutout") == "bgco" and C.augment_letters("bg") == "bg"


def test_frozen_and_always_eval(lp):
    parent = nn.Sequential(nn.Conv2d(4, 4, 1), lp)
    x, y = torch.randn(4, 4, 16, 16), torch.randn(4, 4, 16, 16)
    before = lp(x, y)
    stats = [b.clone() for b in lp.buffers()]
    parent.train()
    assert not lp.training and all(not m.training for m in lp.modules())
    after = lp(x, y)
    assert torch.equal(before, after)
    assert all(torch.equal(s, b) for s, b in zip(stats, lp.buffers()))  # no BatchNorm update leaked
    xg = x.clone().requires_grad_(True)
    C.RegressionLoss("elatent", lp, "bgc+cutout")(xg, y).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lp.parameters())


def _to_official(sd):
    """Our state dict written in the official elatentlpips layout (net.sliceK.i.*,
    lin{k}.model.1.weight and the duplicate lins.{k}.model.1.weight)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("net.slices."):
            _, _, s, rest = k.split(".", 3)
            out[f"net.slice{int(s) + 1}.{rest}"] = v
        elif k.startswith("lins."):
            i = k.split(".")[1]
            out[f"lin{i}.model.1.weight"] = v
            out[f"lins.{i}.model.1.weight"] = v
    return out


def full_width_calibrated():
    """The paper's full-width 4-channel LatentLPIPS with non-uniform heads and BatchNorm
    statistics, as after training and calibration (random, seeded)."""
    torch.manual_seed(0)
    lp = C.LatentLPIPS(4, 1.0, 3)
    for lin in lp.lins:
        lin.weight.uniform_(0, 1)
    for m in lp.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    return lp


SD15_SPACE, SDXL_SPACE = C.latent_space("ldm", 4, 0.18215), C.latent_space("ldm", 4, 0.13025)


def test_official_checkpoint_layout(tmp_path):
    ours = full_width_calibrated()
    official = _to_official(ours.state_dict())
    assert "net.slice4.33.weight" not in official and "net.slice5.34.weight" in official  # torchvision indices
    torch.save(official, tmp_path / "sd15_latest_vgg16_tuned.pth")
    loaded = C.load_latent_lpips(str(tmp_path / "sd15_latest_vgg16_tuned.pth"), in_ch=4, space=SD15_SPACE)
    x, y = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    assert torch.allclose(loaded(x, y), ours(x, y), rtol=1e-6)
    # an official file's latent space is its name's: SD1.5's is refused for SDXL, and a renamed file for either
    with pytest.raises(SystemExit, match="trained on .*0.18215"):
        C.load_latent_lpips(str(tmp_path / "sd15_latest_vgg16_tuned.pth"), in_ch=4, space=SDXL_SPACE)
    torch.save(official, tmp_path / "my_lpips.pth")
    with pytest.raises(SystemExit, match="name says its latent space"):
        C.load_latent_lpips(str(tmp_path / "my_lpips.pth"), in_ch=4, space=SD15_SPACE)
    # an SD3-style 16-channel checkpoint given to a 4-channel space
    sd3 = dict(official)
    sd3["net.slice1.0.weight"] = torch.randn(64, 16, 3, 3)
    torch.save(sd3, tmp_path / "sd3_latest_vgg16_tuned.pth")
    with pytest.raises(SystemExit, match="16-channel inputs but this space has 4 channels"):
        C.load_latent_lpips(str(tmp_path / "sd3_latest_vgg16_tuned.pth"), in_ch=4)


def lpips_script():
    import importlib
    return importlib.import_module("02_train_latent_lpips")


def test_bad_folders(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(SystemExit, match="no images found"):
        lpips_script().image_folder(str(tmp_path / "imgs"))
    sub = tmp_path / "bapps" / "2afc" / "train" / "traditional"
    for part in ("ref", "p0", "judge"):
        (sub / part).mkdir(parents=True)
    cfg = dict(bapps=str(tmp_path / "bapps"), family="edm", resolution=16)
    with pytest.raises(SystemExit, match="missing its 'p1' folder"):
        lpips_script().load_bapps(cfg, "train", torch.device("cpu"))


def test_bapps_layout_loads(tmp_path):
    """A 2-triplet BAPPS tree in the real layout loads into the toy space."""
    import numpy as np
    from PIL import Image
    sub = tmp_path / "bapps" / "2afc" / "val" / "cnn"
    for part in ("ref", "p0", "p1", "judge"):
        (sub / part).mkdir(parents=True)
    for i in range(2):
        for part in ("ref", "p0", "p1"):
            Image.fromarray(np.full((64, 64, 3), 40 * i + 10, np.uint8)).save(sub / part / f"{i:06d}.png")
        np.save(sub / "judge" / f"{i:06d}.npy", np.array([0.25 * (i + 1)]))
    ref, p0, p1, j = lpips_script().load_bapps(dict(bapps=str(tmp_path / "bapps"), family="edm", resolution=16), "val", torch.device("cpu"))
    assert ref.shape == (2, 3, 16, 16) and torch.allclose(j, torch.tensor([0.25, 0.5], dtype=j.dtype))
    # a corrupt image, then a corrupt judgment: one error line naming the file
    args = (dict(bapps=str(tmp_path / "bapps"), family="edm", resolution=16), "val", torch.device("cpu"))
    (sub / "p0" / "000001.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="000001.png"):
        lpips_script().load_bapps(*args)
    (sub / "judge" / "000000.npy").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="000000.npy"):
        lpips_script().load_bapps(*args)


def test_02_toy_smoke(tmp_path):
    """Phase 1 classifies the toy's shapes (10 steps: OneCycleLR's degenerate case of
    a 1-step warm-up); phase 2's heads, fitted to the judgments, agree with them
    better than the plain sum and than L2, and are reported per distortion kind."""
    p = run_script("02_train_latent_lpips.py", "--out_dir", tmp_path, "--cls_steps", 10, "--num_triplets", 1000,
                   "--cal_steps", 400)
    ck = torch.load(tmp_path / "lpips" / "latent_lpips.pt", weights_only=True)
    m = ck["metrics"]
    assert m["two_afc_calibrated"] > m["two_afc_uncalibrated"] + 0.01 and m["two_afc_calibrated"] > m["two_afc_l2"] + 0.01, m
    assert list(m["top1_by_head"]) == ["shape"] and m["top1"] == m["top1_by_head"]["shape"]
    assert ck["config"]["num_classes"] == 10
    by_kind = m["two_afc_by_kind"]
    assert list(by_kind) == list(lpips_script().DISTORTIONS) and all(0 < a["calibrated"] < 1 for a in by_kind.values())
    assert "2AFC agreement by distortion kind" in p.stdout and "background" in p.stdout
    lp = C.load_latent_lpips(str(tmp_path / "lpips" / "latent_lpips.pt"), in_ch=3)
    assert all((l.weight >= 0).all() for l in lp.lins)
    assert "phase 1: held-out top-1 shape" in p.stdout
    # phase 1's classifier is saved on its own; phase 2 reruns without phase 1
    assert (tmp_path / "lpips" / "classifier.pt").is_file()
    p = run_script("02_train_latent_lpips.py", "--out_dir", tmp_path, "--num_triplets", 300, "--cal_steps", 10,
                   "--calibrate_only")
    assert "phase 2 only" in p.stdout and "phase 1:" not in p.stdout
    m2 = torch.load(tmp_path / "lpips" / "latent_lpips.pt", weights_only=True)["metrics"]
    assert m2["top1"] == m["top1"] and m2["top1_by_head"] == m["top1_by_head"]


def test_each_distortion_touches_what_it_names():
    """The synthetic 2AFC's kinds on toy_sd scenes: strength 0 is the identity, the
    change grows with the strength, a hue turn keeps the grey background and changes
    the shape's colour, a background change keeps the shape."""
    M = lpips_script()
    x, _, _ = C.toy_scene(range(16))
    bg = M._background(x)
    assert 0.4 < bg.mean() < 0.98  # the shapes cover part of each image, the rest is found as background
    for k, name in enumerate(M.DISTORTIONS):
        d = [(M.toy_distort(x, k, torch.full((16,), s), torch.Generator().manual_seed(0)) - x).pow(2).mean().item()
             for s in (0.0, 0.5, 1.0)]
        assert d[0] < 1e-10 and d[0] < d[1] < d[2], (name, d)
    hue = M.toy_distort(x, M.DISTORTIONS.index("hue"), torch.ones(16), torch.Generator().manual_seed(0))
    change = (hue - x).abs().amax(1, keepdim=True)
    grey = M._background(x, tol=1e-3)  # the background proper, without the shapes' anti-aliased rims
    assert (change * grey).amax() < 1e-5 and (change * (1 - bg)).amax((1, 2, 3)).min() > 0.3  # greys stay, colours turn
    back = M.toy_distort(x, M.DISTORTIONS.index("background"), torch.ones(16), torch.Generator().manual_seed(0))
    change = (back - x).abs().amax(1, keepdim=True)
    assert (change * (1 - bg)).amax() < 1e-6 and (change * bg).amax((1, 2, 3)).min() > 0.7


def test_two_afc_by_kind_counts_a_kind_on_either_side():
    """calibrate's per-kind rows: the held-out triplets with that kind as p0's or p1's."""
    M = lpips_script()
    torch.manual_seed(0)
    lp = C.LatentLPIPS(3, 0.25, 2, 4)
    train, val = M.toy_triplets(64, 1), M.toy_triplets(64, 2)
    res = M.calibrate(lp, train[:4], val[:4], dict(cal_steps=2), torch.device("cpu"), val[4])
    ref, p0, p1, judge, kinds = val
    for k, name in enumerate(M.DISTORTIONS):
        m = (kinds[:, 0] == k) | (kinds[:, 1] == k)
        l2 = M.two_afc((ref - p0)[m].pow(2).mean((1, 2, 3)), (ref - p1)[m].pow(2).mean((1, 2, 3)), judge[m])
        assert res["two_afc_by_kind"][name]["l2"] == pytest.approx(l2), name


def test_02_phase1_stopped_and_resumed_equals_straight(tmp_path):
    """Phase 1 (days at SD scale) saves a resumable state: stopped by --max_steps_this_run
    and continued with --resume, it gives the straight run's classifier exactly; a
    changed setting is refused, naming it."""
    base = ["--cls_steps", 12, "--cls_ckpt_every", 4, "--num_triplets", 100, "--cal_steps", 5]
    run_script("02_train_latent_lpips.py", "--out_dir", tmp_path / "a", *base)
    p = run_script("02_train_latent_lpips.py", "--out_dir", tmp_path / "b", *base, "--max_steps_this_run", 6)
    assert "stopped early" in p.stdout and not (tmp_path / "b" / "lpips" / "classifier.pt").exists()
    assert torch.load(tmp_path / "b" / "lpips" / "classifier_latest.pt", weights_only=False)["step"] == 6
    p = run_script("02_train_latent_lpips.py", "--out_dir", tmp_path / "b", *base, "--resume")
    assert "resumed from" in p.stdout and "at step 6" in p.stdout
    a, b = (torch.load(tmp_path / r / "lpips" / "classifier.pt", weights_only=True)["state_dict"] for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    p = run_script("02_train_latent_lpips.py", "--out_dir", tmp_path / "b", *base, "--resume", "--cls_lr", 1e-3, check=False)
    assert p.returncode != 0 and "cls_lr" in p.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_02_phase1_resume_under_torchrun(tmp_path):
    """The same under torchrun with 2 processes (DDP; each rank's sampling generator is
    saved and restored): stopped and resumed equals straight."""
    base = ["--cls_steps", 8, "--cls_batch", 16, "--cls_ckpt_every", 4, "--num_triplets", 100, "--cal_steps", 5]
    run_script("02_train_latent_lpips.py", "--out_dir", tmp_path / "a", *base, torchrun=2)
    run_script("02_train_latent_lpips.py", "--out_dir", tmp_path / "b", *base, "--max_steps_this_run", 3, torchrun=2)
    assert len(torch.load(tmp_path / "b" / "lpips" / "classifier_latest.pt", weights_only=False)["rng"]) == 2
    run_script("02_train_latent_lpips.py", "--out_dir", tmp_path / "b", *base, "--resume", torchrun=2)
    a, b = (torch.load(tmp_path / r / "lpips" / "classifier.pt", weights_only=True)["state_dict"] for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _image_tree(root, classes=2, per_class=4, size=24):
    import numpy as np
    from PIL import Image
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = np.random.RandomState(10 * c + i).randint(0, 255, (size, size + 4, 3)).astype(np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")


def _bapps_tree(root, n=3):
    import numpy as np
    from PIL import Image
    for split in ("train", "val"):
        sub = root / "2afc" / split / "traditional"
        for part in ("ref", "p0", "p1", "judge"):
            (sub / part).mkdir(parents=True)
        for i in range(n):
            for part in ("ref", "p0", "p1"):
                Image.fromarray(np.random.RandomState(i).randint(0, 255, (64, 64, 3)).astype(np.uint8)).save(sub / part / f"{i:06d}.png")
            np.save(sub / "judge" / f"{i:06d}.npy", np.array([i / n]))


def test_02_sd_path(tiny_sd15, tmp_path):
    """Phase 1 on VAE latents of an ImageFolder (cached in shards, reused by a
    rerun), phase 2 on a BAPPS-layout tree; and SD without --bapps is refused."""
    _image_tree(tmp_path / "imgs")
    _bapps_tree(tmp_path / "bapps")
    args = ["--preset", "sd15", "--teacher", tiny_sd15, "--images", tmp_path / "imgs", "--image_size", 16,
            "--cls_steps", 3, "--cls_batch", 4, "--cal_steps", 5, "--val_frac", 0.25, "--out_dir", tmp_path / "run",
            "--lpips_width", 0.125]
    run_script("02_train_latent_lpips.py", *args, "--bapps", tmp_path / "bapps")
    lp = C.load_latent_lpips(str(tmp_path / "run" / "lpips" / "latent_lpips.pt"), in_ch=4, space=SD15_SPACE)
    assert lp.config["in_ch"] == 4 and lp.config["num_classes"] == 2
    # it records its latent space, so SDXL (4 channels too, another VAE) refuses it (App. B)
    with pytest.raises(SystemExit, match="trained on .*0.18215.* but this teacher's space is .*0.13025"):
        C.load_latent_lpips(str(tmp_path / "run" / "lpips" / "latent_lpips.pt"), in_ch=4, space=SDXL_SPACE)
    cache = tmp_path / "run" / "lpips" / "latents" / "shard_000000.safetensors"
    assert C.load_shard(str(cache))["x"].shape == (8, 4, 8, 8)
    mtime = cache.stat().st_mtime_ns
    p = run_script("02_train_latent_lpips.py", *args, check=False)  # no --bapps for an SD space
    assert p.returncode != 0 and "needs 2AFC judgments" in p.stderr and cache.stat().st_mtime_ns == mtime
    # a wrong --bapps stops the run before phase 1 trains (hours at SD scale)
    (tmp_path / "run" / "lpips" / "classifier.pt").unlink()
    p = run_script("02_train_latent_lpips.py", *args, "--bapps", tmp_path / "nope", check=False)
    assert p.returncode != 0 and "BAPPS folder" in p.stderr and "phase 1:" not in p.stdout
    assert not (tmp_path / "run" / "lpips" / "classifier.pt").exists()
    # a corrupt latent-cache manifest stops the rerun, naming it
    (tmp_path / "run" / "lpips" / "latents" / "manifest.json").write_text("{")
    p = run_script("02_train_latent_lpips.py", *args, "--bapps", tmp_path / "bapps", check=False)
    assert p.returncode != 0 and "manifest.json" in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr


def test_augmentation_distributions_match_the_official_formulas():
    """Each parameter's moments over many draws against the official
    E-LatentLPIPS (StyleGAN2-ADA port) formulas, at a 64x64 latent."""
    import math
    torch.manual_seed(0)
    n, H = 200_000, 64
    p = C.Augment("bgco").draw(n, H, H, torch.device("cpu"))
    close = lambda t, mean, std, tol=0.02: abs(t.float().mean().item() - mean) < tol * max(std, 1) and \
        abs(t.float().std().item() - std) < tol * std
    u_std = lambda a, b: (b - a) / math.sqrt(12)
    assert close(p["flip"], 0.5, 0.5) and set(p["rot90"].unique().tolist()) == {0, 1, 2, 3}
    s = p["shift"].float()  # integer translation: round(U(-0.125, 0.125) * 64), within +-8 px
    assert s.abs().max() == 8 and torch.equal(s, s.round()) and close(s, 0, u_std(-8, 8), 0.03)
    assert close(torch.log2(p["scale"]), 0, 0.2) and close(torch.log2(p["aniso"]), 0, 0.2)   # 2^N(0, 0.2)
    for r in ("rot1", "rot2"):                                                                 # U(-pi, pi), twice
        assert close(p[r], 0, u_std(-math.pi, math.pi)) and p[r].abs().max() <= math.pi
    assert close(p["frac"] / H, 0, 0.125)                                                      # N(0, 0.125) * size
    assert close(p["bright"], 0, u_std(-0.5, 0.5)) and p["bright"].abs().max() <= 0.5           # + U(-0.5, 0.5)
    assert close(p["sat"], 1, u_std(0, 2)) and p["sat"].min() >= 0 and p["sat"].max() <= 2     # x U(0, 2)
    assert close(p["con"], 1, u_std(0.5, 1.5)) and p["con"].min() >= 0.5                       # x U(0.5, 1.5)
    assert close(p["centre"], 0.5, u_std(0, 1))
    # both spellings select the same transforms
    for a, b in (("bgco", "bgc+cutout"), ("bgo", "bg+cutout")):
        assert vars(C.Augment(a)) | {"spec": 0} == vars(C.Augment(b)) | {"spec": 0}


def test_blit_translation_reflects_instead_of_wrapping():
    """Blit's integer translation pads by reflection, as the official augmentation does (no wrap-around)."""
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = C._blit(x, torch.tensor([False]), torch.tensor([0]), torch.tensor([[0, 1]]))
    assert torch.equal(out[0, 0, :, 1:], x[0, 0, :, :3]) and torch.equal(out[0, 0, :, 0], x[0, 0, :, 1])


def test_ensemble_is_the_sum_or_the_average(lp):
    """E-LatentLPIPS* (Table A1): elatent+latent is the sum of both terms (the code's reading);
    elatent+latent/2 their average, the other reading."""
    a, b = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    parts = []
    for mode in ("elatent", "latent", "elatent+latent", "elatent+latent/2"):
        torch.manual_seed(3)  # the same augmentation draw in each
        parts.append(C.RegressionLoss(mode, lp)(a, b))
    assert torch.allclose(parts[2], parts[0] + parts[1]) and torch.allclose(parts[3], (parts[0] + parts[1]) / 2)


def test_cifar10_pixel_lpips_sees_224_px(monkeypatch):
    """CIFAR10's pixel LPIPS upsamples 32 px to 224 first (the preset's lpips_resize), as
    Consistency Models do; other presets give LPIPS the images at their own size."""
    import types
    seen = []
    monkeypatch.setattr(C, "load_pixel_lpips", lambda device: lambda a, b: seen.append(a.shape[-2:]) or (a - b).pow(2).mean((1, 2, 3)))
    edm = types.SimpleNamespace(family="edm", z_shape=(3, 32, 32))
    for preset, size in [("cifar10", (224, 224)), ("toy", (32, 32))]:
        cfg = dict(C.get_preset(preset), loss="lpips", lpips_ckpt=None, benchmark_steps=0, out_dir="unused")
        C.build_loss(cfg, edm, torch.device("cpu"))(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
        assert seen.pop() == size


def test_official_l1_term_is_off_by_default(lp):
    a, b = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    base, with_l1 = C.RegressionLoss("latent", lp), C.RegressionLoss("latent+l1", lp)
    assert torch.allclose(with_l1(a, b) - base(a, b), (a - b).abs().mean((1, 2, 3)))


def test_fig4_benchmark_runs_and_the_latent_loss_is_cheaper():
    """02 --speed (Fig. 4), on CPU at a small latent: both losses run forward and
    backward, and decode + pixel LPIPS costs more time than E-LatentLPIPS."""
    import importlib
    res = importlib.import_module("02_train_latent_lpips").benchmark_lpips_speed(torch.device("cpu"), repeats=1, latent_size=8)
    assert res["e_latent_lpips"]["ms"] > 0 and res["time_ratio"] > 2, res


def test_pixel_lpips_mode_decodes_both_inputs_first():
    """--loss lpips (Table 1's baseline): the pixel network sees decode(G) and decode(x);
    without a decoder (a pixel-space teacher) it sees them as they are."""
    pixel = lambda a, b: (a - b).abs().mean((1, 2, 3))
    decode = lambda z: torch.cat([z, z.flip(1)], 1) * 3 + 1
    a, b = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(C.RegressionLoss("lpips", decode=decode, pixel_lpips=pixel)(a, b), pixel(decode(a), decode(b)))
    assert torch.equal(C.RegressionLoss("lpips", pixel_lpips=pixel)(a, b), pixel(a, b))
    l1 = C.RegressionLoss("lpips+l1", decode=decode, pixel_lpips=pixel)(a, b)
    assert torch.allclose(l1, pixel(decode(a), decode(b)) + (a - b).abs().mean((1, 2, 3)))


def test_latent_lpips_equals_the_official_package(monkeypatch):
    """Our LatentLPIPS against the official `elatentlpips` package (its distance without
    augmentation and without its L1 term), at the paper's full width, with the same
    weights in the official layout. Skipped where the package is not installed; it needs
    torchvision only to build its VGG, which a stand-in in tests/ provides here."""
    import importlib
    import os
    import sys
    pytest.importorskip("scipy")  # the package's augmentation module imports it
    standin = os.path.join(os.path.dirname(__file__), "standins")
    if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("pkg_resources") is None:
        monkeypatch.syspath_prepend(standin)
    try:
        official = pytest.importorskip("elatentlpips")
        spec = importlib.util.spec_from_file_location("standin_models", os.path.join(standin, "torchvision", "models.py"))
        tv = importlib.util.module_from_spec(spec)  # the stand-in's vgg16_bn, built in the latent layout below
        spec.loader.exec_module(tv)
        monkeypatch.setattr(tv, "in_ch", 4)
        monkeypatch.setattr(tv, "pools_removed", 3)
        monkeypatch.setattr(importlib.import_module("elatentlpips.vgg16"), "tv", tv)
        theirs = official.ELatentLPIPS(pretrained=False, pnet_rand=True, encoder="sd15", augment=None, verbose=False)
    finally:
        for name in [m for m in sys.modules if m == "pkg_resources" or m.startswith("torchvision")]:
            if standin in (getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]
    ours = full_width_calibrated()
    theirs.load_state_dict(_to_official(ours.state_dict()), strict=True)
    theirs.eval()
    x, y = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    with torch.no_grad():
        ref = theirs(x, y, ensembling=False, add_l1_loss=False).flatten()
        got = ours(x, y)
    print("ours", got.tolist(), "official", ref.tolist())
    assert torch.allclose(got, ref, rtol=1e-4), (got, ref)
    with torch.no_grad():  # and with the official L1 term: our --loss latent+l1
        ref_l1 = theirs(x, y, ensembling=False, add_l1_loss=True).flatten()
    assert torch.allclose(C.RegressionLoss("latent+l1", ours)(x, y), ref_l1, rtol=1e-4)


def test_augmentation_geometry_equals_the_official_packages_up_to_its_filter():
    """Our geometric T on the parameters of the official package's draw (ADA's
    debug_percentile) lands where its warp does: within 5% on smooth images. What differs
    is ADA's sym6 anti-aliasing (2x up, warp, 2x down), which kornia's one bilinear warp
    lacks: on white noise the warped latents differ by ~50% and the LatentLPIPS distance
    by ~7% (tests/ada_augment_compare.py; docs/design.md states it)."""
    import os
    import sys
    pytest.importorskip("scipy")
    standin = os.path.join(os.path.dirname(__file__), "standins")  # pkg_resources and torchvision, which the package imports
    sys.path.insert(0, standin)
    try:
        pytest.importorskip("elatentlpips.ada_aug")
        import ada_augment_compare as cmp
    finally:
        sys.path.remove(standin)
        for name in [m for m in sys.modules if m == "pkg_resources" or m.startswith("torchvision")]:
            if standin in (getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]
    toy, _ = C.toy_images(list(range(4)))
    smooth = torch.nn.functional.interpolate(toy, size=64, mode="bicubic", align_corners=False)
    d_smooth, _ = cmp.compare(smooth, smooth)
    d_noise, _ = cmp.compare(torch.randn(4, 4, 32, 32), torch.randn(4, 4, 32, 32))
    print(f"warped, relative difference to ADA's: smooth {d_smooth:.4f}, white noise {d_noise:.4f}")
    assert d_smooth < 0.05 and d_noise > 0.3
