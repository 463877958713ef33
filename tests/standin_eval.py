"""05_evaluate.py's SD path with stand-in feature networks in place of the
pretrained Inception / CLIP / DreamSim (no download), and a fake COCO folder.
Imported by tests; run as a script (also under torchrun) it calls 05's main."""
import importlib
import json
import os
import sys
import zlib

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def text_vector(prompt, dim=16):
    """A fixed random vector per prompt: the stand-in CLIP's text embedding."""
    return torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(prompt.encode())))


def stand_in_nets(cfg=None, device=None):
    """Stand-ins with the pretrained networks' interfaces. The CLIP score is the cosine
    between an image feature and a per-prompt vector, so it depends on the pairing."""
    proj = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(0))
    feat = lambda x: torch.nn.functional.interpolate(x.float(), size=(8, 8), mode="area").flatten(1) @ proj.to(x.device)
    clip = lambda x, prompts: torch.nn.functional.cosine_similarity(feat(x), torch.stack([text_vector(p) for p in prompts]))
    return dict(inception=feat, clip=clip, dreamsim=lambda a, b: (feat(a) - feat(b)).norm(dim=1) / 100, name="stand-in")


def stand_in_cifar_inception(device=None):
    """Stand-in for the TF Inception of CIFAR10's FID: uint8 images -> 16 features."""
    proj = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(1))
    return lambda x: torch.nn.functional.interpolate(x.float() / 255, size=(8, 8), mode="area").flatten(1) @ proj.to(x.device)


def make_coco(root, n=6, split="val2014", captions=None):
    """A fake COCO split: n random images, the first `captions` of them (default all) with a caption."""
    from PIL import Image
    os.makedirs(os.path.join(root, split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, anns = [], []
    for i in range(n):
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (24, 32, 3)).astype(np.uint8)).save(
            os.path.join(root, split, f"{i}.jpg"))
        images.append(dict(id=i, file_name=f"{i}.jpg"))
        if captions is None or i < captions:
            anns.append(dict(image_id=i, caption=f"a photo number {i}"))
    json.dump(dict(images=images, annotations=anns), open(os.path.join(root, "annotations", f"captions_{split}.json"), "w"))
    return root


if __name__ == "__main__":
    ev = importlib.import_module("05_evaluate")
    ev.load_feature_nets, ev.load_cifar_inception = stand_in_nets, stand_in_cifar_inception
    ev.main(sys.argv[1:])
