"""The training mechanics that every result depends on, each against its closed
form: the cosine schedule, the EMA, the attention weight-decay group, Eq. 8 for the
EDM family, and the toy teacher's classifier-free guidance."""
import copy
import math

import pytest
import torch

import common as C


def test_lr_at_is_a_cosine_from_start_to_end():
    lr = (1e-4, 1e-5)
    assert C.lr_at(0, 100, lr) == pytest.approx(1e-4) and C.lr_at(100, 100, lr) == pytest.approx(1e-5)
    assert C.lr_at(50, 100, lr) == pytest.approx(5.5e-5)  # half way: the mean of the two
    assert C.lr_at(25, 100, lr) == pytest.approx(1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert C.lr_at(500, 100, lr) == pytest.approx(1e-5)  # past the end it stays at the end
    assert C.lr_at(37, 100, 4e-4) == 4e-4 and C.lr_schedule("1e-4,1e-5") == (1e-4, 1e-5)  # one number: constant


def test_update_ema_is_a_lerp_of_the_weights_and_copies_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.normal_()
    before = [p.clone() for p in ema.parameters()]
    C.update_ema(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p, atol=1e-7)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)
    C.update_ema(ema, model, 0.0)  # beta 0 (before ema_start): the EMA is the model
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), model.parameters()))


def test_attention_weight_decay_covers_whole_transformer_blocks(tiny_sd15):
    """Table A1's 'weight decay on attention' (1e-5), read as every parameter of an
    attention or transformer block (its feed-forward too); the rest get the plain decay."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    rest, attn = C.param_groups(unet, 1e-2, 1e-5)
    assert (rest["weight_decay"], attn["weight_decay"]) == (1e-2, 1e-5)
    ids = lambda g: {id(p) for p in g["params"]}
    names = {id(p): n for n, p in unet.named_parameters()}
    assert ids(rest) | ids(attn) == set(names) and not ids(rest) & ids(attn)
    attn_names = {names[i] for i in ids(attn)}
    assert any(".ff." in n for n in attn_names) and any("attn1.to_q" in n for n in attn_names)
    assert not any(n.startswith(("conv_in", "time_embedding")) or ".resnets." in n for n in attn_names)


def toy_cfg():
    return dict(C.get_preset("toy"), preset="toy", cfg_range=None)


def test_eq8_edm_student_is_the_samplers_first_denoiser_call():
    """G(z, c) at initialisation = D(sigma_max z; sigma_max, c), the very first call
    of the teacher's Heun sampler from the same z (Eq. 8 in EDM's parameterisation)."""
    teacher = C.EDMTeacher(toy_cfg(), torch.device("cpu"))
    z, c = teacher.noise_and_condition(range(4))
    first = []
    D = teacher.denoiser(1.0)
    C.edm_heun_sampler(lambda x, s, y: first.append(D(x, s, y)) or first[0], z, c, num_steps=2)
    with torch.no_grad():
        g = C.Student(teacher, toy_cfg()).eval()(z, c)
    assert torch.allclose(g, first[0].float(), atol=1e-6), (g - first[0]).abs().max()


class FakeNet(torch.nn.Module):
    """D(x; sigma, c) = x + sigma + c: a class-conditional denoiser whose output names its inputs."""
    num_classes = 10

    def forward(self, x, sigma, labels):
        return x + sigma.view(-1, 1, 1, 1) + labels.float().view(-1, 1, 1, 1)


def test_toy_classifier_free_guidance():
    """D_w = D(x; null) + w (D(x; c) - D(x; null)), null = the extra class; w <= 1 is
    the net itself (one NFE, diffusers' rule: C.guided), and w can differ per sample."""
    net, x = FakeNet(), torch.zeros(3, 1, 2, 2)
    sigma, labels = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 4, 7])
    assert C.guided_denoiser(net, 1.0) is net and C.guided_denoiser(net, 0.5) is net
    for w in (2.5, torch.tensor([1.0, 2.0, 3.0])):
        wv = torch.as_tensor(w).reshape(-1, 1, 1, 1)
        uncond, cond = sigma.view(-1, 1, 1, 1) + 10, sigma.view(-1, 1, 1, 1) + labels.view(-1, 1, 1, 1)
        got = C.guided_denoiser(net, w)(x, sigma, labels)
        assert torch.allclose(got, (uncond + wv * (cond - uncond)).expand_as(got)), w


def test_grad_norm_reports_the_global_norm_and_clips_to_it():
    """--grad_clip: the logged norm is the global one before clipping; with clip > 0 the
    gradients are scaled to that norm, directions kept; with 0 they are left as they are."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model(torch.randn(5, 3)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm().item()
    assert C.grad_norm(model) == pytest.approx(norm) and all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert C.grad_norm(model, clip=norm / 4) == pytest.approx(norm)
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item() == pytest.approx(norm / 4, rel=1e-4)
    assert all(torch.allclose(p.grad, g / 4, rtol=1e-4) for p, g in zip(model.parameters(), grads))


def test_held_out_fidelity_reports_mean_and_standard_error():
    """03/04's end-of-run fidelity: per-sample MSE to the teacher, mean ± standard error
    (per-sample MSEs 1, 2, 3, 4: mean 2.5, s.e. = std 1.2910 / sqrt 4)."""
    ref = torch.zeros(4, 1, 1, 2)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).sqrt().view(4, 1, 1, 1).expand(4, 1, 1, 2)
    assert C.held_out_fidelity(x, ref) == "2.50000 ± 0.64550"
