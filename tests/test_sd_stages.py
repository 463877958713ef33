"""Stages 03-05 on tiny random SD1.5 / SDXL models: stage 1 and 2 train and reload,
05 runs its metric path with stand-in feature networks, the guidance-conditioned
student starts as the teacher, and the exported U-Net runs in diffusers' pipelines."""
import importlib
import json
import pytest
import torch

import common as C
from conftest import run_script
S1 = importlib.import_module("01_make_pairs")  # the names that live in 01_make_pairs.py
S4 = importlib.import_module("04_gan_finetune")  # the names that live in 04_gan_finetune.py

STEPS = ["--resolution", 16]  # 01's; 03/04 take the resolution and the teacher's steps (2) from the pairs' manifest


@pytest.fixture(scope="module")
def lpips4(tmp_path_factory):
    """Small 4-channel LatentLPIPS checkpoints in our format, one per latent space:
    {kind: path} (SD1.5's and SDXL's tiny VAEs have SD's scaling factors)."""
    torch.manual_seed(0)
    lp, out = C.LatentLPIPS(4, 0.125, 3, 10), {}
    for kind, scale in (("sd15", 0.18215), ("sdxl", 0.13025)):
        out[kind] = str(tmp_path_factory.mktemp("lp") / "latent_lpips.pt")
        torch.save(dict(config=lp.config, state_dict=lp.state_dict(), latent_space=C.latent_space("ldm", 4, scale)), out[kind])
    return out


def make_pairs(kind, folder, prompts, out, *extra):
    run_script("01_make_pairs.py", "--preset", kind, "--teacher", folder, "--prompts", prompts, "--out_dir", out,
               "--num_pairs", 4, "--shard_size", 4, "--batch_per_device", 4, *STEPS, "--num_steps", 2, "--teacher_dtype", "float32", *extra)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_sd_stage1_and_stage2(kind, tiny_sd15, tiny_sdxl, prompt_file, lpips4, tmp_path):
    folder = tiny_sd15 if kind == "sd15" else tiny_sdxl
    make_pairs(kind, folder, prompt_file, tmp_path)
    base = ["--preset", kind, "--teacher", folder, "--out_dir", tmp_path, "--lpips_ckpt", lpips4[kind],
            "--batch", 4, "--batch_per_device", 2]
    run_script("03_ode_distill.py", *base, "--steps", 12, "--lr", 2e-3, "--log_every", 1,
               "--grid_every", 100, "--ckpt_every", 100, "--ema_start", 100)
    loss = [json.loads(l)["loss"] for l in open(tmp_path / "distill" / "metrics.jsonl")]
    print(kind, "stage-1 losses:", [round(v, 4) for v in loss])
    assert sum(loss[-3:]) < sum(loss[:3]), "the loss decreases on a fixed small pair set"
    ev = importlib.import_module("05_evaluate")
    cfg = dict(C.get_preset(kind), preset=kind, teacher=folder, resolution=16, num_steps=2, dtype="float32", num_pairs=1)
    teacher = C.LDMTeacher(cfg, torch.device("cpu"))
    G = ev.load_student(str(tmp_path / "distill" / "student_ema.pt"), teacher, cfg, torch.device("cpu"))
    z = torch.randn(1, 4, 8, 8)
    assert torch.isfinite(G(z, teacher.encode_prompts(["a cat"]))).all()
    # stage 2 with every component on (R1 every 2 steps so that it fires)
    p = run_script("04_gan_finetune.py", *base, "--steps", 4, "--r1_gamma", 0.01, "--r1_every", 2, "--mix_match", 0.5,
                   "--z_cond", "--multiscale", *(["--noise_aug"] if kind == "sdxl" else []), "--log_every", 1,
                   "--grid_every", 100, "--ckpt_every", 2)
    assert "D: 6 readout heads" in p.stdout
    log = [json.loads(l) for l in open(tmp_path / "gan" / "metrics.jsonl")]
    assert len(log) == 4 and [l["step"] for l in log if l["r1"] is not None] == [0, 2]
    for l in log:
        assert all(torch.isfinite(torch.tensor(l[k])) for k in ("loss_g", "loss_d", "logit_real", "logit_fake"))
    p = run_script("04_gan_finetune.py", *base, "--steps", 5, "--resume", "--r1_gamma", 0.01, "--grid_every", 100,
                   "--allow_config_change")  # r1_every and mix_match differ from the first run: deliberate here
    assert "at step 4" in p.stdout and (tmp_path / "gan" / "student_ema.pt").exists()
    assert "resuming with changed settings: " in p.stdout and "r1_every: checkpoint 2, now 16" in p.stdout


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_export_runs_in_diffusers_pipeline(kind, tiny_sd15, tiny_sdxl, prompt_file, tmp_path):
    """Our G(z, c) equals the standard pipeline's 1-step latents from the exported folder."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    folder = tiny_sd15 if kind == "sd15" else tiny_sdxl
    make_pairs(kind, folder, prompt_file, tmp_path)
    base = ["--preset", kind, "--teacher", folder, "--out_dir", tmp_path, "--batch", 4, "--batch_per_device", 4,
            "--loss", "mse"]
    run_script("03_ode_distill.py", *base, "--steps", 2, "--lr", 1e-3, "--grid_every", 100)
    run_script("04_gan_finetune.py", *base, "--steps", 2, "--grid_every", 100)
    run_script("04_gan_finetune.py", *base, "--export", tmp_path / "export")
    cfg = dict(C.get_preset(kind), preset=kind, teacher=folder, resolution=16, num_steps=2, dtype="float32", num_pairs=1)
    teacher = C.LDMTeacher(cfg, torch.device("cpu"))
    G = importlib.import_module("05_evaluate").load_student(str(tmp_path / "gan" / "student_ema.pt"), teacher, cfg,
                                                            torch.device("cpu"))
    cls = StableDiffusionPipeline if kind == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(folder, unet=UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet"),
                               scheduler=LCMScheduler.from_pretrained(tmp_path / "export" / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cube", "the fox"]
    call = json.load(open(tmp_path / "export" / "export.json"))["pipeline_call"]
    assert call == dict(num_inference_steps=1, timesteps=[teacher.T], guidance_scale=1.0)
    ref = pipe(prompts, latents=z, height=16, width=16, output_type="latent", **call).images
    with torch.no_grad():
        ours = G(z, teacher.encode_prompts(prompts))
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"{kind} export: max rel. difference {err:.2e}")
    assert err < 1e-5


def test_guidance_conditioned_student(tiny_sd15, prompt_file, tmp_path):
    """cfg_range pairs store w; the student starts exactly as the teacher's one-step
    map for every w (zero-init); its export takes w as the pipeline's guidance_scale."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    make_pairs("sd15", tiny_sd15, prompt_file, tmp_path, "--cfg_range", "2,6", "--pair_dtype", "float32")
    shard = C.load_shard(C.shard_path(tmp_path / "pairs", 0))
    assert torch.allclose(shard["w"], S1.pair_guidance(range(4), (2.0, 6.0))) and ((shard["w"] >= 2) & (shard["w"] <= 6)).all()
    cfg = dict(C.get_preset("sd15"), preset="sd15", teacher=tiny_sd15, resolution=16, num_steps=2, dtype="float32",
               num_pairs=1, cfg_range=(2.0, 6.0))
    teacher = C.LDMTeacher(cfg, torch.device("cpu"))
    # the teacher's x at w equals a fixed-guidance solve at that w
    z, prompts = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(4)]), shard["prompts"]
    for i in range(2):
        assert torch.allclose(teacher.solve(z[i:i + 1], prompts[i:i + 1], guidance=float(shard["w"][i])), shard["x"][i:i + 1], atol=1e-5)
    G = C.Student(teacher, cfg).eval()
    base = C.Student(teacher, dict(cfg, cfg_range=None)).eval()
    cond = teacher.encode_prompts(prompts[:2])
    with torch.no_grad():
        for w in (2.0, 4.5, 6.0):
            assert torch.equal(G(z[:2], cond, w), base(z[:2], cond))
    run_script("03_ode_distill.py", "--preset", "sd15", "--teacher", tiny_sd15, "--out_dir", tmp_path, "--steps", 3,
               "--batch", 4, "--batch_per_device", 4, "--loss", "mse", "--lr", 1e-3, "--grid_every", 100)
    run_script("04_gan_finetune.py", "--preset", "sd15", "--teacher", tiny_sd15, "--out_dir", tmp_path,
               "--export", tmp_path / "export", "--run_name", "distill")  # the student of <out_dir>/<run_name>
    G = importlib.import_module("05_evaluate").load_student(str(tmp_path / "distill" / "student_ema.pt"), teacher, cfg,
                                                            torch.device("cpu"))
    assert G.net.time_embedding.cond_proj.weight.abs().sum() > 0  # w is learned
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, unet=UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet"),
                                                   scheduler=LCMScheduler.from_pretrained(tmp_path / "export" / "scheduler"),
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompts[:2], latents=z[:2], num_inference_steps=1, timesteps=[teacher.T], guidance_scale=3.5, height=16,
               width=16, output_type="latent").images
    with torch.no_grad():
        ours = G(z[:2], cond, 3.5)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_05_sd_metric_path_with_stand_in_networks(tiny_sd15, prompt_file, tmp_path, monkeypatch):
    """05's COCO2014 protocol (FID-30k against every val2014 image, CLIP, P/R, DreamDiv,
    DreamSim-5k, grids) with stand-in feature networks in place of the pretrained ones."""
    import numpy as np
    from standin_eval import make_coco, stand_in_nets
    make_pairs("sd15", tiny_sd15, prompt_file, tmp_path)
    base = ["--preset", "sd15", "--teacher", tiny_sd15, "--out_dir", tmp_path, "--batch", 4, "--batch_per_device", 4,
            "--loss", "mse"]
    run_script("03_ode_distill.py", *base, "--steps", 2, "--grid_every", 100)
    coco = make_coco(str(tmp_path / "coco"), n=9)  # 9 real images, 6 of whose captions are sampled
    stand_in = stand_in_nets()
    ev = importlib.import_module("05_evaluate")
    monkeypatch.setattr(ev, "load_feature_nets", lambda cfg, device: stand_in)
    argv = ["--preset", "sd15", "--teacher", tiny_sd15, "--out_dir", str(tmp_path), "--resolution", "16", "--num_steps", "2",
            "--coco", str(coco), "--num_samples", "6", "--batch_per_device", "3", "--div_prompts", "2", "--grid_rows", "3",
            "--diversity_seeds", "3", "--teacher_dtype", "float32"]
    solved, solve = [], C.LDMTeacher.solve  # samples the teacher solves, per evaluation
    monkeypatch.setattr(C.LDMTeacher, "solve", lambda self, z, *a, **kw: solved.append(len(z)) or solve(self, z, *a, **kw))
    ev.main(argv)
    m = json.load(open(tmp_path / "eval" / "metrics.json"))
    # a second evaluation reads the teacher's samples (the protocol's, DreamDiv's, diversity.png's)
    # and the real statistics back: it solves nothing, and every metric is the same
    assert sum(solved) == 6 + 2 * 8 + 3
    solved.clear()
    ev.main(argv)
    again = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert sum(solved) == 0 and all(again[r][k] == m[r][k] for r in m for k in m[r] if k != "sec_per_img")
    assert set(m) == {"teacher", "stage 1"} and len(list((tmp_path / "eval").glob("real_stats_*.pt"))) == 1
    for row in m.values():
        assert set(row) == {"fid_6", "clip_6", "precision_6", "recall_6", "dreamdiv_2", "dreamsim_6", "sec_per_img", "nfe"}
        assert all(v is not None and np.isfinite(v) for v in row.values()), row
    assert m["teacher"]["dreamsim_6"] == 0 and m["teacher"]["nfe"] == 4 and m["stage 1"]["nfe"] == 1
    for f in ("compare.png", "diversity.png", "results.md"):
        assert (tmp_path / "eval" / f).exists()
    assert (tmp_path / "eval" / "results.md").read_text().startswith("protocol: COCO2014 (Table 3)")
    # the teacher's CLIP score pairs each COCO caption with the image made from it; its FID is
    # against all 9 real images of the split, not only the 6 whose captions were drawn
    prompts, real_paths, _ = ev.load_coco(str(coco), 6, 0)
    assert len(real_paths) == 9
    cached = torch.load(next((tmp_path / "eval").glob("teacher_samples_eval_*.pt")), weights_only=False)
    teacher = C.LDMTeacher(dict(C.get_preset("sd15"), preset="sd15", teacher=tiny_sd15, resolution=16, num_steps=2,
                                dtype="float32", out_dir=str(tmp_path)), torch.device("cpu"))
    with torch.no_grad():
        imgs = teacher.to_images(cached["x"])
    assert m["teacher"]["clip_6"] == pytest.approx(stand_in["clip"](imgs, prompts).mean().item(), abs=1e-6)
    assert abs(m["teacher"]["clip_6"] - stand_in["clip"](imgs, prompts[1:] + prompts[:1]).mean().item()) > 1e-3
    real = stand_in["inception"](torch.stack([C.load_image(p, 256) for p in real_paths]))
    assert m["teacher"]["fid_6"] == pytest.approx(ev.fid_from_features(real, stand_in["inception"](imgs)), rel=1e-6)


def test_05_coco2017_protocol(tiny_sd15, tiny_sdxl, tmp_path, monkeypatch):
    """Tables 4-5 (the sdxl preset's protocol): FID-5k and CLIP-5k on val2017's image-text
    pairs, DreamDiv on as many prompts (up to 5k) and DreamSim, no precision/recall; the
    columns and results.md name the protocol."""
    from standin_eval import make_coco, stand_in_nets
    coco = make_coco(str(tmp_path / "coco"), n=5, split="val2017")
    ev = importlib.import_module("05_evaluate")
    monkeypatch.setattr(ev, "load_feature_nets", lambda cfg, device: stand_in_nets())
    ev.main(["--preset", "sdxl", "--teacher", tiny_sdxl, "--out_dir", str(tmp_path), "--resolution", "16", "--num_steps", "2",
             "--coco", coco, "--num_samples", "5", "--batch_per_device", "5", "--grid_rows", "2", "--diversity_seeds", "2",
             "--teacher_dtype", "float32"])
    m = json.load(open(tmp_path / "eval" / "metrics.json"))  # all 5 pairs of this val2017, DreamDiv on each of their prompts
    assert set(m["teacher"]) == {"fid_5", "clip_5", "dreamdiv_5", "dreamsim_5", "sec_per_img", "nfe"}
    assert (tmp_path / "eval" / "results.md").read_text().startswith("protocol: COCO2017 (Tables 4-5)")
    with pytest.raises(SystemExit, match="captions_val2014.json"):  # the split is the protocol's
        ev.main(["--preset", "sd15", "--protocol", "coco2014", "--teacher", tiny_sd15, "--coco", coco])


def test_bf16_frozen_encoders_outside_autocast(tiny_sd15):
    """--dtype bfloat16: the frozen text encoder emits bf16, the trainable student
    and D are fp32. Held-out grids and R1 run outside autocast, so both cast."""
    cfg = dict(C.get_preset("sd15"), preset="sd15", teacher=tiny_sd15, resolution=16, num_steps=2, dtype="bfloat16", num_pairs=1)
    teacher = C.LDMTeacher(cfg, torch.device("cpu"))
    cond = teacher.encode_prompts(["a cat", "a dog"])
    assert cond["encoder_hidden_states"].dtype == torch.bfloat16
    G, D = C.Student(teacher, cfg), S4.Discriminator(teacher)
    z = torch.randn(2, 4, 8, 8)
    x = G(z, cond)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.isfinite(S4.r1_penalty(D, x.detach(), z, cond))


def test_bf16_teacher_trainable_copies_are_full_precision(tiny_sd15):
    """With --dtype bfloat16 the frozen teacher is bf16, but G and D are
    initialised from the fp32 checkpoint: G at step 0 equals the fp32 teacher's
    x0-prediction to fp32 precision (the old bf16-rounded copy was ~1e-2 off)."""
    base = dict(C.get_preset("sd15"), preset="sd15", teacher=tiny_sd15, resolution=16, num_steps=2, num_pairs=1)
    t32 = C.LDMTeacher(dict(base, dtype="float32"), torch.device("cpu"))
    t16 = C.LDMTeacher(dict(base, dtype="bfloat16"), torch.device("cpu"))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = t32.encode_prompts(["a red cube", "the fox"])
    with torch.no_grad():
        ref = C.x0_from_model_output(t32.unet(z, t32.T, **cond).sample, z, t32.alphas_cumprod[t32.T])
        x = C.Student(t16, t16.cfg).eval()(z, cond)
    assert (x - ref).abs().max().item() < 1e-5, (x - ref).abs().max().item()
    D32, D16 = S4.Discriminator(t32), S4.Discriminator(t16)
    assert all(torch.equal(a, b) for a, b in zip(D32.unet.state_dict().values(), D16.unet.state_dict().values()))


def test_float16_training_is_refused(tiny_sd15, tmp_path):
    """fp16 autocast without a GradScaler underflows; refused naming bfloat16."""
    p = run_script("03_ode_distill.py", "--preset", "sd15", "--teacher", tiny_sd15, "--out_dir", tmp_path,
                   "--dtype", "float16", "--benchmark_steps", 1, check=False)
    assert p.returncode != 0 and "bfloat16" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("script", ["03_ode_distill.py", "04_gan_finetune.py"])
def test_sizing_mode_reports_on_a_tiny_config(script, tiny_sd15, tmp_path, monkeypatch):
    """--benchmark_steps runs the real training step on random pairs (no pairs, no
    stage-1 checkpoint, a random LatentLPIPS of the preset's width) and reports memory
    and img/s. The preset's resolution and LatentLPIPS width are the tiny model's here."""
    monkeypatch.setitem(C.PRESETS, "sd15", dict(C.PRESETS["sd15"], resolution=16, lpips_width=0.125))
    extra = ["--r1_gamma", 0.01, "--r1_every", 2] if script.startswith("04") else []
    p = run_script(script, "--preset", "sd15", "--teacher", tiny_sd15, "--out_dir", tmp_path, "--batch", 4,
                   "--batch_per_device", 2, "--benchmark_steps", 4, "--grad_ckpt", *extra)
    rep = json.loads(p.stdout.split("benchmark: ")[-1].splitlines()[0])
    assert rep["peak_gb"] > 0 and rep["step_s"] > 0 and rep["steps_timed"] == 2 and rep["grad_ckpt"] is True
    assert rep["held_gb"] is None and rep["fsdp"] is False  # held_gb: GPU only (memory allocated between steps)
    assert rep["img_s_total"] == pytest.approx(4 / rep["step_s"], rel=0.01) and rep["batch_per_device"] == 2
    assert rep["params_m"]["G"] > 0 and (script.startswith("03") or rep["params_m"]["D"] > 0)
    assert not (tmp_path / ("distill" if script.startswith("03") else "gan")).exists()  # nothing written


def test_dropout_reaches_official_edm_blocks():
    """NVlabs EDM blocks keep a float `dropout` (0.13 in the released
    CIFAR10 configs); --dropout 0.1 (Table A1) must replace it, as it does the toy's
    nn.Dropout layers."""
    import copy
    import types

    class Block(torch.nn.Module):  # the NVlabs UNetBlock's dropout: a float used in forward
        def __init__(self):
            super().__init__()
            self.dropout, self.conv = 0.13, torch.nn.Conv2d(3, 3, 1)

    net = torch.nn.Sequential(Block(), Block(), torch.nn.Dropout(0.13))
    t = types.SimpleNamespace(family="edm", kind="edm-pickle", num_classes=10, net=net,
                              trainable_copy=lambda: copy.deepcopy(net))
    G = C.Student(t, dict(sigma_max=80.0))
    importlib.import_module("03_ode_distill").set_dropout(G.net, 0.1)
    assert [m.dropout for m in G.net[:2]] == [0.1, 0.1] and G.net[2].p == 0.1
    assert net[0].dropout == 0.13  # the teacher keeps its own


def test_sd15_cfg8_and_a_users_own_preset(tiny_sd15, monkeypatch):
    """SD-CFG-8 is a preset with Table A1's own values, and presets are
    checked by family/arch, not by name: a user's new preset works in every stage."""
    s1, s2 = importlib.import_module("03_ode_distill"), importlib.import_module("04_gan_finetune")
    c1, (c2, _) = s1.get_config(["--preset", "sd15_cfg8"]), s2.get_config(["--preset", "sd15_cfg8"])
    assert (c1["guidance"], c1["loss"], c1["lpips_augment"], c1["num_pairs"]) == (8.0, "elatent", "bgc+cutout", 12_000_000)
    assert (c1["batch"], c1["steps"], c2["batch"], c2["steps"], c2["lambda_gan"]) == (2048, 50_000, 1024, 10_000, 0.25)
    assert s1.get_config(["--preset", "sd15"])["loss"] == "elatent+latent"
    monkeypatch.setitem(C.PRESETS, "my_sd", dict(C.PRESETS["sd15"], guidance=5.0))
    c2, _ = s2.get_config(["--preset", "my_sd"])
    assert c2["guidance"] == 5.0 and c2["batch"] == 256 and c2["r1_gamma"] == 0.01
    cfg = dict(C.get_preset("my_sd"), preset="my_sd", teacher=tiny_sd15, resolution=16, num_steps=2, dtype="float32",
               num_pairs=1, out_dir="unused")
    assert C.LDMTeacher(cfg, torch.device("cpu")).kind == "sd15"


def test_lpips_loss_has_a_gradient_through_the_decoder(tiny_sd15, monkeypatch):
    """--loss lpips decodes G's latents with gradient and without
    clamping (the old decoder ran under no_grad and clamped: no gradient reached G)."""
    cfg = dict(C.get_preset("sd15"), preset="sd15", teacher=tiny_sd15, resolution=16, num_steps=2, dtype="float32",
               num_pairs=1, out_dir="unused", loss="lpips", lpips_augment=None, benchmark_steps=0)
    monkeypatch.setattr(C, "load_pixel_lpips", lambda device: C.LatentLPIPS(3, 1.0, 1))  # offline: a random pixel VGG
    teacher = C.LDMTeacher(cfg, torch.device("cpu"))
    loss_fn = C.build_loss(cfg, teacher, torch.device("cpu"))
    x = (torch.randn(2, 4, 8, 8) * 20).requires_grad_(True)  # large latents decode outside [-1, 1]
    loss_fn(x, torch.randn(2, 4, 8, 8)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert teacher.decode(x.detach()).abs().max() > 1  # unclamped inside the loss


def test_state_that_cannot_fit_is_refused_up_front():
    """SDXL stage 2 under DDP needs more fp32 state than an 80 GB GPU holds;
    the run stops before its first step with the numbers (on the H100 it ran out of
    memory at D's first Adam step instead). SDXL stage 1 (G alone) passes, and so does
    stage 2 sharded over 2 GPUs with --fsdp."""
    import types

    class Params:  # a model's parameter count, without allocating it
        def __init__(self, n):
            self.n = n

        def parameters(self):
            return [types.SimpleNamespace(numel=lambda: self.n, requires_grad=True)]
    cuda, h100 = torch.device("cuda", 0), int(79.2 * 2 ** 30)
    G, D = Params(2567.5e6), Params(2567.6e6)  # Table A1's SDXL U-Net; D adds its convs and heads
    C.check_state_fits(cuda, G, total_bytes=h100)  # stage 1: 47.8 GB
    with pytest.raises(SystemExit, match=r"needs 86\.1 GB per process \(G with its EMA 47\.8 GB, D 38\.3 GB.*--fsdp"):
        C.check_state_fits(cuda, G, D, total_bytes=h100)
    C.check_state_fits(cuda, G, D, total_bytes=h100, shards=2)  # --fsdp over 2 GPUs: 43.0 GB each
    C.check_state_fits(torch.device("cpu"), G, D)  # on CPU there is no check
