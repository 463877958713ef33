"""PairDataset's read rate at SD1.5 and SDXL shapes (docs/real_run.md, "Reading the pairs").

Writes shards as 01 does (float16 x, int64 seeds, prompts in the metadata; 1000 pairs a
shard), then times `PairDataset.get` on random global batches, as 03 and 04 draw them:
warm (every file read once before) and cold (every file evicted from the page cache with
posix_fadvise(DONTNEED), checked with fincore when it is installed). Each row is timed
in its three parts: x from the memory-mapped shard, z regenerated from the seed, and the
prompt. One process; under torchrun each rank reads its own micro-batch, so a rank needs
the per-GPU rate (stage 1 on 8 H100s: 70.7 img/s each, 566 in all).

    python tests/read_rate.py          # ~2 min and 1.6 GB of disk, in runs/read_rate
"""
import argparse
import gc
import importlib
import json
import os
import subprocess
import sys
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common as C  # noqa: E402

SHAPES = {"sd15": (4, 64, 64), "sdxl": (4, 128, 128)}


def make_pairs(folder, shape, shards, rows):
    """`shards` shards of `rows` pairs in 01's format, and a complete manifest."""
    write_shard = importlib.import_module("01_make_pairs").write_shard
    g = torch.Generator().manual_seed(0)
    for k in range(shards):
        path = C.shard_path(folder, k)
        if not os.path.isfile(path):
            seeds = list(range(k * rows, (k + 1) * rows))
            prompts = [f"a photograph of object {i}, highly detailed, soft light, 35mm, trending" for i in seeds]
            write_shard(path, torch.randn(rows, *shape, generator=g).half(), seeds, prompts=prompts)
    C.save_json(dict(preset="bench", family="sd", teacher="bench", z_shape=list(shape), solver="bench",
                     num_pairs=shards * rows, shard_size=rows, guidance=3.0, num_steps=50, complete=True), os.path.join(folder, "manifest.json"))


def evict(folder):
    """Drop the shards' pages from the page cache (clean pages: no privilege needed). A
    page still mapped stays, so the last PairDataset (a cycle, through its prompt cache)
    is collected first."""
    gc.collect()
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def cached_fraction(folder):
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", *[os.path.join(folder, f) for f in os.listdir(folder)
                                                                        if f.startswith("shard_")]],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    res, size = sum(map(int, out[0::2])), sum(map(int, out[1::2]))
    return res / size


def time_reads(folder, shape, batch, batches, seed, cold):
    """img/s of `batches` random global batches, and the seconds per image of each part;
    `cold`: the shards are evicted before each of the two timings."""
    if cold:
        evict(folder)
    at_start = cached_fraction(folder)
    teacher = types.SimpleNamespace(family="sd", teacher_id="bench", z_shape=shape, solver_name=lambda: "bench")
    data = C.PairDataset(folder, teacher, dict(preset="bench"))
    g = torch.Generator().manual_seed(seed)
    parts = dict(x=0.0, z=0.0, prompt=0.0)
    t0 = time.perf_counter()
    for _ in range(batches):
        idx = torch.randint(len(data), (batch,), generator=g).tolist()
        t = time.perf_counter()
        rows = [divmod(i, data.S) for i in idx]
        x = torch.cat([data.shards[k].get_slice("x")[j:j + 1] for k, j in rows]).float()
        parts["x"] += time.perf_counter() - t
        t = time.perf_counter()
        C.seed_noise(idx, shape)
        parts["z"] += time.perf_counter() - t
        t = time.perf_counter()
        [data.prompts(k)[j] for k, j in rows]
        parts["prompt"] += time.perf_counter() - t
        assert x.shape == (batch, *shape)
    whole = time.perf_counter() - t0
    n = batch * batches
    if cold:
        evict(folder)
    t = time.perf_counter()  # the real call, as a check that the parts add up to it
    for _ in range(batches):
        data.get(torch.randint(len(data), (batch,), generator=g).tolist())
    get_rate = n / (time.perf_counter() - t)
    return dict(cached_at_start=at_start, img_per_s=round(n / whole, 1), get_img_per_s=round(get_rate, 1),
                **{f"ms_per_img_{k}": round(1e3 * v / n, 3) for k, v in parts.items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join("runs", "read_rate"))
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32, help="sd15's batch_per_device")
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, shape in SHAPES.items():
        folder = os.path.join(args.dir, name)
        os.makedirs(folder, exist_ok=True)
        make_pairs(folder, shape, args.shards, args.rows)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
        for f in os.listdir(folder):  # warm: every page read once
            with open(os.path.join(folder, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass
        warm = time_reads(folder, shape, args.batch, args.batches, 1, cold=False)
        cold = time_reads(folder, shape, args.batch, args.batches, 2, cold=True)
        results[name] = dict(shape=list(shape), row_kib=2 * torch.Size(shape).numel() / 1024, mib=round(size),
                             warm=warm, cold=cold)
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
