"""The conditional diffusion discriminator, R1 and mix-and-match."""
import importlib
import copy
import types

import torch

import common as C
S4 = importlib.import_module("04_gan_finetune")  # the names that live in 04_gan_finetune.py


def toy_teacher(seed=0):
    torch.manual_seed(seed)
    net = C.build_toy_teacher().eval()
    return types.SimpleNamespace(family="edm", net=net, num_classes=10, trainable_copy=lambda: copy.deepcopy(net).float())


def test_built_where_the_teacher_is():
    """D's construction assumes no device. Its dry run (readout channels)
    and every part it adds live on the teacher's device. The meta device stands in
    for a GPU here; the old code dry-ran on CPU tensors and failed exactly as on CUDA."""
    t = toy_teacher()
    t.net.to("meta")
    D = S4.Discriminator(t, z_cond=True, multiscale=True)
    assert {p.device.type for p in D.parameters()} == {"meta"} and len(D.heads) == 3 * len(D.unet.up_blocks)


def capture(unet):
    """Reference features of a plain U-Net run: per up block (input, skips, the output
    of its last resnet or attention, i.e. what its upsampler would take)."""
    feats, hooks = [], []

    def pre(m, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
        feats.extend([h, torch.cat([torch.nn.functional.interpolate(s, size=h.shape[-2:]) if s.shape[-2:] != h.shape[-2:] else s
                                    for s in skips], 1)])

    def post(m, args, out):
        feats.append(out[0] if isinstance(out, tuple) else getattr(out, "sample", out))
    for b in unet.up_blocks:
        last = b.attentions[-1] if getattr(b, "attentions", None) else b.resnets[-1]
        hooks += [b.register_forward_pre_hook(pre, with_kwargs=True), last.register_forward_hook(post)]
    return feats, hooks


def readout_table(D, x, z, cond):
    """(up block, readout, scale in px, channels) of each of D's readouts."""
    with torch.no_grad():
        return [(i // 3, ("from below", "skips", "combined")[i % 3], f.shape[-1], f.shape[1])
                for i, f in enumerate(D.features(x, z, cond))], D.features(x, z, cond)


def test_three_readouts_at_each_decoder_scale(tiny_sd15):
    """Fig. 7: before, at and after the skip connection, each at its own decoder scale:
    the third readout is taken before the block's upsampler, so it is not the next
    block's first, and the combined features of every scale are read."""
    sd = C.LDMTeacher(dict(C.get_preset("sd15"), preset="sd15", teacher=tiny_sd15, resolution=16, num_steps=4,
                           dtype="float32", num_pairs=1), torch.device("cpu"))
    for teacher, x, cond in [(toy_teacher(), torch.randn(2, 3, 16, 16), torch.tensor([1, 2])),
                             (sd, torch.randn(2, 4, 8, 8), sd.encode_prompts(["a cat", "a dog"]))]:
        D = S4.Discriminator(teacher, z_cond=True, multiscale=True).eval()
        table, feats = readout_table(D, x, torch.randn_like(x), cond)
        scale, scales = x.shape[-1] // 2 ** sum(b.downsamplers is not None for b in D.unet.down_blocks), []
        for b in D.unet.up_blocks:  # each up block works at one scale; its upsampler doubles it for the next
            scales.append(scale)
            scale *= 2 if b.upsamplers else 1
        assert scale == x.shape[-1] and len(set(scales)) == len(scales) > 1
        assert [s for _, _, s, _ in table] == [s for s in scales for _ in range(3)], table
        assert len({f.data_ptr() for f in feats}) == len(feats)  # no readout is another's tensor
        assert [c for _, kind, _, c in table if kind == "combined"] == [b.resnets[-1].out_channels for b in D.unet.up_blocks]


def test_zero_init_invariance_toy():
    t = toy_teacher()
    D = S4.Discriminator(t, z_cond=True, multiscale=True, d_t=0.5)
    assert len(D.heads) == 3 * len(D.unet.up_blocks)  # 3 readouts per decoder scale
    D.eval()  # same mode as the teacher (train-mode attention rounds differently, ~5e-7)
    x, z, c = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    with torch.no_grad():
        got = D.features(x, z, c)
        ref, hooks = capture(t.net.unet)
        t.net(x, torch.full((4,), 0.5), c)  # the teacher's own EDM-preconditioned call at D's sigma
        for h in hooks:
            h.remove()
    assert len(got) == len(ref) == len(D.heads)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    # the branches are live: after a change to the z conv, features move
    with torch.no_grad():
        D.z_conv.weight.normal_()
        assert not torch.equal(D.features(x, z, c)[-1], ref[-1])


def test_zero_init_invariance_sd(tiny_sdxl):
    teacher = C.LDMTeacher(dict(C.get_preset("sdxl"), preset="sdxl", teacher=tiny_sdxl, resolution=16, num_steps=4,
                                dtype="float32", num_pairs=1), torch.device("cpu"))
    D = S4.Discriminator(teacher, z_cond=True, multiscale=True, d_t=10).eval()
    assert len(D.heads) == 3 * len(teacher.unet.up_blocks)
    x, z = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    cond = teacher.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        got = D.features(x, z, cond)
        ref, hooks = capture(teacher.unet)
        teacher.unet(x, torch.full((2,), 10), **cond)
        for h in hooks:
            h.remove()
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    logits = D(x, z, cond)
    assert len(logits) == len(D.heads) and all(l.shape[1] == 1 for l in logits)


def test_single_readout_without_multiscale():
    D = S4.Discriminator(toy_teacher(), z_cond=False, multiscale=False)
    assert len(D.heads) == 1 and D.z_conv is None and D.ms_in is None
    out = D(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert out[0].shape == (2, 1, 16, 16)


def test_r1_equals_finite_differences():
    D = S4.Discriminator(toy_teacher(), z_cond=True, multiscale=True).double()
    for p in D.parameters():  # make the zero-init branches matter too
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.05)
    x, z, c = torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.tensor([3])
    r1 = S4.r1_penalty(D, x, z, c).item()
    eps, g = 1e-6, torch.zeros(x.numel(), dtype=torch.float64)
    with torch.no_grad():
        for i in range(x.numel()):
            e = torch.zeros(x.numel(), dtype=torch.float64)
            e[i] = eps
            e = e.view_as(x)
            score = S4.R1_READINGS["sum_pos"]  # the default reading
            g[i] = (score(D(x + e, z, c)) - score(D(x - e, z, c))).item() / (2 * eps)
    fd = g.pow(2).sum().item()
    print(f"R1 autograd {r1:.8e} vs finite differences {fd:.8e}")
    assert abs(r1 - fd) / fd < 1e-6


class LinearD(torch.nn.Module):
    """A D whose readouts are linear in x: readout r is a_r . x at each position (the last
    one average-pooled to half size), so grad_x of each readout's sum is a_r * s_r at every
    position (s_r = 1, or 1/4 when pooled) and each reading's R1 has a closed form."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, z, cond):
        maps = [(a.view(1, -1, 1, 1) * x).sum(1, keepdim=True) for a in self.a]
        return maps[:-1] + [torch.nn.functional.avg_pool2d(maps[-1], 2)]


def test_r1_of_a_linear_d_in_closed_form():
    """R1 = ||grad_x D(x)||^2 with D(x), by default (04's --r1_reading sum_pos), each readout's
    logit map summed over its positions (a StyleGAN2 D(x) per map, the convention gamma = 0.01
    comes from) and averaged over the R readouts, as the loss averages them; `sum` drops the
    1/R, `mean` divides each readout by its positions too: a change of reduction fails here."""
    R, Ch, H = 3, 4, 8
    a = torch.randn(R, Ch, dtype=torch.float64)
    s = torch.tensor([1.0, 1.0, 0.25], dtype=torch.float64)  # d(sum of a pooled map)/dx = 1/4 per input position
    n = torch.tensor([H * H, H * H, H * H / 4], dtype=torch.float64)  # positions per readout
    x = torch.randn(1, Ch, H, H, dtype=torch.float64)
    closed = {"sum": (s[:, None] * a).sum(0), "sum_pos": (s[:, None] * a).sum(0) / R,
              "mean": (s[:, None] * a / n[:, None]).sum(0) / R}
    closed = {k: H * H * g.pow(2).sum().item() for k, g in closed.items()}
    for reading, want in closed.items():
        assert abs(S4.r1_penalty(LinearD(a), x, None, None, reading=reading).item() - want) < 1e-9 * want, reading
    default = S4.get_config([])[0]["r1_reading"]
    assert default == "sum_pos" and abs(S4.r1_penalty(LinearD(a), x, None, None).item() - closed["sum_pos"]) < 1e-9 * closed["sum_pos"]
    from r1_readings import r1_under_each_reading  # the measurement's, first-order per readout
    got = r1_under_each_reading(LinearD(a), x, None, None)
    assert all(abs(got[k] - v) < 1e-9 * v for k, v in closed.items())


def test_mix_and_match():
    B = 16
    x_fake, x_real = torch.randn(B, 3, 4, 4), torch.randn(B, 3, 4, 4)
    z, c = torch.randn(B, 3, 4, 4), torch.arange(B)
    plan = S4.mix_and_match_plan(0, 0, range(B), range(B), 0.5, B)
    assert plan and {kind for _, kind, _ in plan} == set(S4.MIX_KINDS)
    x_p, z_p, c_p = (t[[j for _, _, j in plan]] for t in (x_real, z, c))  # partners' real pairs
    x, zz, cc = S4.mix_and_match(x_fake, z, c, plan, x_p, z_p, c_p)
    replaced = {k for k, _, _ in plan}
    for k, kind, j in plan:
        assert j != k and torch.equal(x[k], x_real[j])           # a real latent of another sample
        assert torch.equal(zz[k], z[j] if kind == "wrong_c" else z[k])
        assert cc[k] == (c[j] if kind == "wrong_z" else c[k])
    for i in set(range(B)) - replaced:
        assert torch.equal(x[i], x_fake[i]) and torch.equal(zz[i], z[i]) and cc[i] == c[i]
    # these inputs go into D's fake batch: all labelled fake by gan_loss_d
    assert S4.mix_and_match_plan(0, 0, range(B), range(B), 0.0, B) == []


def test_mix_and_match_holds_over_the_global_batch():
    """The fraction and all three kinds hold over a global batch of 256
    at micro-batch 1, 4 and 16 (the old per-micro-batch rule replaced nothing at 1
    and only 'unrelated' at 4). The plan is the same whatever the split."""
    n, frac, counts = 256, 0.25, {}
    for mb in (1, 4, 16):
        plans = [S4.mix_and_match_plan(0, 7, range(s, s + mb), range(s, s + mb), frac, 10_000) for s in range(0, n, mb)]
        kinds = [kind for p in plans for _, kind, _ in p]
        counts[mb] = {k: kinds.count(k) for k in S4.MIX_KINDS}
    print("mix-and-match counts over 256 samples:", counts)
    assert counts[1] == counts[4] == counts[16]
    total = sum(counts[1].values())
    assert abs(total - frac * n) < 3 * (n * frac * (1 - frac)) ** 0.5   # binomial, within 3 sigma of 64
    assert all(abs(v - total / 3) < 3 * (total * 2 / 9) ** 0.5 for v in counts[1].values())
    # over many steps the fraction and the 1/3 shares converge
    many = [kind for step in range(40) for _, kind, _ in S4.mix_and_match_plan(0, step, range(n), range(n), frac, 10_000)]
    sd_frac, sd_share = (frac * (1 - frac) / (40 * n)) ** 0.5, (2 / 9 / len(many)) ** 0.5
    assert abs(len(many) / (40 * n) - frac) < 3 * sd_frac
    assert all(abs(many.count(k) / len(many) - 1 / 3) < 3 * sd_share for k in S4.MIX_KINDS)


def test_gan_losses():
    real, fake = [torch.full((2, 1, 4, 4), 3.0)], [torch.full((2, 1, 4, 4), -3.0)]
    sp = torch.nn.functional.softplus
    assert torch.isclose(S4.gan_loss_d(real, fake), 2 * sp(torch.tensor(-3.0)))
    assert torch.isclose(S4.gan_loss_g(fake), sp(torch.tensor(3.0)))


def test_deepcopy_keeps_the_features():
    """D walks the U-Net itself (no hooks bound to one instance), so a
    deepcopy computes the original's features, and a change to the copy stays in it.
    The hook-based D failed this: the copy's hooks wrote into the original."""
    D = S4.Discriminator(toy_teacher(), z_cond=True, multiscale=True).eval()
    with torch.no_grad():
        for p in D.parameters():  # make the zero-init branches matter too
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    D2 = copy.deepcopy(D)
    x, z, c = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        ref = D.features(x, z, c)
        got = D2.features(x, z, c)
        assert len(got) == len(ref) == len(D.heads) and all(torch.equal(a, b) for a, b in zip(got, ref))
        D2.ms_in[0].weight.add_(0.1)
        assert not torch.equal(D2.features(x, z, c)[-1], ref[-1])
        assert all(torch.equal(a, b) for a, b in zip(D.features(x, z, c), ref))


def test_noise_augmentation_diffuses_the_input(tiny_sd15):
    """--noise_aug: D sees x diffused to a random level, x + sigma n with ln sigma ~
    N(-1.2, 1.2) for EDM, sqrt(a_t) x + sqrt(1 - a_t) n with t uniform in 0-999 for SD."""
    seen = []
    for teacher in (toy_teacher(), C.LDMTeacher(dict(C.get_preset("sd15"), preset="sd15", teacher=tiny_sd15, resolution=16,
                                                     num_steps=2, dtype="float32", out_dir="unused"), torch.device("cpu"))):
        D = S4.Discriminator(teacher, noise_aug=True)
        D.features = lambda x, z, c, t=None: seen.append((x, t)) or [torch.zeros(len(x), D.heads[0].in_channels, 2, 2)]
        ch = D.unet.config.in_channels
        x, n = torch.randn(4096, ch, 2, 2), torch.randn(4096, ch, 2, 2)
        cond = torch.zeros(4096, dtype=torch.long) if teacher.family == "edm" else {}
        D(x, torch.zeros_like(x), cond, noise=n)
        x_in, t = seen[-1]
        if teacher.family == "edm":
            assert torch.allclose(x_in, x + t.view(-1, 1, 1, 1) * n, atol=1e-6)
            assert abs(t.log().mean() + 1.2) < 0.1 and abs(t.log().std() - 1.2) < 0.1
        else:
            a = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
            assert torch.allclose(x_in, a.sqrt() * x + (1 - a).sqrt() * n, atol=1e-6)
            assert t.min() >= 0 and t.max() <= 999 and abs(t.float().mean() - 499.5) < 20
