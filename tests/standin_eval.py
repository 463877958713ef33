"""05_evaluate.py's SD path with stand-in feature networks in place of the
pretrained Inception / CLIP / DreamSim (no download), and a fake COCO folder.
Imported by tests; run as a script (also under torchrun) it calls 05's main."""
import importlib
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stand_in_nets(cfg=None, device=None):
    proj = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(0))
    feat = lambda x: torch.nn.functional.interpolate(x.float(), size=(8, 8), mode="area").flatten(1) @ proj.to(x.device)
    return dict(inception=feat, clip=lambda x, p: torch.full((len(x),), 0.25),
                dreamsim=lambda a, b: (feat(a) - feat(b)).norm(dim=1) / 100)


def make_coco(root, n=6):
    from PIL import Image
    os.makedirs(os.path.join(root, "val2014"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, anns = [], []
    for i in range(n):
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (24, 32, 3)).astype(np.uint8)).save(
            os.path.join(root, "val2014", f"{i}.jpg"))
        images.append(dict(id=i, file_name=f"{i}.jpg"))
        anns.append(dict(image_id=i, caption=f"a photo number {i}"))
    json.dump(dict(images=images, annotations=anns), open(os.path.join(root, "annotations", "captions_val2014.json"), "w"))
    return root


if __name__ == "__main__":
    ev = importlib.import_module("05_evaluate")
    ev.load_feature_nets = stand_in_nets
    ev.main(sys.argv[1:])
