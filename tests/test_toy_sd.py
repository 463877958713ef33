"""--preset toy_sd: the Stable Diffusion code path on the shipped tiny text-to-image
teacher (assets/toy_sd, trained by 01 --train_teacher). A fast run of every stage on
it, the export into diffusers' own StableDiffusionPipeline, the captioned world and
its tokenizer; and (slow) the teacher's quality and the toy_sd quick start."""
import importlib
import json
import os

import pytest
import torch

import common as C
from conftest import run_script
S5 = importlib.import_module("05_evaluate")  # the names that live in 05_evaluate.py

TEACHER = C.PRESETS["toy_sd"]["teacher"]
FAST = {  # every stage at its smallest on the real teacher (the preset's DDIM-50 + CFG, so T = 981)
    "01_make_pairs.py": ["--num_pairs", 16, "--shard_size", 8, "--batch_per_device", 16],
    "02_train_latent_lpips.py": ["--cls_steps", 2, "--cls_batch", 8, "--num_images", 200, "--num_triplets", 40],
    "03_ode_distill.py": ["--steps", 2, "--batch", 4, "--batch_per_device", 4, "--grid_every", 100],
    "04_gan_finetune.py": ["--steps", 2, "--batch", 4, "--batch_per_device", 4, "--grid_every", 100],
    "05_evaluate.py": ["--num_samples", 8, "--div_prompts", 1, "--batch_per_device", 8, "--diversity_seeds", 2],
}


@pytest.fixture(scope="module")
def toy_sd_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_sd")
    torch.manual_seed(0)  # 05's judge, untrained: this test checks the path, the slow ones the numbers
    torch.save(S5.ToyClassifier((10, len(C.TOY_SCENE["colour"]))).state_dict(), out / "judge.pt")
    for script, args in FAST.items():
        run_script(script, "--preset", "toy_sd", "--out_dir", out, *args,
                   *(["--classifier", out / "judge.pt"] if script == "05_evaluate.py" else []))
    return out


def test_every_stage_runs_the_sd_path_on_the_toy_teacher(toy_sd_run):
    m = json.load(open(toy_sd_run / "pairs" / "manifest.json"))
    assert m["family"] == "ldm" and m["solver"] == "ddim-50" and m["nfe"] == 100 and m["z_shape"] == [4, 8, 8]
    lp = torch.load(toy_sd_run / "lpips" / "latent_lpips.pt", weights_only=True)
    scale = json.load(open(os.path.join(TEACHER, "vae", "config.json")))["scaling_factor"]
    assert lp["latent_space"] == C.latent_space("ldm", 4, scale)  # LatentLPIPS of this VAE's latents
    # its phase 1 has one head per attribute a caption names
    assert list(lp["metrics"]["top1_by_head"]) == list(C.TOY_SCENE) and lp["config"]["num_classes"] == 26
    assert list(lp["metrics"]["two_afc_by_kind"]) == ["noise", "blur", "shift", "colour cast", "contrast", "hue", "background"]
    ck = torch.load(toy_sd_run / "gan" / "student_ema.pt", weights_only=False, map_location="cpu")
    assert ck["config"]["arch"] == "sd15" and ck["config"]["d_t"] == 0
    rows = json.load(open(toy_sd_run / "eval" / "metrics.json"))
    assert set(rows) == {"teacher", "stage 1", "stage 2"}
    for row in rows.values():  # the text-to-image protocol, toy features in every role
        assert {"fid_8", "caption_8", "precision_8", "dreamdiv_1", "dreamsim_8"} <= set(row)
        assert 0 <= row["caption_8"] <= 1
    assert rows["teacher"]["dreamsim_8"] < 1e-6 and rows["stage 1"]["nfe"] == 1 and rows["teacher"]["nfe"] == 100
    assert (toy_sd_run / "eval" / "results.md").read_text().startswith("protocol: toy_sd")


def test_export_loads_in_stable_diffusion_pipeline(toy_sd_run):
    """diffusers' own pipeline, from the teacher folder plus the exported U-Net, draws
    the image our G decodes, in one step from a prompt."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    export = toy_sd_run / "export"
    run_script("04_gan_finetune.py", "--preset", "toy_sd", "--out_dir", toy_sd_run, "--export", export)
    pipe = StableDiffusionPipeline.from_pretrained(TEACHER, unet=UNet2DConditionModel.from_pretrained(export / "unet"),
                                                   scheduler=LCMScheduler.from_pretrained(export / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    call = json.load(open(export / "export.json"))["pipeline_call"]
    prompts = ["a large red circle on a black background in the centre", "a small blue cross on a white background top left"]
    z = C.seed_noise([5, 6], (4, 8, 8))
    theirs = pipe(prompts, latents=z, height=32, width=32, output_type="pt", **call).images
    cfg = dict(C.get_preset("toy_sd"), preset="toy_sd", out_dir=str(toy_sd_run))
    teacher = C.LDMTeacher(cfg, torch.device("cpu"))
    G = S5.load_student(str(toy_sd_run / "gan" / "student_ema.pt"), teacher, cfg, torch.device("cpu"))
    with torch.no_grad():
        ours = (teacher.to_images(G(z, teacher.encode_prompts(prompts))) + 1) / 2
    assert call["timesteps"] == [981] and theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max() < 1e-4


def test_the_shipped_teacher_runs_in_a_plain_pipeline_call():
    """from_pretrained(folder) with no other argument, then a prompt: every component is
    stored in one dtype (float32 holding float16-rounded values), so none of them meets
    another's dtype at the first matmul, whatever dtype each library defaults to."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(TEACHER)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in part.parameters()} == {torch.float32}, type(part).__name__
        assert all(torch.equal(p, p.half().float()) for p in part.parameters())  # the float16 teacher, losslessly
    x = pipe("a large red circle on a black background in the centre", num_inference_steps=2, output_type="pt",
             generator=torch.Generator().manual_seed(0)).images
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()


def test_caption_words_are_single_tokens_and_name_the_drawn_attributes():
    imgs, captions, a = C.toy_scene(range(500))
    tok = importlib.import_module("01_make_pairs").word_tokenizer(captions)
    for cap in captions[:50]:
        ids = tok(cap).input_ids[1:-1]
        assert tok.convert_ids_to_tokens(ids) == [w + "</w>" for w in cap.split()]
    assert S5.caption_attributes(captions).tolist() == a[:, :2].tolist()  # "hollow square" is not read as "square"
    assert set(a[:, 0].tolist()) == set(range(10)) and set(a[:, 1].tolist()) == set(range(6))
    again, caps2, _ = C.toy_scene(range(500))
    assert torch.equal(imgs, again) and caps2 == captions  # all of it from the seed
    # the caption's colour is the image's: the shape's colour is the pixel farthest from the background's grey level
    T = C.TOY_SCENE
    for i in range(20):
        px = (imgs[i] + 1) / 2
        sat = px.max(0).values - px.min(0).values
        rgb = px[:, sat == sat.max()][:, 0]
        hue = {"red": [1, 0, 0], "yellow": [1, 1, 0], "green": [0, 1, 0], "cyan": [0, 1, 1], "blue": [0, 0, 1],
               "magenta": [1, 0, 1]}[T["colour"][a[i, 1]]]
        assert ((rgb > 0.5).long().tolist()) == hue, (captions[i], rgb)


def test_pixel_lpips_for_the_table1_baseline(toy_sd_run, tmp_path):
    """02 --pixels learns a 3-channel LPIPS on the decoded images; 03 --loss lpips
    decodes G's latents and takes it as the pixel LPIPS."""
    run_script("02_train_latent_lpips.py", "--preset", "toy_sd", "--out_dir", tmp_path, "--pixels", *FAST["02_train_latent_lpips.py"])
    ckpt = tmp_path / "lpips" / "latent_lpips.pt"
    lp = torch.load(ckpt, weights_only=True)
    assert lp["latent_space"] == C.latent_space("edm", 3) and list(lp["metrics"]["top1_by_head"]) == list(C.TOY_SCENE)
    p = run_script("03_ode_distill.py", "--preset", "toy_sd", "--out_dir", toy_sd_run, "--run_name", "pixel_lpips",
                   "--loss", "lpips", "--lpips_ckpt", ckpt, *FAST["03_ode_distill.py"])
    assert "step 2" in p.stdout or (toy_sd_run / "pixel_lpips" / "student_ema.pt").exists()
    bad = run_script("03_ode_distill.py", "--preset", "toy_sd", "--out_dir", toy_sd_run, "--run_name", "bad",
                     "--loss", "lpips", "--lpips_ckpt", toy_sd_run / "lpips" / "latent_lpips.pt", check=False)
    assert bad.returncode != 0 and "takes 4-channel inputs but this space has 3" in bad.stderr


@pytest.mark.slow  # ~2 min: 600 DDIM-50 + CFG samples and the attribute classifier
def test_toy_sd_teacher_matches_its_captions(tmp_path):
    """At the preset's guidance the teacher's samples show the shape and the colour their
    caption names for at least 90% of these 600 held-out captions (the issue's bar), judged by
    the toy attribute classifier of 05 (not the loss network). Measured: both 95.8% (large
    shapes 99.7%, small 92.4%), colour 100%; the teacher trained for half as long scored 81.5%."""
    torch.set_num_threads(2)
    clf = S5.train_toy_classifier(str(tmp_path / "clf.pt"), scene=True, log=print)
    cfg = dict(C.get_preset("toy_sd"), preset="toy_sd", out_dir=str(tmp_path))
    teacher = C.LDMTeacher(cfg, torch.device("cpu"))
    seeds = list(range(400_000_000, 400_000_600))
    _, prompts, a = C.toy_scene(seeds)
    x = torch.cat([teacher.to_images(teacher.solve(C.seed_noise(seeds[i:i + 200], teacher.z_shape), prompts[i:i + 200]))
                   for i in range(0, len(seeds), 200)])
    hit = S5.classify(clf, x).eq(S5.caption_attributes(prompts))
    both, large = hit.all(1).float(), a[:, 3] == 1
    print(f"toy_sd teacher at w={cfg['guidance']}: shape {hit[:, 0].float().mean():.3f}, colour {hit[:, 1].float().mean():.3f}, "
          f"both {both.mean():.3f} (large {both[large].mean():.3f}, small {both[~large].mean():.3f}) of {len(seeds)} captions")
    assert both.mean() >= 0.9 and both[~large].mean() >= 0.85 and hit[:, 1].float().mean() >= 0.97


def test_a_copy_of_the_preset_keeps_its_stage_rows(monkeypatch):
    """A user's own preset copied from toy_sd (arch sd15) takes toy_sd's 03/04 rows, not SD1.5's."""
    monkeypatch.setitem(C.PRESETS, "my_world", dict(C.PRESETS["toy_sd"], guidance=2.0))
    s1 = importlib.import_module("03_ode_distill").get_config(["--preset", "my_world"])
    s2 = importlib.import_module("04_gan_finetune").get_config(["--preset", "my_world"])[0]
    assert s1["family"] == "ldm" and s1["arch"] == "sd15" and s1["steps"] == 300 and s1["guidance"] == 2.0
    assert s2["steps"] == 300 and s2["d_t"] == 0 and s2["lambda_gan"] == 1.0


@pytest.mark.slow  # ~14 min on 2 cores: the README's second quick start
def test_toy_sd_quickstart_end_to_end(tmp_path):
    for s in ("01_make_pairs", "02_train_latent_lpips", "03_ode_distill", "04_gan_finetune", "05_evaluate"):
        run_script(f"{s}.py", "--preset", "toy_sd", "--out_dir", tmp_path)
    m = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert m["teacher"]["caption_500"] > 0.85
    # stage 2 draws more captions right than stage 1 (measured: captions 0.72 -> 0.79, FID-toy 1.19 -> 0.92; docs/toy_sd.md)
    assert m["stage 2"]["caption_500"] > m["stage 1"]["caption_500"] + 0.03
    assert m["stage 2"]["fid_500"] < 1.2 * m["stage 1"]["fid_500"]  # one seed's FID-toy is noisy (docs/toy_sd.md)
    for f in ("compare.png", "diversity.png", "results.md", "prompts.txt"):
        assert os.path.isfile(tmp_path / "eval" / f)


def test_start_up_prints_no_library_notices(tmp_path):
    """01 on the toy_sd teacher, as a user starts it (a subprocess, the real loaders): none
    of the notices that are not the user's business (transformers' image processors
    without torchvision, diffusers without accelerate, its torch_dtype rename) reaches
    stderr; whatever else the libraries say still does."""
    p = run_script("01_make_pairs.py", "--preset", "toy_sd", "--out_dir", tmp_path, "--num_pairs", 2, "--shard_size", 2,
                   "--batch_per_device", 2, "--num_steps", 2, env={"D2G_SUBPROCESS": "1"})
    for notice in ("requires torchvision (not installed)", "Cannot initialize model with low cpu memory usage",
                   "`torch_dtype` is deprecated", "that should be kept in float32"):
        assert notice not in p.stderr, p.stderr[-2000:]
    import logging
    record = logging.LogRecord("x", logging.WARNING, "", 0, "`CLIPImageProcessor` requires torchvision (not installed)", (), None)
    assert not logging.getLogger("transformers.utils.import_utils").filter(record)
    record.msg = "something else"
    assert logging.getLogger("transformers.utils.import_utils").filter(record)
