"""The one torchvision name that the official `elatentlpips` package uses to build its
network, `models.vgg16_bn(...).features`, for tests on machines without torchvision
(from PyPI it pulls a CUDA build of torch). Only tests/test_02_latent_lpips.py puts it
on sys.path (when torchvision is absent), and only to import that package."""
from . import models  # noqa: F401
