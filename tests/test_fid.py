"""Tests of fid.py: the Inception network and features against pytorch-fid fixtures, the Fréchet distance
against closed forms, precision/recall against a brute-force reading of Kynkäänniemi et al. 2019,
density/coverage against Naeem et al. 2020 (brute force and the expectations of their Lemmas 1-2), the
k-NN tie rule on grey-level grids, the class histogram, the noise floor, the reference cache and the
command line.

    pytest -q tests/test_fid.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fid
from shared_fixtures import fixture

ROOT = Path(__file__).resolve().parents[1]




def weight_rule(net: torch.nn.Module) -> torch.nn.Module:
    """The deterministic weights of the fixture (README_ddpm_fid.md section 5), entry i seeded with i."""
    with torch.no_grad():
        for i, (name, v) in enumerate(net.state_dict().items()):
            g, shape = torch.Generator().manual_seed(i), v.shape
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith(".weight") and len(shape) >= 2:
                v.copy_(torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:])))
            elif name.endswith(".weight"):
                v.copy_(1 + 0.1 * torch.randn(shape, generator=g))
            elif name.endswith((".bias", ".running_mean")):
                v.copy_(0.1 * torch.randn(shape, generator=g))
            elif name.endswith(".running_var"):
                v.copy_(1 + 0.1 * torch.rand(shape, generator=g))
            else:
                raise AssertionError(f"weight rule does not cover {name}")
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return weight_rule(fid.FIDInception())


@pytest.fixture(scope="module")
def inception_fixture():
    return torch.load(fixture("inception_fixture.pt"), weights_only=True)


@pytest.fixture(scope="module")
def fixture_features(net, inception_fixture):
    return fid.inception_features(inception_fixture["images"], net, batch_size=64, progress=False)


# ----------------------------------------------------------------------------------------------------
# The network and its features


def test_state_dict_equals_released_keys():
    spec = json.loads(fixture("inception_keys.json").read_text())
    sd = fid.FIDInception().state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(k, s) for k, s in spec["keys"]]
    assert sum(p.numel() for p in fid.FIDInception().parameters()) == spec["total_params"] == 23_850_960


def test_features_match_pytorch_fid(net, inception_fixture, fixture_features):
    feats = fixture_features
    assert feats.dtype == np.float64 and feats.shape == (8, 2048)
    assert np.abs(feats - inception_fixture["features"].double().numpy()).max() < 1e-4
    # the same images as floats in [-1, 1] give the same features (to float32 rounding)
    floats = fid.inception_features(inception_fixture["images"][:2].float() / 127.5 - 1, net, progress=False)
    assert np.abs(floats - feats[:2]).max() < 1e-4


def test_features_do_not_depend_on_batch_size(net, inception_fixture, fixture_features):
    for batch_size in (1, 7):  # 8 batches of 1; batches of 7 and 1; (fixture_features: one batch of 8)
        feats = fid.inception_features(inception_fixture["images"], net, batch_size=batch_size, progress=False)
        assert np.abs(feats - fixture_features).max() < 1e-5


def test_grey_images_are_repeated_to_rgb(net):
    grey = torch.randint(0, 256, (1, 1, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    a = fid.inception_features(grey, net, progress=False)
    b = fid.inception_features(grey.repeat(1, 3, 1, 1), net, progress=False)
    assert np.abs(a - b).max() < 1e-6 and np.abs(a).max() > 0.01


RELEASED = os.path.join(torch.hub.get_dir(), "checkpoints", fid.WEIGHTS_FILE)


@pytest.mark.skipif(not os.path.isfile(RELEASED), reason=f"no released FID Inception weights at {RELEASED}")
def test_released_weights_tell_made_digits_apart():
    """The weights file as users have it (pytorch-fid's layout, in the torch hub cache): it loads strictly, and its
    pool3 features of 32x32 greyscale strokes (four shifted bars, four shifted rings) are non-negative (an average of
    ReLUs), with each image nearer the other three of its kind than any of the other kind."""
    net = fid.load_inception()
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    bars = [((xx - 14 - d).abs() < 2) & ((yy - 16).abs() < 10) for d in range(4)]
    rings = [((((xx - 14 - d) ** 2 + (yy - 16) ** 2).sqrt() - 8).abs() < 1.5) for d in range(4)]
    images = (torch.stack(bars + rings)[:, None] * 255).to(torch.uint8)  # (8, 1, 32, 32)
    f = fid.inception_features(images, net, progress=False)
    assert f.shape == (8, 2048) and f.min() >= 0 and np.isfinite(f).all()
    d = np.linalg.norm(f[:, None] - f[None], axis=-1)  # (8, 8)
    kind = np.arange(8) // 4
    assert all(d[i][(kind == kind[i]) & (np.arange(8) != i)].max() < d[i][kind != kind[i]].min() for i in range(8))


def test_pixel_features_scale_to_minus_one_one():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).reshape(1, 1, 1, 3).repeat(2, 3, 1, 1)  # (2, 3, 1, 3)
    f = fid.pixel_features(x)
    assert f.dtype == np.float64 and f.shape == (2, 9)
    assert np.allclose(f[0, :3], [-1.0, 1.0, 51 / 127.5 - 1], atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance

# the square-root methods: scipy's sqrtm (pytorch-fid), LAPACK's pivoted Cholesky + eigenvalues, and the same
# trace from torch's eigh on a device (retrain.py's on a GPU; here on the CPU)
METHODS = (("sqrtm", None), ("eigh", None), ("eigh", "cpu"))


def test_fixture_stats_and_distance(inception_fixture):
    fx = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in inception_fixture.items()}
    mu_a, sigma_a = fid.feature_stats(fx["feats_a"])
    assert np.abs(mu_a - fx["mu_a"]).max() < 1e-12 and np.abs(sigma_a - fx["sigma_a"]).max() < 1e-12
    for method, device in METHODS:
        d = fid.frechet_distance(fx["mu_a"], fx["sigma_a"], fx["mu_b"], fx["sigma_b"], method=method, device=device)
        assert abs(d - fx["fd_ab"]) < 1e-6


def test_distance_of_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 3, size=5), rng.uniform(0.5, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method, device in METHODS:
        d = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method, device=device)
        assert abs(d - expected) < 1e-10


def test_distance_of_rotated_gaussians():
    # both rotated alike (commuting): same value as the diagonal pair
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.5, 3, size=6), rng.uniform(0.5, 3, size=6)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method, device in METHODS:
        d = fid.frechet_distance(np.zeros(6), q @ np.diag(a) @ q.T, np.zeros(6), q @ np.diag(b) @ q.T, method=method,
                                 device=device)
        assert abs(d - expected) < 1e-10
    # only one rotated (not commuting), 2-d: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2
    th = 0.7
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    s1, s2 = np.diag([4.0, 1.0]), r @ np.diag([9.0, 0.25]) @ r.T
    m = s1 @ s2
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    for method, device in METHODS:
        assert abs(fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, method=method, device=device) - expected) < 1e-10
    assert abs(expected - (5.0 + 9.25 - 2 * (6.0 + 0.5))) > 0.1  # differs from the unrotated pair


@pytest.mark.parametrize("n", [500, 40])  # full rank, and fewer samples than dimensions (singular covariances)
def test_eigh_on_a_device_matches_scipy_sqrtm(n):
    """The device path (torch eigh, float64) against pytorch-fid's scipy sqrtm on random correlated features."""
    rng = np.random.default_rng(n)
    mix = rng.normal(size=(64, 64))
    mu1, s1 = fid.feature_stats(rng.normal(size=(n, 64)) @ mix)
    mu2, s2 = fid.feature_stats(rng.normal(size=(n, 64)) @ (mix + 0.3 * rng.normal(size=(64, 64))) + 0.5)
    ref = fid.frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    got = fid.frechet_distance(mu1, s1, mu2, s2, method="eigh", device="cpu")
    assert ref > 1 and abs(got - ref) < 1e-7 * ref


def test_distance_to_itself_is_zero_and_symmetric():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)), rng.normal(size=(300, 16)) + 0.3
    mx, sx = fid.feature_stats(x)
    my, sy = fid.feature_stats(y)
    for method in ("sqrtm", "eigh"):
        assert abs(fid.frechet_distance(mx, sx, mx, sx, method=method)) < 1e-8
        dxy = fid.frechet_distance(mx, sx, my, sy, method=method)
        dyx = fid.frechet_distance(my, sy, mx, sx, method=method)
        assert dxy > 1 and abs(dxy - dyx) < 1e-8 * dxy


def test_eigh_method_is_exact_for_fewer_images_than_dimensions():
    # centred features A (n1, D), B (n2, D): tr((S1 S2)^(1/2)) = nuclear norm of A B^T / sqrt((n1-1)(n2-1))
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(20, 300)) @ rng.normal(size=(300, 300)) * 0.1, rng.normal(size=(15, 300)) + 0.2
    (mx, sx), (my, sy) = fid.feature_stats(x), fid.feature_stats(y)
    a, b = x - mx, y - my
    trace = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(19 * 14)
    expected = np.sum((mx - my) ** 2) + np.trace(sx) + np.trace(sy) - 2 * trace
    assert abs(fid.frechet_distance(mx, sx, my, sy, method="eigh") - expected) < 1e-9 * expected


# ----------------------------------------------------------------------------------------------------
# Precision and recall


def brute_force_precision_recall(real, fake, k):
    """Kynkäänniemi et al. 2019 in float64 numpy: radius = k-th nearest other point, strict <."""
    def inside(q, m):
        dm = np.linalg.norm(m[:, None] - m[None], axis=-1)
        radii = np.sort(dm, axis=1)[:, k]                       # column 0 is the point itself
        return (np.linalg.norm(q[:, None] - m[None], axis=-1) < radii[None]).any(axis=1).mean()
    return inside(fake, real), inside(real, fake)


def test_precision_recall_matches_brute_force_in_chunks():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(150, 5)), rng.normal(size=(120, 5)) * 1.5 + 0.5
    expected = brute_force_precision_recall(real, fake, 3)
    assert 0.2 < expected[0] < 0.99 and 0.2 < expected[1] < 0.99  # a case where the radii decide
    for chunk in (10000, 37):
        assert fid.precision_recall(real, fake, k=3, device="cpu", chunk=chunk) == pytest.approx(expected, abs=1e-12)


def test_radius_is_kth_other_point_and_strict():
    real = np.array([[0.0], [1.0], [3.0]])  # k = 1 radii: 1, 1, 2
    assert fid.precision_recall(real, np.array([[2.0], [-1.0]]), k=1, device="cpu")[0] == 0.5  # -1 is on a boundary
    assert fid.precision_recall(real, np.array([[2.0], [-0.999]]), k=1, device="cpu")[0] == 1.0


def test_precision_recall_identical_and_half_covered():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 8))
    assert fid.precision_recall(x, x, device="cpu") == (1.0, 1.0)
    real = np.concatenate([rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + 20.0])  # two far-apart clusters
    precision, recall = fid.precision_recall(real, rng.normal(size=(500, 2)), device="cpu")  # covers one
    assert precision > 0.95 and 0.45 < recall <= 0.5
    both = np.concatenate([rng.normal(size=(250, 2)), rng.normal(size=(250, 2)) + 20.0])
    assert fid.precision_recall(real, both, device="cpu")[1] > 0.9


# ----------------------------------------------------------------------------------------------------
# Density and coverage, the tie rule, class metrics and the noise floor


def brute_force_prdc(real, fake, k, inclusive=False):
    """Naeem et al. 2020, eqs. 1-4, in float64 numpy, every distance at once."""
    inside = np.less_equal if inclusive else np.less
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    r_real, r_fake = np.sort(d_rr, axis=1)[:, k], np.sort(d_ff, axis=1)[:, k]     # column 0: the point itself
    d = np.linalg.norm(real[:, None] - fake[None], axis=-1)                        # (N, M)
    in_real = inside(d, r_real[:, None])                                           # fake j in the ball of real i
    in_fake = inside(d, r_fake[None])                                              # real i in the ball of fake j
    return {"precision": in_real.any(0).mean(), "recall": in_fake.any(1).mean(),
            "density": in_real.sum() / (k * len(fake)), "coverage": in_real.any(1).mean()}


@pytest.mark.parametrize("k", [3, 5])
def test_prdc_matches_brute_force_in_chunks(k):
    rng = np.random.default_rng(10 + k)
    real, fake = rng.normal(size=(140, 6)), rng.normal(size=(110, 6)) * 1.3 + 0.4
    expected = brute_force_prdc(real, fake, k)
    assert all(0.1 < v < 1 for v in expected.values())                             # the radii decide every metric
    for chunk in (10000, 29):
        got = fid.prdc(real, fake, k=k, device="cpu", chunk=chunk)
        assert got == pytest.approx(expected, abs=1e-12)
        assert fid.precision_recall(real, fake, k=k, device="cpu", chunk=chunk) == (got["precision"], got["recall"])


def test_tie_rule_by_hand_on_grey_levels():
    # 1-d, k = 1, grey levels 0..16. Real radii: 0 -> 0 (its copy), 0 -> 0, 4 -> 4, 8 -> 4; fake radii: 0 -> 4,
    # 4 -> 2, 6 -> 2. Strict: fake 0 lies in no ball (its distance 0 equals the copies' radius 0, and 4 equals
    # the radius of 4); inclusive (<=): it lies in three, and real 0, 0 and 8 sit exactly on a boundary too.
    real, fake = np.array([[0.0], [0.0], [4.0], [8.0]]), np.array([[0.0], [4.0], [6.0]])
    strict = {"precision": 2 / 3, "recall": 3 / 4, "density": 3 / 3, "coverage": 2 / 4}
    inclusive = {"precision": 1.0, "recall": 1.0, "density": 7 / 3, "coverage": 1.0}
    assert fid.prdc(real, fake, k=1, device="cpu") == pytest.approx(strict, abs=1e-12)
    assert fid.prdc(real, fake, k=1, device="cpu", inclusive=True) == pytest.approx(inclusive, abs=1e-12)
    assert brute_force_prdc(real, fake, 1) == pytest.approx(strict) and \
        brute_force_prdc(real, fake, 1, inclusive=True) == pytest.approx(inclusive)


def test_tie_rule_on_a_17_level_grid():
    """2-d points on the digits' 17 grey levels: distances repeat, and the two rules give other numbers.
    The default is the strict rule (fld's); float32 distances of small integers are exact, so both rules
    match the float64 brute force exactly, here through the matrix-product path of cdist (> 25 rows)."""
    rng = np.random.default_rng(12)
    real, fake = rng.integers(0, 17, size=(80, 2)).astype(float), rng.integers(0, 17, size=(70, 2)).astype(float)
    strict, inclusive = brute_force_prdc(real, fake, 3), brute_force_prdc(real, fake, 3, inclusive=True)
    assert all(inclusive[m] > strict[m] + 0.02 for m in strict)                    # ties change every metric
    for chunk in (10000, 7):
        assert fid.prdc(real, fake, device="cpu", chunk=chunk) == pytest.approx(strict, abs=1e-12)
        assert fid.prdc(real, fake, device="cpu", chunk=chunk, inclusive=True) == pytest.approx(inclusive, abs=1e-12)


@pytest.mark.parametrize("n_real,n_fake,k", [(100, 100, 3), (60, 180, 3), (150, 50, 5)])
def test_coverage_and_density_of_one_distribution_match_their_expectations(n_real, n_fake, k):
    """Naeem et al. 2020: E[coverage] = 1 - prod_{i=1..k} (N - i)/(N + M - i) (Lemma 2), E[density] = 1
    (Lemma 1), for real and fake samples of one distribution; 300 draws, within 4 standard errors."""
    rng = np.random.default_rng(n_real + n_fake + k)
    runs = [fid.prdc(rng.normal(size=(n_real, 4)), rng.normal(size=(n_fake, 4)), k=k, device="cpu") for _ in range(300)]
    for name, expected in (("coverage", fid.expected_coverage(n_real, n_fake, k)), ("density", 1.0)):
        values = np.array([r[name] for r in runs])
        assert abs(values.mean() - expected) < 4 * values.std(ddof=1) / np.sqrt(len(values)), name
    assert fid.expected_coverage(100, 100, 3) == pytest.approx(1 - (99 * 98 * 97) / (199 * 198 * 197))
    assert abs(fid.expected_coverage(60, 180, 3) - fid.expected_coverage(100, 100, 3)) > 0.1  # the test can tell


def test_class_metrics_by_hand():
    real = np.array([0] * 50 + [1] * 30 + [2] * 20)                                # shares 0.5, 0.3, 0.2
    pred = np.array([0] * 6 + [1] * 3 + [2] * 1)                                   # shares 0.6, 0.3, 0.1
    m = fid.class_metrics(pred, real, 3)
    assert m == {"class_tv": pytest.approx(0.1), "classes": 3, "class_hist": [6, 3, 1]}
    collapsed = np.array([0] * 95 + [2] * 5)                                       # class 1 lost, class 2 thinned
    m = fid.class_metrics(collapsed, real, 4)                                      # a fourth class, absent from both
    assert m["class_tv"] == pytest.approx(0.5 * (0.45 + 0.3 + 0.15)) and m["class_hist"] == [95, 0, 5, 0]
    assert m["classes"] == 2 and fid.class_metrics(collapsed, real, 4, min_frac=0.3)["classes"] == 1  # 5 <= 0.3*20
    assert fid.class_metrics(np.array([0] * 99 + [1]), real, 3)["classes"] == 1                     # 1 <= 0.1*30
    assert fid.class_metrics(np.array([0] * 99 + [1]), real, 3, min_frac=0)["classes"] == 2         # count > 0
    with pytest.raises(ValueError):
        fid.class_metrics(np.array([0, 3]), real, 3)


def test_feature_metrics_and_noise_floor():
    """noise_floor by hand: 3 random pairs of disjoint halves of 200 (PCG64 from the seed), FD scaled from 200 vs 200 to
    100 vs 400 as 1/n1 + 1/n2, the rest at the halves' size; class_tv from 100 labels drawn from the real shares."""
    rng = np.random.default_rng(13)
    feats, labels = rng.normal(size=(401, 5)), rng.integers(0, 4, size=401)
    floor = fid.noise_floor(feats, 100, 400, splits=3, seed=3, labels=labels)
    rng = np.random.default_rng(3)
    runs = [fid.feature_metrics(feats[p[:200]], feats[p[200:400]]) for p in (rng.permutation(401) for _ in range(3))]
    q = np.bincount(labels) / 401
    tv = [0.5 * np.abs(rng.multinomial(100, q) / 100 - q).sum() for _ in range(3)]
    for key, values in [*((k, [r[k] for r in runs]) for k in ("precision", "recall", "density", "coverage")),
                        ("fd", [r["fd"] * 100 * (1 / 100 + 1 / 400) for r in runs]), ("class_tv", tv)]:
        assert floor[key] == pytest.approx([np.mean(values), np.std(values, ddof=1)]), key
    assert (floor["n_fake"], floor["n_ref"], floor["n_half"], floor["splits"]) == (100, 400, 200, 3)
    assert fid.noise_floor(feats, 100, 400, splits=3, seed=3, labels=labels) == floor
    assert fid.noise_floor(feats, 100, 400, splits=3, seed=4)["fd"] != floor["fd"]
    assert set(fid.noise_floor(feats, splits=2)) == {"fd", "precision", "recall", "density", "coverage", "n_fake", "n_ref",
                                                     "n_half", "splits", "seed"}
    half = fid.noise_floor(feats, splits=3, seed=3)  # at the halves' own size: the splits' FD unscaled
    assert half["fd"][0] == pytest.approx(np.mean([r["fd"] for r in runs]))
    shifted = fid.feature_metrics(feats[:200], feats[200:400] + 1.0)               # a real change stands above it
    assert shifted["fd"] > half["fd"][0] + 4 * half["fd"][1] + 4 and shifted["coverage"] < half["coverage"][0] - 0.3


def test_nearest_distances():
    points = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    queries = np.array([[0.0, 1.0], [3.0, 4.0], [9.0, 0.0], [6.0, 8.0]])
    assert fid.nearest_distances(queries, points) == pytest.approx([1.0, 0.0, 1.0, 5.0])
    assert fid.nearest_distances(queries, points, chunk=1) == pytest.approx([1.0, 0.0, 1.0, 5.0])  # across blocks


# ----------------------------------------------------------------------------------------------------
# Reference cache, weights loading, command line


def test_reference_cache_and_mismatch(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (40, 1, 8, 8), generator=g, dtype=torch.uint8)
    path = tmp_path / "ref.npz"
    ref = fid.reference(images, "digits", str(path), split="all")
    assert path.exists() and ref["count"] == 40 and ref["kind"] == "pixel"
    monkeypatch.setattr(fid, "pixel_features", lambda x: pytest.fail("the cached reference was recomputed"))
    cached = fid.reference(images, "digits", str(path), split="all")
    assert np.array_equal(cached["mu"], ref["mu"]) and np.array_equal(cached["sigma"], ref["sigma"])
    assert np.array_equal(cached["features"], ref["features"]) and cached["sha256"] == ref["sha256"]
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    with pytest.raises(fid.ReferenceMismatch, match="sha256"):
        fid.reference(other, "digits", str(path), split="all")
    with pytest.raises(fid.ReferenceMismatch, match="split"):
        fid.reference(images, "digits", str(path), split="train")
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary file left behind


def test_missing_weights_raise_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(fid.CFG.weights_env, raising=False)
    with pytest.raises(fid.InceptionUnavailable) as e:
        fid.load_inception(str(tmp_path / "nope.pth"))
    assert "\n" not in str(e.value) and fid.CFG.weights_url in str(e.value)
    monkeypatch.setenv(fid.CFG.weights_env, str(tmp_path / "nope.pth"))
    with pytest.raises(fid.InceptionUnavailable):
        fid.load_inception()


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "fid.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_calc_on_a_tiny_set(tmp_path, net):
    weights = tmp_path / "w.pth"
    torch.save(net.state_dict(), weights)
    g = torch.Generator().manual_seed(6)
    np.save(tmp_path / "real.npy", torch.randint(0, 256, (6, 8, 8, 3), generator=g, dtype=torch.uint8).numpy())
    np.save(tmp_path / "fake.npy", torch.randint(0, 256, (5, 3, 8, 8), generator=g, dtype=torch.uint8).numpy())
    ref = tmp_path / "ref.npz"
    r = run_cli("calc", str(tmp_path / "fake.npy"), "--data", str(tmp_path / "real.npy"), "--ref", str(ref),
                "--inception", str(weights), "--device", "cpu", "--fd", "eigh")  # sqrtm at 2048-d: ~40 CPU-s
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["n"] == 5 and out["n_ref"] == 6 and out["fd"] == "eigh" and math.isfinite(out["fid"]) and out["fid"] > 0
    assert 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1
    assert "warning: only" in r.stderr  # fewer than 2048 images
    assert fid.load_reference(str(ref))["count"] == 6


def test_cli_calc_takes_two_image_sets_as_pytorch_fid(tmp_path):
    """`fid.py calc A B` measures A against B, the same numbers as `calc A --data B`; a third set is refused."""
    g = torch.Generator().manual_seed(7)
    for name, n in (("a", 20), ("b", 30)):
        np.save(tmp_path / f"{name}.npy", torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8).numpy())
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    two = run_cli("calc", a, b, "--pixel", "--device", "cpu")
    one = run_cli("calc", a, "--data", b, "--pixel", "--device", "cpu")
    assert two.returncode == 0 and one.returncode == 0, two.stderr
    drop = lambda out: {k: v for k, v in json.loads(out).items() if k != "seconds"}
    assert drop(two.stdout) == drop(one.stdout) and drop(two.stdout)["n"] == 20 and drop(two.stdout)["n_ref"] == 30
    three = run_cli("calc", a, b, a, "--pixel", "--device", "cpu")
    assert three.returncode == 1 and "second image set" in three.stderr


def test_a_long_matrix_square_root_is_announced(capsys):
    """scipy's sqrtm takes about a minute at 3,072 dimensions (32 x 32 x 3 pixels): said before it starts."""
    fid.frechet_distance(np.zeros(1024), np.eye(1024), np.zeros(1024), np.eye(1024))
    assert "sqrtm of 1024x1024 matrices" in capsys.readouterr().err
    fid.frechet_distance(np.zeros(64), np.eye(64), np.zeros(64), np.eye(64))
    assert capsys.readouterr().err == ""


def test_cli_missing_weights_is_a_one_line_error(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 8, 8), np.uint8))
    r = run_cli("calc", str(tmp_path / "x.npy"), "--data", str(tmp_path / "x.npy"),
                "--inception", str(tmp_path / "missing.pth"), "--device", "cpu")
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "missing.pth" in r.stderr
