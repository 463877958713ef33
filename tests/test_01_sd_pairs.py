"""SD1.5/SDXL pairs equal diffusers' own pipelines (tiny random models)."""
import json
import os

import pytest
import torch

import importlib

import common as C
from conftest import run_script
S1 = importlib.import_module("01_make_pairs")  # load_prompts lives in 01_make_pairs.py

SMALL = ["--resolution", 16, "--num_steps", 6, "--num_pairs", 4, "--shard_size", 2, "--batch_per_device", 2,
         "--pair_dtype", "float32", "--teacher_dtype", "float32"]


def _pipeline_latents(kind, folder, prompts, seeds, guidance, steps):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    cls = StableDiffusionPipeline if kind == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for p, s in zip(prompts, seeds):
        z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s))
        out.append(pipe(p, latents=z, num_inference_steps=steps, guidance_scale=guidance, height=16, width=16,
                        output_type="latent").images)
    return torch.cat(out)


# w = 0.5: guidance is off at w <= 1 (diffusers' rule, C.guided), in the pairs and in their NFE alike
@pytest.mark.parametrize("kind,guidance", [("sd15", 3.0), ("sdxl", 7.0), ("sd15", 0.5)])
def test_pairs_equal_diffusers_pipeline(kind, guidance, tiny_sd15, tiny_sdxl, prompt_file, tmp_path):
    folder = tiny_sd15 if kind == "sd15" else tiny_sdxl
    run_script("01_make_pairs.py", "--preset", kind, "--teacher", folder, "--prompts", prompt_file,
               "--out_dir", tmp_path, "--guidance", guidance, *SMALL)
    shards = [C.load_shard(C.shard_path(tmp_path / "pairs", k)) for k in range(2)]
    x = torch.cat([s["x"] for s in shards])
    prompts = sum([s["prompts"] for s in shards], [])
    seeds = torch.cat([s["seed"] for s in shards]).tolist()
    assert prompts == S1.load_prompts(prompt_file)[:4] and seeds == [0, 1, 2, 3]
    ref = _pipeline_latents(kind, folder, prompts, seeds, guidance, 6)
    err = ((x - ref).abs().max() / ref.abs().max()).item()
    print(f"{kind}: max |x_ours - x_diffusers| / max |x| = {err:.3e} (max |x| = {ref.abs().max():.2f})")
    # Float tolerance: our batch of 2 and the pipeline's batch of 1 round differently in BLAS.
    assert x.shape == ref.shape and err < 1e-5
    assert (tmp_path / "pairs" / "pairs.png").is_file()
    assert json.load(open(tmp_path / "pairs" / "manifest.json"))["nfe"] == 6 * (2 if guidance > 1 else 1)


def _teacher(kind, folder, **kw):
    cfg = dict(C.get_preset(kind), preset=kind, teacher=folder, resolution=16, num_steps=50, dtype="float32", num_pairs=1)
    cfg.update(kw)
    return C.LDMTeacher(cfg, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_eq8_student_is_one_ddim_step_to_x0(kind, tiny_sd15, tiny_sdxl):
    """G(z, c) on the teacher's weights = the x0 that a DDIM step from T predicts,
    with T the first timestep of the teacher's own 50-step DDIM schedule (981)."""
    teacher = _teacher(kind, tiny_sd15 if kind == "sd15" else tiny_sdxl)
    assert teacher.T == 981
    G = C.Student(teacher, teacher.cfg).eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_prompts(["a red cube", "the fox"])
    with torch.no_grad():
        x = G(z, cond)
        eps = teacher.unet(z, teacher.T, **cond).sample
        ref = teacher.scheduler.step(eps, teacher.T, z).pred_original_sample
    assert torch.allclose(x, ref, rtol=1e-5, atol=1e-5)
    # under bf16 autocast (the GPU presets' default) the U-Net's eps is bf16, but Eq. 8's arithmetic stays float32:
    # 1 / alpha_T ~ 13 would magnify bf16 rounding (on this model it doubles G's error at init, 3.3e-3 -> 6.7e-3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x16, eps16 = G(z, cond), G.net(z, G.T, **cond).sample
    assert eps16.dtype == torch.bfloat16 and x16.dtype == torch.float32
    assert torch.equal(x16, C.x0_from_model_output(eps16.float(), z, G.alpha_bar_T.float()))


@pytest.mark.slow  # ~25 s; the default run checks the same rank split on the toy (test_01_pairs.py)
def test_sd_torchrun_equals_single_process(tiny_sd15, prompt_file, tmp_path):
    args = ["--preset", "sd15", "--teacher", tiny_sd15, "--prompts", prompt_file, *SMALL]
    # same BLAS threading in both runs (torchrun workers get 1 thread each)
    run_script("01_make_pairs.py", "--out_dir", tmp_path / "one", *args, env={"OMP_NUM_THREADS": "1"})
    run_script("01_make_pairs.py", "--out_dir", tmp_path / "two", *args, torchrun=2)
    for k in range(2):
        a = C.load_shard(C.shard_path(tmp_path / "one" / "pairs", k))
        b = C.load_shard(C.shard_path(tmp_path / "two" / "pairs", k))
        assert torch.equal(a["x"], b["x"]) and a["prompts"] == b["prompts"] and torch.equal(a["seed"], b["seed"])


def _fails(*args, env=None):
    p = run_script("01_make_pairs.py", *args, env=env, check=False)
    assert p.returncode != 0
    return p.stderr.strip().splitlines()[-1]


def test_sd_bad_input(tiny_sd15, tiny_sdxl, prompt_file, tmp_path):
    import shutil
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    base = ["--out_dir", tmp_path / "out", "--resolution", 16, "--num_steps", 2, "--num_pairs", 4]
    assert "no prompts found" in _fails("--preset", "sd15", "--teacher", tiny_sd15, "--prompts", empty, *base)
    msg = _fails("--preset", "sd15", "--teacher", tiny_sd15, "--prompts", prompt_file, *base, "--num_pairs", 10)
    assert "has 4 prompts but --num_pairs is 10" in msg and "--cycle_prompts" in msg
    assert "SDXL model but --preset is sd15" in _fails("--preset", "sd15", "--teacher", tiny_sdxl, "--prompts", prompt_file, *base)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd15, broken)
    shutil.rmtree(broken / "text_encoder")
    assert "missing the 'text_encoder' component" in _fails("--preset", "sd15", "--teacher", broken, "--prompts", prompt_file, *base)
    # a degenerate tokenizer (what an offline hub id can silently give) is refused
    degenerate = tmp_path / "degenerate"
    shutil.copytree(tiny_sd15, degenerate)
    from transformers import CLIPTokenizer
    shutil.rmtree(degenerate / "tokenizer")
    CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[]).save_pretrained(degenerate / "tokenizer")
    msg = _fails("--preset", "sd15", "--teacher", degenerate, "--prompts", prompt_file, *base)
    assert "did not load properly" in msg
    # cycling is allowed when asked for: 6 pairs from 4 prompts
    run_script("01_make_pairs.py", "--preset", "sd15", "--teacher", tiny_sd15, "--prompts", prompt_file, "--cycle_prompts",
               "--out_dir", tmp_path / "cyc", "--num_pairs", 6, "--shard_size", 6, "--resolution", 16, "--num_steps", 2)
    assert C.load_shard(C.shard_path(tmp_path / "cyc" / "pairs", 0))["prompts"][4] == S1.load_prompts(prompt_file)[0]


def test_broken_teacher_folder(tiny_sd15, prompt_file, tmp_path):
    """A teacher folder with one part missing, truncated or corrupt (an interrupted
    download) stops 01 with one error line naming that part's file, not a traceback."""
    import shutil

    def truncate(f):
        f.write_bytes(f.read_bytes()[:1000])
    for part, spoil in [("unet/config.json", lambda d: (d / "unet" / "config.json").write_text('{"broken')),
                        ("unet/diffusion_pytorch_model", lambda d: truncate(d / "unet" / "diffusion_pytorch_model.safetensors")),
                        ("scheduler_config.json", lambda d: (d / "scheduler" / "scheduler_config.json").unlink()),
                        ("vae/config.json", lambda d: (d / "vae" / "config.json").write_text("x")),
                        ("text_encoder/config.json", lambda d: (d / "text_encoder" / "config.json").write_text("{"))]:
        d = tmp_path / part.replace("/", "_")
        shutil.copytree(tiny_sd15, d)
        spoil(d)
        msg = _fails("--preset", "sd15", "--teacher", d, "--prompts", prompt_file, "--out_dir", tmp_path / "out",
                     "--resolution", 16, "--num_steps", 2, "--num_pairs", 4)
        assert msg.startswith("error: ") and "does not load" in msg and part in msg, (part, msg)


def test_teacher_identity_is_its_weights_not_its_place(tiny_sd15, prompt_file, tmp_path):
    """Pairs and students record their teacher by the folder's name and a fingerprint of its
    files: the same teacher elsewhere (a clone, a copied run, beside files it does not load)
    is accepted, and a retrained one (one weight changed) is refused with the field named."""
    import shutil
    from safetensors.torch import load_file, save_file
    here, there, other = (tmp_path / d / "model" for d in ("here", "there", "other"))
    for d in (here, there, other):
        shutil.copytree(tiny_sd15, d)
    w = other / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(w)
    k = sorted(sd)[len(sd) // 2]
    sd[k] = sd[k] + 1e-3
    save_file(sd, w)
    args = ["--preset", "sd15", "--prompts", prompt_file, "--out_dir", tmp_path / "out", *SMALL]
    run_script("01_make_pairs.py", "--teacher", here, *args)
    (there / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"a variant diffusers does not load here")
    (there / "vae" / ".DS_Store").write_bytes(b"\0")
    run_script("01_make_pairs.py", "--teacher", there, *args)  # the finished pairs, accepted as this teacher's
    msg = _fails("--teacher", other, *args)
    assert "different setup" in msg and "teacher: found 'model:sha256=" in msg, msg
    # a large file is read in 64 strided chunks: a retraining (every byte) changes it, its place does not
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "w.bin").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "w.bin").write_bytes(bytes((i + 1) % 256 for i in range(256)) * 64)
    fp = {d: C.folder_fingerprint(tmp_path / d, ["w.bin"], chunks=4, chunk=16) for d in "abc"}
    assert fp["a"] == fp["b"] != fp["c"]


def test_prompt_files(tmp_path):
    """--prompts: a .txt, a .jsonl of strings or objects (prompt/caption/text), or a folder
    of them in name order; a .jsonl line of another shape stops with the file named."""
    d = tmp_path / "prompts"
    d.mkdir()
    (d / "a.txt").write_text("a cat\n\nthe sea\n")
    (d / "b.jsonl").write_text('"a string"\n{"caption": "a caption", "id": 7}\n{"text": "a text"}\n')
    (d / "c.csv").write_text("ignored\n")
    assert S1.load_prompts(str(d)) == ["a cat", "the sea", "a string", "a caption", "a text"]
    for i, line in enumerate(['3', 'null', '{"prompt": 3}', '{"title": "x"}', '["a", "b"]', '{"prompt": "ok"']):
        (tmp_path / f"bad{i}.jsonl").write_text(line + "\n")
        with pytest.raises(SystemExit, match=f"bad{i}.jsonl"):
            S1.load_prompts(str(tmp_path / f"bad{i}.jsonl"))


def test_hub_id_offline_and_unreachable(prompt_file, tmp_path):
    import time
    base = ["--preset", "sd15", "--teacher", "nobody/not-a-cached-model", "--prompts", prompt_file, "--out_dir", tmp_path,
            "--num_pairs", 4]
    msg = _fails(*base, env={"HF_HUB_OFFLINE": "1"})
    assert "nobody/not-a-cached-model" in msg and "HF_HUB_OFFLINE" in msg
    t = time.time()
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    msg = _fails(*base, env=env)
    assert "nobody/not-a-cached-model" in msg and time.time() - t < 60


# The hub repos' files (their listings on huggingface.co), as snapshot_download filters them
SD15_REPO = ["model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt",
             "v1-inference.yaml", "README.md", "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
             "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors", "scheduler/scheduler_config.json",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
             "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
             "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]
SDXL_REPO = ["model_index.json", "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
             "sd_xl_offset_example-lora_1.0.safetensors", "scheduler/scheduler_config.json", "text_encoder/config.json",
             "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors", "text_encoder/model.onnx",
             "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "text_encoder_2/model.fp16.safetensors",
             "text_encoder_2/model.onnx_data", "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json",
             "tokenizer_2/merges.txt", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "unet/openvino_model.bin", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
             "vae_1_0/diffusion_pytorch_model.safetensors", "vae_decoder/model.onnx"]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_hub_download_takes_only_the_loaded_parts_full_precision_weights(kind, tiny_sd15, tiny_sdxl):
    """What snapshot_download fetches for a hub id: the configs and tokenizers of the parts
    a stage loads and each part's one full-precision safetensors file; no fp16 or non-EMA
    copy, no single-file checkpoint, no safety checker, ONNX or OpenVINO file. 02 takes the VAE alone."""
    from huggingface_hub.utils import filter_repo_objects
    index = json.load(open(os.path.join({"sd15": tiny_sd15, "sdxl": tiny_sdxl}[kind], "model_index.json")))
    repo = SD15_REPO if kind == "sd15" else SDXL_REPO
    got = set(filter_repo_objects(repo, allow_patterns=C.hub_patterns(index)))
    weights = {f for f in got if f.endswith(".safetensors")}
    parts = ["text_encoder", "unet", "vae"] + (["text_encoder_2"] if kind == "sdxl" else [])
    assert weights == {f"{p}/{'model' if 'text' in p else 'diffusion_pytorch_model'}.safetensors" for p in parts}, weights
    assert {f for f in repo if f.endswith((".json", ".txt")) and f.split("/")[0] in index
            and f.split("/")[0] not in C.NOT_LOADED} | {"model_index.json"} <= got
    assert not {f for f in got if f.startswith(("safety_checker", "feature_extractor", "vae_1_0"))}
    vae = set(filter_repo_objects(repo, allow_patterns=C.hub_patterns(index, ["vae"])))
    assert vae == {"model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}


def test_hub_id_loads_offline_from_a_filled_cache(tiny_sd15, prompt_file, tmp_path):
    """A hub id whose files are in the cache (what `hf download` leaves on a login node) loads
    with HF_HUB_OFFLINE=1: the pairs equal those from the folder itself."""
    import shutil
    snap = tmp_path / "hf" / "hub" / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_sd15, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for name, teacher, e in [("hub", "someone/tiny-sd", env), ("folder", tiny_sd15, None)]:
        run_script("01_make_pairs.py", "--preset", "sd15", "--teacher", teacher, "--prompts", prompt_file,
                   "--out_dir", tmp_path / name, "--num_pairs", 2, "--shard_size", 2, "--batch_per_device", 2,
                   "--resolution", 16, "--num_steps", 2, env=e)
    a, b = (C.load_shard(C.shard_path(tmp_path / n / "pairs", 0)) for n in ("hub", "folder"))
    assert torch.equal(a["x"], b["x"])


def test_speed_benchmark_times_the_presets_teacher(tiny_sd15, tiny_sdxl, tmp_path, monkeypatch):
    """05 --speed (Fig. 3) on CPU: --teacher when given; without it the preset's own
    architecture through --teacher random (stood in for here by the tiny folders, so
    nothing real-size is built), SDXL's added conditioning included."""
    import importlib
    import json
    built = []
    monkeypatch.setattr(C, "random_teacher", lambda kind, out_dir, device: built.append(kind) or
                        {"sd15": tiny_sd15, "sdxl": tiny_sdxl}[kind])
    for kind, extra in [("sd15", ["--teacher", tiny_sd15]), ("sdxl", [])]:
        out = tmp_path / kind  # main() in this process whatever D2G_SUBPROCESS says: the stand-in must hold
        importlib.import_module("05_evaluate").main(["--preset", kind, "--speed", "--resolution", "16",
                                                     "--speed_steps", "8", "--out_dir", str(out), *extra])
        res = json.load(open(out / "eval" / "speed.json"))
        print(kind, res)  # about 10x on an idle 2-core CPU; the bounds leave room for a busy machine
        assert res["teacher_steps"] == 8 and res["ideal_speedup_from_unet_calls"] > 4 and res["speedup"] > 1.2, res
        img = res["with_decode"]  # the same VAE decode added to both: a smaller ratio
        assert res["vae_decode_s"] > 0 and 1 < img["speedup"] <= res["speedup"], res
    assert built == ["sdxl"]
