"""The EDM Heun sampler against the exact probability-flow ODE solution
for Gaussian data N(mu, s^2 I), where D and x(sigma) are known in closed form:
  D(x; sigma) = mu + s^2/(s^2+sigma^2) (x - mu)
  x(sigma)    = mu + (x(sigma_0) - mu) sqrt((s^2+sigma^2) / (s^2+sigma_0^2))."""
import math

import torch

import common as C

MU, S = 0.3, 0.7


def ideal_D(x, sigma, labels=None):
    sigma = sigma.double().reshape(-1, 1, 1, 1)
    return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x.double() - MU)


def exact_x0(z, sigma_max=80.0):
    return MU + (sigma_max * z.double() - MU) * math.sqrt(S ** 2 / (S ** 2 + sigma_max ** 2))


def heun_error(num_steps):
    z = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = C.edm_heun_sampler(ideal_D, z, None, num_steps=num_steps)
    return (x - exact_x0(z)).abs().max().item(), x


def test_heun_matches_exact_pf_ode():
    """Heun converges to the exact solution at 2nd order. Measured max abs errors
    (|x| up to 3.2): 18 steps 0.152 (pure discretisation error of the paper's
    35-NFE setting), 36: 3.4e-2, 72: 7.9e-3, 144: 1.9e-3, 288: 4.6e-4."""
    errs = {}
    for n in (18, 36, 72, 144, 288):
        errs[n], x = heun_error(n)
        print(f"Heun-{n} ({2 * n - 1} NFE): max abs error vs exact PF-ODE solution {errs[n]:.3e}")
        assert x.dtype == torch.float64
    assert errs[18] < 0.2
    for n in (36, 72, 144):
        assert 3.5 < errs[n] / errs[2 * n] < 4.8  # error ~ h^2
    assert errs[288] < 6e-4


def test_sigma_steps_and_nfe():
    t = C.edm_sigma_steps(18)
    assert len(t) == 19 and t[0] == 80.0 and abs(t[17].item() - 0.002) < 1e-12 and t[18] == 0
    calls = []

    def D(x, sigma, labels):
        calls.append(1)
        return ideal_D(x, sigma)
    C.edm_heun_sampler(D, torch.zeros(1, 1, 2, 2), None)
    assert len(calls) == 35
