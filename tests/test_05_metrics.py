"""The metric maths against closed forms."""
import json
import importlib
import math

import pytest
import torch

S5 = importlib.import_module("05_evaluate")  # the names that live in 05_evaluate.py


def test_frechet_distance_closed_form():
    """Two Gaussians with commuting covariances: ||mu1-mu2||^2 + sum (sqrt(a)-sqrt(b))^2."""
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 1.0, 9.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    s1, s2 = q @ torch.diag(a).double() @ q.T, q @ torch.diag(b).double() @ q.T  # same eigenbasis, not diagonal
    mu1, mu2 = torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    exact = (mu1 - mu2).pow(2).sum().item() + ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert math.isclose(S5.frechet_distance(mu1, s1, mu2, s2), exact, rel_tol=1e-10)
    # 1-D: (m1-m2)^2 + (s1-s2)^2
    assert math.isclose(S5.frechet_distance(torch.tensor([0.0]), torch.tensor([[4.0]]), torch.tensor([3.0]), torch.tensor([[1.0]])),
                        9 + 1, rel_tol=1e-12)


def test_fid_of_a_set_against_itself_is_zero():
    f = torch.randn(3000, 32, generator=torch.Generator().manual_seed(0))
    assert abs(S5.fid_from_features(f, f)) < 1e-8
    # a shifted copy: exactly the squared shift
    assert math.isclose(S5.fid_from_features(f, f + 0.5), 32 * 0.25, rel_tol=1e-8)
    # rank-deficient covariances (fewer samples than dims) stay finite and non-negative
    g = torch.randn(20, 64, generator=torch.Generator().manual_seed(1))
    assert 0 <= S5.fid_from_features(g, g.flip(0) * 1.1) < float("inf")


def test_precision_recall_point_clouds():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 8, generator=g)
    p, r = S5.precision_recall(real, real.clone())
    assert p == 1.0 and r == 1.0
    p, r = S5.precision_recall(real, real + 100)
    assert p == 0.0 and r == 0.0
    p, r = S5.precision_recall(real, torch.randn(1000, 8, generator=g))  # same distribution
    assert p > 0.8 and r > 0.8
    # a collapsed generator: precise but without recall
    p, r = S5.precision_recall(real, real[:1].repeat(1000, 1) + 0.01 * torch.randn(1000, 8, generator=g))
    assert p == 1.0 and r < 0.05


def test_diversity_and_fidelity():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert math.isclose(S5.mean_pairwise_distance(x), (5 + 5 + 0) * 2 / 6)
    groups = torch.tensor([0, 0, 1])
    assert math.isclose(S5.diversity(x, groups), 5.0)  # group 1 has one sample: skipped
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert S5.fidelity(a, b) == 1.0 and S5.fidelity(a, a) == 0.0


def test_seed_groups_mean_and_sample_std():
    import importlib
    groups = importlib.import_module("05_evaluate").seed_groups(
        {"teacher": dict(fid=0.1), "a #1": dict(fid=1.0, recall=None, nfe=1), "a #2": dict(fid=3.0, recall=None, nfe=1),
         "b": dict(fid=5.0)})
    assert set(groups) == {"a"} and set(groups["a"]) == {"fid", "nfe"}  # None columns are left out
    assert groups["a"]["fid"] == dict(mean=2.0, std=math.sqrt(2.0), n=2)


def test_toy_eval_classifier_is_fixed_by_its_seed(tmp_path):
    """FID-toy features come from this classifier: the same seed must give the same
    network (its initialisation included), another seed another network."""
    nets = [S5.train_toy_classifier(str(tmp_path / f"c{i}.pt"), steps=2, seed=s, log=lambda *a: None)
            for i, s in enumerate((0, 0, 1))]
    a, b, c = (n.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_teacher_samples_are_solved_once(tmp_path):
    """The toy teacher's samples depend only on the seeds (and teacher, solver, ...):
    the second evaluation reads back every one of them, the protocol's and diversity.png's
    (one sampling path, one cache), with the same table."""
    from conftest import run_script
    clf = tmp_path / "clf.pt"
    S5.train_toy_classifier(str(clf), steps=2)
    args = ["--out_dir", tmp_path, "--num_samples", 48, "--batch_per_device", 16, "--diversity_seeds", 2,
            "--grid_rows", 2, "--classifier", clf]
    first = run_script("05_evaluate.py", *args)
    m1 = json.load(open(tmp_path / "eval" / "metrics.json"))
    second = run_script("05_evaluate.py", *args)
    m2 = json.load(open(tmp_path / "eval" / "metrics.json"))
    caches = sorted(p.name.split("_")[2] for p in (tmp_path / "eval").glob("teacher_samples_*.pt"))
    assert caches == ["diversity", "eval"]
    assert "teacher samples: read from" not in first.stdout and second.stdout.count("teacher samples: read from") == 2
    assert m1 == m2  # every metric of every row, the teacher's time per image included (it is cached with them)


def test_frechet_distance_non_commuting_covariances():
    """2x2 covariances that do not commute, against the closed form that needs no
    matrix square root: for 2x2, tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    S1 is S2 = diag(4, 1/4) rotated by 45 degrees; the common wrong formula
    tr(sqrt(S1) sqrt(S2)) differs here by 0.39."""
    s1 = torch.tensor([[2.125, 1.875], [1.875, 2.125]], dtype=torch.float64)
    s2 = torch.tensor([[4.0, 0.0], [0.0, 0.25]], dtype=torch.float64)
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    tr_sqrt = math.sqrt((s1 @ s2).trace().item() + 2 * math.sqrt(torch.det(s1).item() * torch.det(s2).item()))
    exact = (mu1 - mu2).pow(2).sum().item() + s1.trace().item() + s2.trace().item() - 2 * tr_sqrt
    assert math.isclose(S5.frechet_distance(mu1, s1, mu2, s2), exact, rel_tol=1e-10)
    r = lambda m: (m + math.sqrt(torch.det(m).item()) * torch.eye(2, dtype=m.dtype)) / math.sqrt(m.trace().item() + 2 * math.sqrt(torch.det(m).item()))
    wrong = (mu1 - mu2).pow(2).sum().item() + s1.trace().item() + s2.trace().item() - 2 * (r(s1) @ r(s2)).trace().item()
    assert abs(wrong - exact) > 0.3  # so the check above tells the two formulas apart


def test_feature_statistics_match_numpy():
    """The mean and the covariance (normalised by n - 1, as numpy's np.cov) of features."""
    import numpy as np
    f = torch.randn(50, 6, generator=torch.Generator().manual_seed(3)) * torch.arange(1, 7)
    mu, cov = S5.feature_stats(f)
    assert torch.allclose(mu, f.double().mean(0))
    assert np.allclose(cov.numpy(), np.cov(f.double().numpy(), rowvar=False), rtol=1e-12, atol=1e-12)


def brute_force_precision_recall(real, fake, k):
    """Kynkaanniemi et al. 2019 by loops: a sample is covered when it lies within the
    distance from some point of the other set to that point's k-th nearest neighbour."""
    def radii(x):
        return [sorted(((a - b).norm().item() for b in x))[k] for a in x]  # index 0 is the point itself
    def covered(q, ref, rad):
        return sum(any((x - y).norm().item() <= r for y, r in zip(ref, rad)) for x in q) / len(q)
    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_equals_a_brute_force_loop_and_k_matters():
    g = torch.Generator().manual_seed(5)
    real, fake = torch.randn(60, 3, generator=g), torch.randn(50, 3, generator=g) * 1.6 + 0.3
    ref = brute_force_precision_recall(real.double(), fake.double(), 3)
    assert S5.precision_recall(real, fake) == pytest.approx(ref, abs=1e-6)  # the default k is the paper's 3
    k2 = brute_force_precision_recall(real.double(), fake.double(), 2)
    assert S5.precision_recall(real, fake, k=2) == pytest.approx(k2, abs=1e-6) and abs(k2[0] - ref[0]) > 0.03


def test_cifar10_fid_protocol(tmp_path, monkeypatch):
    """Table 6's protocol, as EDM's fid.py: FID of uint8 samples against the training set's
    Inception statistics, given as a folder of real images or as EDM's reference .npz
    (mu, sigma), which give the same FID; a bad --fid_ref stops before any sampling.
    Stand-ins: a closed-form EDM network and a fixed random feature map for Inception."""
    import numpy as np
    from PIL import Image
    from fake_edm import make_fake_edm_pickle
    from standin_eval import stand_in_cifar_inception
    pkl, pypath = make_fake_edm_pickle(str(tmp_path / "edm"))
    monkeypatch.syspath_prepend(pypath)
    monkeypatch.setattr(S5, "load_cifar_inception", stand_in_cifar_inception)
    real = tmp_path / "cifar_train" / "00000"
    real.mkdir(parents=True)
    imgs = np.random.RandomState(0).randint(0, 255, (12, 32, 32, 3)).astype(np.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(real / f"img{i:08d}.png")
    argv = ["--preset", "cifar10", "--teacher", pkl, "--num_samples", 20, "--batch_per_device", 10, "--num_steps", 4,
            "--teacher_dtype", "float32", "--grid_rows", 2, "--diversity_seeds", 2]
    run = lambda ref, out: S5.main([str(a) for a in argv + ["--fid_ref", ref, "--out_dir", tmp_path / out]]) or \
        json.load(open(tmp_path / out / "eval" / "metrics.json"))["teacher"]
    from_folder = run(tmp_path / "cifar_train", "a")
    feats = stand_in_cifar_inception()
    f_real = feats(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    cached = torch.load(next((tmp_path / "a" / "eval").glob("teacher_samples_eval_*.pt")), weights_only=False)["x"]
    assert from_folder["fid_20"] == pytest.approx(S5.fid_from_features(f_real, feats(S5.to_uint8(cached))), rel=1e-6)
    mu, sigma = S5.feature_stats(f_real)
    np.savez(tmp_path / "ref.npz", mu=mu.numpy(), sigma=sigma.numpy())
    assert run(tmp_path / "ref.npz", "b")["fid_20"] == pytest.approx(from_folder["fid_20"], rel=1e-6)
    assert (tmp_path / "a" / "eval" / "results.md").read_text().startswith("protocol: CIFAR10 (Table 6)")
    np.savez(tmp_path / "bad.npz", mu=mu.numpy())
    Image.fromarray(imgs[0][:16]).save(real / "small.png")
    np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # Inception's width, not the stand-in's 16
    for ref, msg in [(tmp_path / "none.npz", "does not exist"), (tmp_path / "bad.npz", "not a .npz file with mu and sigma"),
                     (tmp_path / "wide.npz", "2048 features, the Inception's 16"), (tmp_path / "cifar_train", "not 32x32")]:
        with pytest.raises(SystemExit, match=f"--fid_ref.*{msg}"):
            run(ref, "c")
        assert not list((tmp_path / "c" / "eval").glob("teacher_samples_*"))  # stopped before any sampling
    assert S5.to_uint8(torch.tensor([-1.0, 0.0, 1.0, 0.999])).tolist() == [0, 128, 255, 255]  # EDM's x * 127.5 + 128


def test_fid_input_is_clean_fids(monkeypatch):
    """FID's input (§4, GigaGAN's protocol through clean-fid): uint8 images, PIL bicubic
    512 -> 256 as uint8, then clean-fid's own make_resizer("PIL", False, "bicubic", 299);
    our clean_resize (used when clean-fid is missing) is the same PIL calls, bit for bit.
    Real images (already 256 px) take the same path without the first resize."""
    import builtins
    import numpy as np
    from PIL import Image
    resize = pytest.importorskip("cleanfid.resize")  # pip install --no-deps clean-fid (no weights needed)
    theirs = resize.make_resizer("PIL", False, "bicubic", (299, 299))
    rng = np.random.RandomState(0)
    for shape in [(256, 256, 3), (64, 48, 3), (512, 512, 3)]:
        im = rng.randint(0, 256, shape).astype(np.uint8)
        assert np.array_equal(S5.clean_resize(im, 299), theirs(im)), shape
    x = torch.rand(2, 3, 512, 512) * 2 - 1  # generated images in [-1, 1]
    u8 = S5.C.to_uint8(x)
    want = np.stack([theirs(np.asarray(Image.fromarray(im).resize((256, 256), Image.BICUBIC))) for im in u8])
    got = S5.inception_input(x)
    assert got.shape == (2, 3, 299, 299) and np.array_equal(got.permute(0, 2, 3, 1).numpy(), want)
    real = torch.from_numpy(rng.randint(0, 256, (1, 3, 256, 256))).float() / 127.5 - 1  # as C.load_image returns them
    assert np.array_equal(S5.inception_input(real)[0].permute(1, 2, 0).numpy(), theirs(S5.C.to_uint8(real)[0]))
    real_import = builtins.__import__  # without clean-fid: the same numbers from clean_resize
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **kw: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("cleanfid") else real_import(name, *a, **kw))
    assert torch.equal(S5.inception_input(x), got)
