"""Every stage runs on a GPU. Marked `gpu` (excluded by default) and
skipped without CUDA; run on a GPU machine with `python -m pytest -q -m gpu`.
A few minutes on one GPU: the toy pipeline 01 -> 05 at small settings; tiny SD1.5
and SDXL in bf16 through 01 -> 03 -> 04 (every D part on) -> --export -> the
diffusers pipeline on CUDA; torchrun on NCCL for 03 and 04; 05 --speed; 02 --speed; Eq. 8 at
init on CUDA in float32."""
import importlib
import json

import pytest
import torch

import common as C
from conftest import run_script
S4 = importlib.import_module("04_gan_finetune")  # the names that live in 04_gan_finetune.py

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # compare in true fp32 in this process
SD = ["--resolution", 16]  # 01's; 03/04 take the resolution and the teacher's steps from the pairs' manifest


def run(script, *args):
    """A numbered script's main() in this process: no interpreter start or CUDA
    initialisation per call (most of this file's time when each was a subprocess)."""
    importlib.import_module(script[:-3]).main([str(a) for a in args])


def logs(path):
    return [json.loads(l) for l in open(path)]


def finite(*vals):
    return all(v is not None and torch.isfinite(torch.tensor(float(v))) for v in vals)


def test_discriminator_and_student_on_cuda(tiny_sdxl):
    """D built from a teacher that is already on the GPU,
    every parameter on CUDA, zero-init D = the teacher U-Net; and Eq. 8 on CUDA in
    float32: G at init is the teacher's x0-prediction at T."""
    t = C.EDMTeacher(dict(C.get_preset("toy"), preset="toy"), CUDA)
    D = S4.Discriminator(t)
    assert {p.device.type for p in D.parameters()} | {b.device.type for b in D.buffers()} == {"cuda"}
    z, c = t.noise_and_condition(range(4))
    G = C.Student(t, t.cfg).eval()
    with torch.no_grad():
        x = G(z.cuda(), c.cuda())
        ref = t.net(z.cuda() * 80.0, torch.full((4,), 80.0, device=CUDA), c.cuda())
        logits = D(x, z.cuda(), c.cuda())
    assert (x - ref).abs().max().item() < 1e-5 and all(l.is_cuda and torch.isfinite(l).all() for l in logits)
    cfg = dict(C.get_preset("sdxl"), preset="sdxl", teacher=tiny_sdxl, resolution=16, num_steps=50, dtype="float32",
               num_pairs=1, out_dir="unused")
    for dtype in ("float32", "bfloat16"):  # a bf16 teacher: G still starts from the fp32 weights
        t = C.LDMTeacher(dict(cfg, dtype=dtype), CUDA)
        if dtype == "float32":
            t32, cond = t, t.encode_prompts(["a red cube", "the fox"])
        D, G = S4.Discriminator(t, noise_aug=True), C.Student(t, t.cfg).eval()
        assert {p.device.type for p in list(D.parameters()) + list(G.parameters())} == {"cuda"}
        z = torch.randn(2, 4, 8, 8, device=CUDA)
        with torch.no_grad():
            x = G(z, cond)
            eps = t32.unet(z, t32.T, **cond).sample
            ref = t32.scheduler.step(eps.cpu(), t32.T, z.cpu()).pred_original_sample.cuda()
            assert all(torch.isfinite(l).all() for l in D(x, z, cond))
        err = (x - ref).abs().max().item()
        print(f"Eq. 8 on CUDA, {dtype} teacher: max |G - x0| = {err:.2e}")
        assert err < 1e-4


def test_toy_pipeline_on_gpu(tmp_path, capsys):
    run("01_make_pairs.py", "--out_dir", tmp_path, "--num_pairs", 256, "--shard_size", 128)
    run("02_train_latent_lpips.py", "--out_dir", tmp_path, "--cls_steps", 40, "--num_triplets", 200, "--cal_steps", 20)
    run("03_ode_distill.py", "--out_dir", tmp_path, "--steps", 40, "--log_every", 1, "--grid_every", 20,
               "--ckpt_every", 20, "--ema_start", 0)
    s1 = logs(tmp_path / "distill" / "metrics.jsonl")
    assert len(s1) == 40 and finite(*[l["loss"] for l in s1])
    capsys.readouterr()
    run("04_gan_finetune.py", "--out_dir", tmp_path, "--steps", 20, "--r1_every", 4, "--log_every", 1,
        "--grid_every", 10, "--ckpt_every", 10)
    out = capsys.readouterr().out
    assert "D: 9 readout heads" in out and "backend" not in out  # one process: no process group
    s2 = logs(tmp_path / "gan" / "metrics.jsonl")
    assert [l["step"] for l in s2 if l["r1"] is not None] == [0, 4, 8, 12, 16]
    assert all(finite(l["loss_g"], l["loss_d"], l["logit_real"], l["logit_fake"]) for l in s2)
    assert all(l["r1"] > 0 for l in s2 if l["r1"] is not None)
    run("05_evaluate.py", "--out_dir", tmp_path, "--num_samples", 200, "--diversity_seeds", 4)
    m = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert {"teacher", "stage 1", "stage 2"} <= set(m) and all(finite(m[k]["fid_toy"]) for k in ("stage 1", "stage 2"))
    for f in ("compare.png", "diversity.png"):
        assert (tmp_path / "eval" / f).exists()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_sd_bf16_to_diffusers_pipeline(kind, tiny_sd15, tiny_sdxl, prompt_file, tmp_path, capsys):
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    folder = tiny_sd15 if kind == "sd15" else tiny_sdxl
    torch.manual_seed(0)
    lp = C.LatentLPIPS(4, 0.125, 3, 10)
    space = C.latent_space("ldm", 4, 0.18215 if kind == "sd15" else 0.13025)  # the tiny VAEs' scaling factors
    torch.save(dict(config=lp.config, state_dict=lp.state_dict(), latent_space=space), tmp_path / "lp.pt")
    base = ["--preset", kind, "--teacher", folder, "--out_dir", tmp_path, "--dtype", "bfloat16"]
    run("01_make_pairs.py", *base[:-2], *SD, "--num_steps", 2, "--prompts", prompt_file, "--cycle_prompts", "--num_pairs", 8, "--shard_size", 4,
               "--batch_per_device", 4)
    train = [*base, "--lpips_ckpt", tmp_path / "lp.pt", "--batch", 4, "--batch_per_device", 2, "--log_every", 1]
    run("03_ode_distill.py", *train, "--steps", 6, "--grid_every", 3, "--ckpt_every", 3)
    assert finite(*[l["loss"] for l in logs(tmp_path / "distill" / "metrics.jsonl")])
    capsys.readouterr()
    run("04_gan_finetune.py", *train, "--steps", 4, "--r1_gamma", 0.01, "--r1_every", 2, "--mix_match", 0.5,
        "--z_cond", "--multiscale", "--noise_aug" if kind == "sdxl" else "--no-noise_aug", "--grid_every", 2, "--ckpt_every", 2)
    assert "D: 6 readout heads" in capsys.readouterr().out
    s2 = logs(tmp_path / "gan" / "metrics.jsonl")
    assert [l["step"] for l in s2 if l["r1"] is not None] == [0, 2]
    assert all(finite(l["loss_g"], l["loss_d"], l["logit_real"], l["logit_fake"]) for l in s2)
    run("04_gan_finetune.py", *base, "--export", tmp_path / "export")
    cfg = dict(C.get_preset(kind), preset=kind, teacher=folder, resolution=16, num_steps=2, dtype="float32", num_pairs=1,
               out_dir=str(tmp_path))
    teacher = C.LDMTeacher(cfg, CUDA)
    G = importlib.import_module("05_evaluate").load_student(str(tmp_path / "gan" / "student_ema.pt"), teacher, cfg, CUDA)
    cls = StableDiffusionPipeline if kind == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(folder, unet=UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet"),
                               scheduler=LCMScheduler.from_pretrained(tmp_path / "export" / "scheduler")).to(CUDA)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(CUDA)
    prompts = ["a red cube", "the fox"]
    call = json.load(open(tmp_path / "export" / "export.json"))["pipeline_call"]
    ref = pipe(prompts, latents=z, height=16, width=16, output_type="latent", **call).images
    with torch.no_grad():
        ours = G(z, teacher.encode_prompts(prompts))
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"{kind} export on CUDA: max rel. difference {err:.2e}")
    assert err < 1e-4


def test_torchrun_nccl_stage1_and_stage2(tmp_path):
    run("01_make_pairs.py", "--out_dir", tmp_path, "--num_pairs", 64, "--shard_size", 64)
    lp = C.LatentLPIPS(3, 0.25, 2, 10)  # the loss network's weights do not matter here
    torch.save(dict(config=lp.config, state_dict=lp.state_dict(), latent_space=C.latent_space("edm", 3)), tmp_path / "lp.pt")
    for script, steps, extra in (("03_ode_distill.py", 6, []), ("04_gan_finetune.py", 4, ["--r1_every", 2])):
        p = run_script(script, "--out_dir", tmp_path, "--steps", steps, "--batch", 16, "--batch_per_device", 8, *extra,
                       "--lpips_ckpt", tmp_path / "lp.pt", "--log_every", 1, "--grid_every", 100, "--ckpt_every", 100,
                       torchrun=1)
        assert "backend nccl" in p.stdout, p.stdout[-500:]
    s1, s2 = logs(tmp_path / "distill" / "metrics.jsonl"), logs(tmp_path / "gan" / "metrics.jsonl")
    assert len(s1) == 6 and finite(*[l["loss"] for l in s1])
    assert [l["step"] for l in s2 if l["r1"] is not None] == [0, 2] and all(finite(l["loss_d"], l["loss_g"]) for l in s2)
    # the same under --fsdp (FSDP2 on NCCL; R1 with D kept gathered), resumed from its own checkpoint
    for script, run_name, extra in (("03_ode_distill.py", "distill_fsdp", []), ("04_gan_finetune.py", "gan_fsdp", ["--r1_every", 1])):
        for more in ([], ["--resume"]):
            p = run_script(script, "--out_dir", tmp_path, "--run_name", run_name, "--steps", 4, "--max_steps_this_run", 2,
                           "--batch", 16, "--batch_per_device", 8, *extra, *more, "--fsdp", "--lpips_ckpt", tmp_path / "lp.pt",
                           "--log_every", 1, "--grid_every", 1, "--ckpt_every", 2, torchrun=1)
            assert "backend nccl" in p.stdout and "FSDP2:" in p.stdout, p.stdout[-500:]
        log = logs(tmp_path / run_name / "metrics.jsonl")
        assert [l["step"] for l in log] == [0, 1, 2, 3] and (tmp_path / run_name / "grid_000004.png").exists()
        assert script.startswith("03") or all(l["r1"] is not None and finite(l["r1"]) and l["r1"] > 0 for l in log)


def test_speed_benchmark_small(tiny_sd15, tmp_path):
    run("05_evaluate.py", "--preset", "sd15", "--speed", "--teacher", tiny_sd15, "--resolution", 16,
               "--speed_steps", 10, "--out_dir", tmp_path)
    res = json.load(open(tmp_path / "eval" / "speed.json"))
    print(res)
    assert res["device"].startswith("cuda") and res["speedup"] > 2


def test_fig4_loss_benchmark_on_cuda():
    """02 --speed (Fig. 4) at SD1.5 shapes on the GPU: decode + pixel LPIPS against
    E-LatentLPIPS, forward and backward (paper, A100: 117 ms vs 12.1 ms, 15 vs 0.6 GB)."""
    res = importlib.import_module("02_train_latent_lpips").benchmark_lpips_speed(CUDA)
    print("fig4:", res)
    assert res["device"].startswith("cuda") and res["time_ratio"] > 2 and res["mem_ratio"] > 2
