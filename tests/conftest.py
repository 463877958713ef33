import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


def run_script(name, *args, env=None, check=True, torchrun=0):
    """Run a numbered script as a subprocess; returns CompletedProcess."""
    cmd = [sys.executable, os.path.join(REPO, name), *map(str, args)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               os.path.join(REPO, name), *map(str, args)]
    e = dict(os.environ, OMP_NUM_THREADS="1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"))
    e.update(env or {})
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    import tiny_sd
    d = str(tmp_path_factory.mktemp("sd15") / "model")
    tiny_sd.make_tiny_sd15(d)
    return d


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    import tiny_sd
    d = str(tmp_path_factory.mktemp("sdxl") / "model")
    tiny_sd.make_tiny_sdxl(d)
    return d


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a red cube on the table\nthe quick brown fox\nan astronaut in space\n\na painting of a rabbit\n")
    return str(p)
