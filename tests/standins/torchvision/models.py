"""vgg16_bn(pretrained=False): torchvision's VGG16-bn `features` layout (44 modules,
3 input channels), randomly initialised; `in_ch` and `pools` let a test build the
latent variant (4 channels, the first three max-pools removed) in the same layout."""
import torch.nn as nn

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
in_ch, pools_removed = 3, 0


class _VGG(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c, pools = [], in_ch, 0
        for v in CFG:
            if v == "M":
                layers.append(nn.Identity() if pools < pools_removed else nn.MaxPool2d(2, 2))
                pools += 1
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)


def vgg16_bn(pretrained=False, **kw):
    assert not pretrained, "the stand-in has no weights"
    return _VGG()
