"""vgg16_bn(pretrained=False): torchvision's VGG16-bn `features` layout (44 modules),
randomly initialised, built by common.LatentVGG; `in_ch` and `pools_removed` choose the
input channels and how many of the first max-pools are Identity (3 and 0: torchvision's
own network; 4 and 3: the latent one of the official E-LatentLPIPS checkpoints)."""
import torch.nn as nn

import common as C

in_ch, pools_removed = 3, 0


class _VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*[m for s in C.LatentVGG(in_ch, 1.0, pools_removed).slices for m in s])


def vgg16_bn(pretrained=False, **kw):
    assert not pretrained, "the stand-in has no weights"
    return _VGG()
