"""A stand-in for an official NVlabs EDM pickle, pickled from a module named torch_utils
so that unpickling needs that module on PYTHONPATH, exactly like the real pickles.

It keeps the official `EDMPrecond` contract (NVlabs/edm, training/networks.py): the
same attributes (img_resolution, img_channels, label_dim, use_fp16, sigma_min,
sigma_max, sigma_data, model), `round_sigma`, and a forward that casts x to float32,
runs its inner network `self.model` in float16 only with use_fp16 on CUDA and not
force_fp32, and asserts that the inner network returned exactly that dtype. Under
bf16 autocast a real SongUNet's last conv returns bf16 and that assertion fails; so
does this inner network's, whose output is a 1x1 conv (identity at construction).

At construction D(x; sigma) is the exact denoiser of Gaussian data N(mu, s^2 I),
so the ODE has a closed-form solution; its weights are trainable (03 fine-tunes them).
"""
import os
import pickle
import sys

SRC = '''
import numpy as np
import torch


class GaussianModel(torch.nn.Module):
    """The inner network F: from (c_in x, c_noise) it recovers x and sigma and returns
    F_x = (D_exact - c_skip x) / c_out through a 1x1 conv (identity) plus a zero-init
    class embedding, computing, as EDM's layers do, in the dtype of its input."""
    def __init__(self, mu, s, sigma_data, channels, label_dim):
        super().__init__()
        self.mu, self.s, self.sigma_data = mu, s, sigma_data
        self.out = torch.nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.out.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.out.bias.zero_()
        self.emb = torch.nn.Linear(label_dim, channels, bias=False)
        torch.nn.init.zeros_(self.emb.weight)

    def forward(self, x, noise_labels, class_labels=None):
        dtype, sd = x.dtype, self.sigma_data
        sigma = (4 * noise_labels.to(torch.float32)).exp().reshape(-1, 1, 1, 1)  # c_noise = ln(sigma) / 4
        x_in = x.to(torch.float32) * (sd ** 2 + sigma ** 2).sqrt()  # undo c_in
        d_exact = self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x_in - self.mu)
        c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        f = ((d_exact - c_skip * x_in) / c_out).to(dtype)
        if class_labels is not None:
            f = f + self.emb(class_labels.to(dtype)).to(dtype)[:, :, None, None]
        return torch.nn.functional.conv2d(f, self.out.weight.to(dtype), self.out.bias.to(dtype))


class EDMPrecond(torch.nn.Module):
    """The official EDMPrecond's attributes and forward."""
    def __init__(self, mu, s, img_resolution=32, img_channels=3, label_dim=10, use_fp16=False,
                 sigma_min=0, sigma_max=float("inf"), sigma_data=0.5):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = img_resolution, img_channels, label_dim, use_fp16
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.model = GaussianModel(mu, s, sigma_data, img_channels, label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else torch.zeros([1, self.label_dim], device=x.device) \\
            if class_labels is None else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
'''


def make_fake_edm_pickle(folder, mu=0.3, s=0.7):
    """Writes folder/torch_utils/fake_net.py and folder/net.pkl (as NVlabs' pickles: a dict
    whose 'ema' is the network); returns (pkl, pythonpath)."""
    pkg = os.path.join(folder, "torch_utils")
    os.makedirs(pkg, exist_ok=True)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    with open(os.path.join(pkg, "fake_net.py"), "w") as f:
        f.write(SRC)
    sys.path.insert(0, folder)
    try:
        from torch_utils.fake_net import EDMPrecond
        with open(os.path.join(folder, "net.pkl"), "wb") as f:
            pickle.dump({"ema": EDMPrecond(mu, s).eval().requires_grad_(False)}, f)
    finally:
        sys.path.remove(folder)
        for m in [m for m in sys.modules if m.startswith("torch_utils")]:
            del sys.modules[m]
    return os.path.join(folder, "net.pkl"), folder
