"""A stand-in for an official NVlabs EDM pickle: the ideal denoiser of Gaussian
data N(mu, s^2 I), pickled from a module named torch_utils so that unpickling
needs that module on PYTHONPATH, exactly like the real pickles."""
import os
import pickle
import sys

SRC = '''
import torch

class GaussianDenoiser(torch.nn.Module):
    """D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), the exact denoiser of N(mu, s^2 I)."""
    def __init__(self, mu, s, label_dim=10, img_resolution=32, img_channels=3):
        super().__init__()
        self.mu, self.s, self.label_dim = mu, s, label_dim
        self.sigma_data, self.img_resolution, self.img_channels = 0.5, img_resolution, img_channels
    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        assert class_labels is None or class_labels.shape == (len(x), self.label_dim)
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x.double() - self.mu)
'''


def make_fake_edm_pickle(folder, mu=0.3, s=0.7):
    """Writes folder/torch_utils/fake_net.py and folder/net.pkl; returns (pkl, pythonpath)."""
    pkg = os.path.join(folder, "torch_utils")
    os.makedirs(pkg, exist_ok=True)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    with open(os.path.join(pkg, "fake_net.py"), "w") as f:
        f.write(SRC)
    sys.path.insert(0, folder)
    try:
        from torch_utils.fake_net import GaussianDenoiser
        with open(os.path.join(folder, "net.pkl"), "wb") as f:
            pickle.dump({"ema": GaussianDenoiser(mu, s)}, f)
    finally:
        sys.path.remove(folder)
        for m in [m for m in sys.modules if m.startswith("torch_utils")]:
            del sys.modules[m]
    return os.path.join(folder, "net.pkl"), folder
