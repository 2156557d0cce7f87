"""Tests for edm.py: agreement with NVIDIA's reference implementation (fixtures edm_small.pt and the state-dict key
lists of the released networks), the closed forms of Karras et al. 2022, the restricted loader of released .pkl
files, and the model interface retrain.py relies on.

    pytest tests/test_edm.py
"""

import io
import json
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import edm
from shared_fixtures import fixture

SIGMAS = [0.002, 0.02, 0.3, 0.5, 1.0, 4.0, 80.0]



@pytest.fixture(scope="module")
def ref():
    return torch.load(fixture("edm_small.pt"), weights_only=True)


def reference_net(ref, class_name):
    net = edm.denoiser_from_kwargs(class_name, ref["kwargs"])
    net.load_state_dict(ref["state_dict"], strict=True)
    return net.eval()


def perturb(module, seed=1):
    """Move every weight off its initialisation (as the fixtures do), so output layers are not ~0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def small_model(**overrides):
    cfg = edm.make_config("small", **{"model_channels": 16, "num_blocks": 1, "batch": 32, **overrides})
    return edm.Model(cfg, "cpu")


# ----------------------------------------------------------------------------------------------------
# Reference fixtures (tolerances from the fixtures README, section 5)


def test_songunet_matches_reference(ref):
    net, x, out = reference_net(ref, "VPPrecond").model, ref["inputs"]["x"], ref["output"]
    with torch.no_grad():
        plain = net(x, ref["inputs"]["noise_labels"])
        augmented = net(x, ref["inputs"]["noise_labels"], ref["inputs"]["augment_labels"])
        edm_labels = net(x, ref["inputs"]["noise_labels_edm"])
    assert (plain - out["songunet"]).abs().max() < 1e-5
    assert (augmented - out["songunet_with_augment_labels"]).abs().max() < 1e-5
    assert (edm_labels - out["songunet_edm_noise_labels"]).abs().max() < 1e-5
    assert (augmented - plain).abs().max() > 1e-3  # the augment labels do reach the network


def test_preconditioners_match_reference(ref):
    x, sigma = ref["inputs"]["x"], ref["inputs"]["sigma"]
    vp, ed = reference_net(ref, "VPPrecond"), reference_net(ref, "EDMPrecond")
    with torch.no_grad():
        assert (vp(x, sigma) - ref["output"]["vpprecond"]).abs().max() < 5e-4
        assert (ed(x, sigma) - ref["output"]["edmprecond"]).abs().max() < 1e-5
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(vp.coefficients(s)[3].flatten(), ref["inputs"]["noise_labels"], rtol=1e-6, atol=0)
    torch.testing.assert_close(ed.coefficients(s)[3].flatten(), ref["inputs"]["noise_labels_edm"], rtol=1e-6, atol=0)
    assert vp.sigma_min == ref["vp_constants"]["sigma_min"] and vp.sigma_max == ref["vp_constants"]["sigma_max"]


@pytest.mark.parametrize("kind", ["vp", "edm"])
def test_heun_sampler_matches_reference(ref, kind):
    s = ref["sampler"]
    net = reference_net(ref, {"vp": "VPPrecond", "edm": "EDMPrecond"}[kind])
    cfg = edm.make_config("paper", num_steps=s["num_steps"], sigma_min=s["sigma_min"], sigma_max=s["sigma_max"],
                          rho=s["rho"], S_churn=s["S_churn"], S_min=s["S_min"], S_max=s["S_max"],
                          S_noise=s["S_noise"])
    calls = []

    def D(x, sigma):
        calls.append(float(sigma))
        return net(x, sigma)

    with torch.no_grad():
        x, nfe = edm.heun_sampler(D, ref["inputs"]["latents"], cfg)
    sigma_min, sigma_max = max(cfg.sigma_min, net.sigma_min), min(cfg.sigma_max, net.sigma_max)
    torch.testing.assert_close(edm.time_steps(cfg.num_steps, sigma_min, sigma_max, cfg.rho), s[f"t_steps_{kind}"],
                               rtol=1e-12, atol=0)
    assert nfe == 7 and calls == pytest.approx(s[f"call_sigmas_{kind}"], rel=1e-12)
    assert x.dtype == torch.float64
    tol = {"vp": 1e-3, "edm": 2e-4}[kind]
    assert (x - s[f"result_{kind}precond"]).abs().max() < tol


@pytest.mark.parametrize("preset,keys_file,n_params", [("paper", "edm_cifar10_keys.json", 55_733_891),
                                                       ("ffhq64", "edm_ffhq64_keys.json", 61_805_571)])
def test_paper_networks_have_the_released_keys(preset, keys_file, n_params):
    ref = json.loads(fixture(keys_file).read_text())
    with torch.device("meta"):  # shapes only, no memory
        net = edm.build_denoiser(edm.make_config(preset))
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == ref["keys"]
    assert sum(p.numel() for p in net.parameters()) == n_params == ref["num_parameters"]
    assert [k for k, _ in net.named_buffers()] == ref["buffer_keys"]


# ----------------------------------------------------------------------------------------------------
# Closed forms of Karras et al. 2022


class _Recorder(torch.nn.Module):
    """Stands in for the U-Net F: remembers its inputs, returns a fixed tensor."""

    def __init__(self, out):
        super().__init__()
        self.out, self.seen = out, None

    def forward(self, x, noise_labels, augment_labels=None):
        self.seen = (x, noise_labels)
        return self.out


def test_preconditioning_closed_forms():
    s = np.array(SIGMAS)  # float64, the formulas of Table 1 written out again
    sd = 0.5
    edm_ref = [sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2), 1 / np.sqrt(s ** 2 + sd ** 2),
               np.log(s) / 4]
    t = 999 ** -1  # VP: c_noise = (M - 1) t with sigma_VP(t) = sigma
    vp_ref = [np.ones_like(s), -s, 1 / np.sqrt(s ** 2 + 1)]
    x = torch.randn(len(s), 2, 3, 3)
    F_out = torch.randn(len(s), 2, 3, 3)
    for cls, want in [(edm.EDMPrecond, edm_ref), (edm.VPPrecond, vp_ref)]:
        net = cls(_Recorder(F_out))
        sig = torch.tensor(SIGMAS, dtype=torch.float32)
        coeffs = net.coefficients(sig.reshape(-1, 1, 1, 1))
        for got, exp in zip(coeffs, want):
            np.testing.assert_allclose(got.flatten().double().numpy(), exp, rtol=2e-6)
        # D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
        c_skip, c_out, c_in, c_noise = coeffs
        D = net(x, sig)
        torch.testing.assert_close(D, c_skip * x + c_out * F_out)
        torch.testing.assert_close(net.model.seen[0], c_in * x)
        torch.testing.assert_close(net.model.seen[1], c_noise.flatten())
    # VP noise label: sigma(c_noise / (M - 1)) = sigma, with sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
    c_noise = edm.VPPrecond(_Recorder(F_out)).coefficients(torch.tensor(s).reshape(-1, 1, 1, 1))[3].flatten().numpy()
    tt = c_noise * t
    np.testing.assert_allclose(np.sqrt(np.exp(0.5 * 19.9 * tt ** 2 + 0.1 * tt) - 1), s, rtol=1e-9)


def test_time_step_grid():
    n, lo, hi, rho = 18, 0.002, 80.0, 7.0
    i = np.arange(n)
    want = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    got = edm.time_steps(n, lo, hi, rho)
    assert got.dtype == torch.float64 and got.shape == (n + 1,)
    np.testing.assert_allclose(got[:-1].numpy(), want, rtol=1e-14)
    assert got[0] == pytest.approx(hi, rel=1e-14) and got[n - 1] == pytest.approx(lo, rel=1e-12) and got[n] == 0
    assert bool((got[1:] < got[:-1]).all())


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_sampler_recovers_the_point_of_a_one_point_dataset(churn):
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    cfg = edm.make_config("paper", S_churn=churn, S_min=0.05, S_max=50.0, S_noise=1.003)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    x, nfe = edm.heun_sampler(lambda x, sigma: x0, torch.randn(3, 2, 4, 4), cfg, gens)  # ideal denoiser: always x0
    assert nfe == 35
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-10)


def test_sampler_is_second_order_on_the_gaussian_probability_flow():
    # data N(0, s^2): ideal denoiser x s^2 / (s^2 + sigma^2); the ODE keeps x / sqrt(s^2 + sigma^2) fixed
    s, z = 0.7, torch.randn(4, 1, 8, 8)
    errors = []
    for n in (18, 36, 72):
        cfg = edm.make_config("paper", num_steps=n)
        x, _ = edm.heun_sampler(lambda x, sigma: x * s ** 2 / (s ** 2 + sigma ** 2), z, cfg)
        exact = z.double() * cfg.sigma_max * s / math.sqrt(s ** 2 + cfg.sigma_max ** 2)
        errors.append(((x - exact).abs().max() / exact.abs().max()).item())
    assert errors[0] < 0.06 and errors[2] < 0.003
    assert 3.5 < errors[0] / errors[1] < 5 and 3.5 < errors[1] / errors[2] < 5  # halving the steps: error / 4


def test_dpm2m_is_second_order_on_the_gaussian_probability_flow_at_one_call_per_level():
    """Against the flow's exact end on the same grid (the flow to sigma_min, then D there, where both samplers
    land): the error falls ~4x per doubling of the levels, each level one call, and at the same number of calls
    it is far below Heun's; a one-point dataset comes out exactly, as for Heun."""
    s, z = 0.7, torch.randn(4, 1, 8, 8)

    def error(sampler, n):
        cfg = edm.make_config("paper", num_steps=n, sampler=sampler)
        x, nfe = edm.SAMPLERS[sampler](lambda x, sigma: x * s ** 2 / (s ** 2 + sigma ** 2), z, cfg)
        lo, hi = cfg.sigma_min, cfg.sigma_max
        exact = z.double() * hi * s ** 2 / math.sqrt((s ** 2 + hi ** 2) * (s ** 2 + lo ** 2))
        return ((x - exact).abs().max() / exact.abs().max()).item(), nfe

    (e18, n18), (e36, n36), (e72, _) = (error("dpm2m", n) for n in (18, 36, 72))
    assert (n18, n36) == (18, 36) and e18 < 0.08  # measured 0.057
    assert 3.5 < e18 / e36 < 6 and 3.5 < e36 / e72 < 6  # measured 4.8, 4.4
    heun, heun_nfe = error("heun", 18)
    assert heun_nfe == 35 and e36 < heun / 3  # 36 calls against Heun's 35: measured 4.2x smaller
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    x, _ = edm.dpm2m_sampler(lambda x, sigma: x0, torch.randn(3, 2, 4, 4), edm.make_config("paper", sampler="dpm2m"))
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="sampler"):
        edm.make_config("small", sampler="euler")
    with pytest.raises(ValueError, match="S_churn"):
        edm.make_config("small", sampler="dpm2m", S_churn=1.0)


# ----------------------------------------------------------------------------------------------------
# Released .pkl files: a snapshot written the way EDM's training loop writes them, and malicious files


MODULE_SRC = "import pathlib\npathlib.Path({marker!r}).touch()\n"  # what unpickling would run, were it exec'd


class EDMLoss:  # plain stand-ins for the other persistent objects of a snapshot
    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


class AugmentPipe:
    def __init__(self):
        self.p, self.xflip, self.Hz_geom = 0.12, 1e8, torch.randn(12)


def write_snapshot(path, net, class_name, init_kwargs, marker, monkeypatch, extra=None):
    """dict(ema, loss_fn, augment_pipe, dataset_kwargs), each persistent object pickled as
    torch_utils.persistence._reconstruct_persistent_obj(meta) with meta = type, version, module_src, class_name,
    state (the __dict__, with _init_args / _init_kwargs), as EDM's persistence module does."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called when loading with edm.load_official
        raise AssertionError("reference loader called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package = types.ModuleType("torch_utils")
    package.persistence = persistence
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)

    class SnapshotPickler(pickle.Pickler):
        def reducer_override(self, obj):
            persistent = (isinstance(obj, torch.nn.Module) and not isinstance(obj, torch.nn.ModuleDict)
                          or isinstance(obj, (EDMLoss, AugmentPipe)))
            if not persistent:
                return NotImplemented
            state = dict(obj.__dict__, _init_args=())
            state["_init_kwargs"] = init_kwargs if obj is net else {"skip_scale": np.float64(np.sqrt(0.5))}
            meta = dict(type="class", version=6, module_src=MODULE_SRC.format(marker=str(marker)),
                        class_name=class_name if obj is net else type(obj).__name__, state=state)
            return _reconstruct_persistent_obj, (meta,)

    data = dict(ema=net, loss_fn=EDMLoss(), augment_pipe=AugmentPipe(),
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip",
                                    use_labels=False, xflip=False, cache=True, resolution=16, max_size=50000))
    data.update(extra or {})
    with open(path, "wb") as f:
        SnapshotPickler(f, protocol=4).dump(data)


TINY_KWARGS = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
                   embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.13)


@pytest.mark.parametrize("class_name", ["EDMPrecond", "VPPrecond"])
def test_released_snapshot_loads_into_the_right_denoiser(tmp_path, monkeypatch, class_name):
    source = edm.denoiser_from_kwargs(class_name, TINY_KWARGS).eval().requires_grad_(False)
    perturb(source)
    path, marker = tmp_path / "edm-tiny-8x8-uncond-vp.pkl", tmp_path / "module_src_ran"
    write_snapshot(path, source, class_name, TINY_KWARGS, marker, monkeypatch)
    monkeypatch.delitem(sys.modules, "torch_utils.persistence")  # the loader needs none of EDM's code
    monkeypatch.delitem(sys.modules, "torch_utils")

    net = edm.load_official(path)
    assert type(net) is {"EDMPrecond": edm.EDMPrecond, "VPPrecond": edm.VPPrecond}[class_name]  # not the file name
    assert not marker.exists()  # module_src was never executed
    assert list(net.state_dict()) == list(source.state_dict())
    for k, v in source.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 7.0])
    with torch.no_grad():
        assert torch.equal(net(x, sigma), source(x, sigma))

    # --init PATH: weights into net and EMA, preconditioning from the file, no lr ramp-up again
    model = edm.Model(edm.make_config("small", img_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                      augment_dim=9, precond="edm"), "cpu")
    model.load_pretrained(str(path))
    assert model.cfg.precond == {"EDMPrecond": "edm", "VPPrecond": "vp"}[class_name]
    for k, v in source.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v) and torch.equal(model.ema.state_dict()[k], v), k
    assert model.lr() == model.cfg.lr


def test_pretrained_of_another_architecture_is_refused(tmp_path, monkeypatch):
    source = edm.denoiser_from_kwargs("EDMPrecond", TINY_KWARGS)
    path = tmp_path / "net.pkl"
    write_snapshot(path, source, "EDMPrecond", TINY_KWARGS, tmp_path / "m", monkeypatch)
    model = edm.Model(edm.make_config("small", img_channels=3, model_channels=32, channel_mult=(1, 2), num_blocks=1,
                                      augment_dim=9), "cpu")
    with pytest.raises(ValueError, match="model_channels=16"):
        model.load_pretrained(str(path))


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


class CallsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("how", ["reduce_os_system", "global_eval", "nested_in_snapshot"])
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, monkeypatch, how):
    path, marker = tmp_path / "edm-cifar10-32x32-uncond-vp.pkl", tmp_path / "pwned"
    if how == "reduce_os_system":
        path.write_bytes(pickle.dumps({"ema": RunsShell(marker)}, protocol=4))
    elif how == "global_eval":
        path.write_bytes(pickle.dumps({"ema": CallsEval(marker)}, protocol=2))
    else:  # a valid snapshot carrying one extra object
        source = edm.denoiser_from_kwargs("EDMPrecond", TINY_KWARGS)
        write_snapshot(path, source, "EDMPrecond", TINY_KWARGS, tmp_path / "m", monkeypatch,
                       extra={"dataset_kwargs": {"path": RunsShell(marker)}})
    refused = "refusing to load '(posix|nt|builtins|__builtin__)\\.(system|eval)'"
    with pytest.raises(pickle.UnpicklingError, match=refused):
        edm.load_official(path)
    assert not marker.exists()
    assert issubclass(edm.UnsafePickleError, pickle.UnpicklingError)


# ----------------------------------------------------------------------------------------------------
# Model interface


def test_make_config():
    cfg = edm.make_config("paper")
    assert (cfg.model_channels, cfg.channel_mult, cfg.num_blocks, cfg.attn_resolutions, cfg.augment_dim,
            cfg.dropout, cfg.batch, cfg.lr) == (128, (2, 2, 2), 4, (16,), 9, 0.13, 512, 1e-3)
    ffhq = edm.make_config("ffhq64")
    assert (ffhq.img_resolution, ffhq.channel_mult, ffhq.dropout, ffhq.lr, ffhq.batch) == (64, (1, 2, 2, 2), 0.05,
                                                                                          2e-4, 256)
    assert 2 * ffhq.num_steps - 1 == 79 and 2 * cfg.num_steps - 1 == 35
    assert edm.make_config("small", channel_mult="1,2,2", kimg="3").channel_mult == (1, 2, 2)
    with pytest.raises(ValueError, match="no_such_field"):
        edm.make_config("small", no_such_field=1)
    with pytest.raises(ValueError, match="nope"):
        edm.make_config("nope")
    assert set(edm.OFFICIAL_URLS) == {"cifar10", "ffhq64"}
    assert all(u.startswith("https://") and u.endswith("-uncond-vp.pkl") for u in edm.OFFICIAL_URLS.values())


def digits_like(n=64, seed=0):
    """Smooth random 8x8 blobs in [-1, 1]: a tiny data set with structure to learn."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    c = torch.rand(n, 2, 1, 1, generator=g) * 4 + 2
    return torch.exp(-((xx - c[:, :1]) ** 2 + (yy - c[:, 1:]) ** 2) / 4) * 2 - 1  # (n, 1, 8, 8)


def fixed_loss(model, data, repeats=8):
    """EDM loss of the raw network on data with a fixed draw of sigma and noise (eval mode)."""
    rng = torch.get_rng_state()
    torch.manual_seed(123)
    model.net.eval()
    with torch.no_grad():
        value = sum(edm.edm_loss(model.net, data, model.cfg).mean().item() for _ in range(repeats)) / repeats
    torch.set_rng_state(rng)
    return value


def test_small_training_lowers_the_loss():
    torch.manual_seed(0)
    model, data = small_model(lr_rampup_kimg=0.32), digits_like()
    before = fixed_loss(model, data)
    for _ in range(60):
        loss = model.train_step(data[torch.randint(0, len(data), (32,))])
    assert math.isfinite(loss) and model.step == 60 and model.nimg == 60 * 32
    assert fixed_loss(model, data) < 0.5 * before


def test_bf16_autocast_on_cpu_stays_within_one_percent():
    torch.manual_seed(0)
    fp32, bf16 = small_model(amp="fp32"), small_model(amp="bf16")
    perturb(fp32.net)
    bf16.net.load_state_dict(fp32.net.state_dict())
    assert not fp32.net.use_bf16 and bf16.net.use_bf16
    data = digits_like(32)
    a, b = fixed_loss(fp32, data), fixed_loss(bf16, data)
    assert a != b  # autocast was active
    assert abs(b - a) < 0.01 * a
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert bf16.net(x, 1.0).dtype == torch.float32  # preconditioning stays float32


def test_generate_depends_only_on_each_seed():
    torch.manual_seed(0)
    model = small_model(num_steps=4, S_churn=10.0)
    perturb(model.ema)
    many = model.generate(torch.tensor([3, 11, 5]))
    assert model.nfe == 7 and many.dtype == torch.float32 and many.shape == (3, 1, 8, 8)
    assert many.min() >= -1 and many.max() <= 1
    torch.manual_seed(99)  # the global RNG plays no part
    one = model.generate(torch.tensor([11]))
    # alone or in a batch: equal up to float rounding (other batch sizes take other CPU kernels)
    torch.testing.assert_close(one[0], many[1], rtol=0, atol=1e-4)
    assert (many[0] - many[1]).abs().max() > 1e-2
    model.cfg.sample_ema = False  # raw weights are unperturbed: different images
    assert (model.generate(torch.tensor([11]))[0] - one[0]).abs().max() > 1e-3
    model.cfg.sample_ema, model.cfg.sampler = True, "dpm2m"  # the other sampler: N calls, other images
    other = model.generate(torch.tensor([3, 11, 5]))
    assert model.nfe == 4 and (other - many).abs().max() > 1e-3
    torch.testing.assert_close(model.generate(torch.tensor([11]))[0], other[1], rtol=0, atol=1e-4)


def test_state_dict_round_trip_continues_training_identically():
    torch.manual_seed(0)
    data = digits_like(32)
    a = small_model(lr_rampup_kimg=0.32)
    for _ in range(3):
        a.train_step(data)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = small_model(lr_rampup_kimg=0.32)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert (b.step, b.nimg) == (3, 96) and b.lr() == a.lr() == pytest.approx(a.cfg.lr * 96 / 320)
    for part in ("net", "ema"):
        for k, v in getattr(a, part).state_dict().items():
            assert torch.equal(getattr(b, part).state_dict()[k], v)
    torch.manual_seed(5)
    la = a.train_step(data)
    torch.manual_seed(5)
    lb = b.train_step(data)
    assert torch.equal(la, lb)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)


def test_lr_ramp_and_ema_half_life():
    model = small_model(lr_rampup_kimg=0.128, ema_halflife_kimg=1.0, ema_rampup_ratio=0.0)
    assert model.lr() == 0.0  # the first step of a from-scratch run has lr 0, as in EDM
    model.nimg = 64
    assert model.lr() == pytest.approx(0.5 * model.cfg.lr)
    model.nimg = 10_000
    assert model.lr() == model.cfg.lr
    beta = model.ema_beta(32)
    assert beta == pytest.approx(0.5 ** (32 / 1000))
    model.cfg.ema_rampup_ratio = 0.05  # EDM's EMA ramp-up: half-life at most 5% of the images seen (500 here)
    assert model.ema_beta(32) == pytest.approx(0.5 ** (32 / 500))
    model.cfg.ema_rampup_ratio = 0.0
    perturb(model.ema, seed=3)
    old = [p.clone() for p in model.ema.parameters()]
    model.train_step(digits_like(32))
    for e0, e1, p in zip(old, model.ema.parameters(), model.net.parameters()):
        torch.testing.assert_close(e1, beta * e0 + (1 - beta) * p.detach(), rtol=0, atol=1e-6)


class _Denoiser(torch.nn.Module):
    """A denoiser that records the noise levels it is called with and returns a fixed guess."""

    def __init__(self, guess):
        super().__init__()
        self.guess, self.sigmas = guess, None

    def forward(self, x, sigma):
        self.sigmas = sigma.flatten()
        return self.guess


def test_losses_follow_their_formulas():
    torch.manual_seed(0)
    y, guess = torch.rand(4096, 1, 2, 2) * 2 - 1, torch.zeros(4096, 1, 2, 2)
    cfg = edm.make_config("paper")
    D = _Denoiser(guess)
    loss = edm.edm_loss(D, y, cfg)
    s = D.sigmas.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(loss, (s ** 2 + 0.25) / (0.5 * s) ** 2 * (guess - y) ** 2)
    assert abs(s.log().mean().item() + 1.2) < 0.06 and abs(s.log().std().item() - 1.2) < 0.06  # ln s ~ N(-1.2, 1.2^2)
    loss = edm.vp_loss(D, y, cfg)
    s = D.sigmas.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(loss, (guess - y) ** 2 / s ** 2)
    lo, hi = edm.vp_sigma(torch.tensor(1e-5)).item(), edm.vp_sigma(torch.tensor(1.0)).item()
    assert s.min() >= lo * 0.999 and s.max() <= hi * 1.001 and s.max() > 0.9 * hi  # t ~ U(epsilon_t, 1)


def test_vp_model_trains_and_samples():
    torch.manual_seed(0)
    model = small_model(precond="vp", num_steps=3)
    assert isinstance(model.net, edm.VPPrecond)
    assert all(math.isfinite(model.train_step(digits_like(32))) for _ in range(2))
    assert model.generate(torch.tensor([0, 1])).shape == (2, 1, 8, 8) and model.nfe == 5


def test_distributed_training_keeps_plain_state_dict_keys(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = small_model()
        assert isinstance(model._train_fwd, torch.nn.parallel.DistributedDataParallel)
        assert math.isfinite(model.train_step(digits_like(32)))
        assert model.nimg == 32 and all(k.startswith("model.") for k in model.state_dict()["net"])
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# The CUDA path, exercised on the CPU (../spec_cuda.md): speed profile, no host sync, fixed kernel count,
# per-image noise in blocks, Adam moments in their parameter's layout


CUDA_PROFILE = dict(amp="bf16", channels_last="true", fused_adam="true")


class Ops(TorchDispatchMode):
    """Records the aten operators that run, views excluded (they launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


HOST_SYNCS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.item")


def test_profile_fields_are_validated_and_resolved():
    """Catches: a profile field missing or unvalidated, "auto" not resolved against the device, NHWC weights
    missing on the network or its EMA, or fused Adam not honoured."""
    for field, bad in (("amp", "fp16"), ("channels_last", "yes"), ("fused_adam", "on")):
        with pytest.raises(ValueError, match=field):
            edm.make_config("small", **{field: bad})
    assert edm.make_config("small", channels_last=True, fused_adam=False).channels_last == "true"
    assert edm.make_config("small", channels_last="false", fused_adam=True).fused_adam == "true"
    assert small_model().profile == {"amp": "fp32", "channels_last": False, "fused_adam": False, "compile": False}
    fast = small_model(**CUDA_PROFILE)
    assert fast.profile == {"amp": "bf16", "channels_last": True, "fused_adam": True, "compile": False}
    assert fast.net.use_bf16 and fast.ema.use_bf16 and fast.opt.param_groups[0]["fused"] is True
    for p in [*fast.net.parameters(), *fast.ema.parameters()]:
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
    conv = fast.net.model.dec["8x8_block0"].conv0.weight  # (16, 32, 3, 3): NHWC differs from NCHW
    assert not conv.is_contiguous()
    x = digits_like(8)
    assert fast.net(x, torch.tensor(0.7)).shape == x.shape


@pytest.mark.parametrize("precond", ["edm", "vp"])
def test_every_parameter_gets_a_gradient_with_augment_inputs(precond, monkeypatch):
    """Catches the DDP failure at the paper preset (augment_dim 9): training passed no augment labels, so
    map_augment had no gradient and DistributedDataParallel stopped at the second step. Training now feeds zero
    labels, which leave the output exactly as it was."""
    torch.manual_seed(0)
    model, x = small_model(augment_dim=9, precond=precond), digits_like(8)
    perturb(model.net)
    sigma = torch.linspace(0.1, 5.0, 8)  # one noise level per image, as in training
    with torch.no_grad():
        assert torch.equal(model.net(x, sigma), model.net(x, sigma, torch.zeros(8, 9)))
    missing, update = [], model._update

    def inspect(batch):  # the gradients as Adam is about to use them
        missing.extend(n for n, p in model.net.named_parameters() if p.requires_grad and p.grad is None)
        update(batch)

    monkeypatch.setattr(model, "_update", inspect)
    model.train_step(x)
    assert model.step == 1 and missing == []


def test_distributed_training_with_augment_inputs_takes_several_steps(tmp_path):
    """Catches the same defect through DistributedDataParallel itself (one gloo process suffices): "Expected to
    have finished reduction in the prior iteration" at the second step."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = small_model(augment_dim=9)
        losses = torch.stack([model.train_step(digits_like(8)) for _ in range(3)])
        assert model.step == 3 and bool(torch.isfinite(losses).all())
    finally:
        dist.destroy_process_group()


def test_train_step_returns_the_mean_loss_on_the_device_without_host_sync():
    """Catches a train_step that reads the loss on the host (float(), .item(), an all_reduce of it) or any
    other host sync, and a returned value other than this process's mean per-element loss."""
    torch.manual_seed(0)
    x = digits_like(8)
    model = small_model(augment_dim=9, grad_clip=1.0, **CUDA_PROFILE)
    with Ops() as ops:
        loss = model.train_step(x)
    assert [n for n in ops.names if n in HOST_SYNCS] == []
    assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.device == model.device
    assert not loss.requires_grad
    plain = small_model()
    torch.manual_seed(5)
    plain.net.train()
    with torch.no_grad():
        want = edm.edm_loss(plain.net, x, plain.cfg).mean()
    torch.manual_seed(5)
    torch.testing.assert_close(plain.train_step(x), want)


def test_update_runs_a_fixed_number_of_operators():
    """Catches per-tensor loops after backward (nan_to_num, clipping, Adam, EMA lerp, buffer copies): _update
    runs as many operators for a network with many more parameter tensors."""
    counts = []
    for blocks in (1, 2):
        model = small_model(num_blocks=blocks, augment_dim=9, grad_clip=1.0, **CUDA_PROFILE)
        model.train_step(digits_like(8))  # Adam allocates its state at the first step, one tensor at a time
        update, ops = model._update, Ops()

        def counted(batch):
            with ops:
                update(batch)

        model._update = counted
        model.train_step(digits_like(8))
        counts.append((len(list(model.net.parameters())), len(ops.names)))
    (n1, ops1), (n2, ops2) = counts
    assert n2 > n1 + 10 and ops1 == ops2 < 30, counts


@pytest.mark.parametrize("channels_last", ["false", "true"])
def test_update_cleans_nan_and_inf_gradients(channels_last):
    """Catches wrong values of EDM's gradient cleaning (nan -> 0, +inf -> 1e5, -inf -> -1e5) and, with NHWC
    gradients, cleaned values written back to the wrong elements."""
    model = small_model(channels_last=channels_last, fused_adam=channels_last)
    g = torch.Generator().manual_seed(0)
    for p in model.net.parameters():
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))  # in p's layout, as autograd makes it
    conv = model.net.model.dec["8x8_block0"].conv0.weight  # (16, 32, 3, 3)
    bias = model.net.model.dec["8x8_block0"].conv0.bias
    conv.grad[0, 1, 2, 0], conv.grad[3, 2, 1, 1], conv.grad[5, 0, 0, 2] = float("nan"), float("inf"), -float("inf")
    bias.grad[4], bias.grad[7] = -float("inf"), float("nan")
    want = {n: torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5) for n, p in model.net.named_parameters()}
    assert want["model.dec.8x8_block0.conv0.weight"][3, 2, 1, 1] == 1e5
    model._update(8)
    for n, p in model.net.named_parameters():
        assert torch.equal(p.grad, want[n]), n
        assert bool(torch.isfinite(p).all()), n


class _GaussianDenoiser:
    """The ideal denoiser of N(0, s^2) data, D(x; sigma) = x s^2 / (s^2 + sigma^2); records the noise levels."""

    def __init__(self, s=0.7):
        self.s, self.sigmas = s, []

    def __call__(self, x, sigma):
        self.sigmas.append(sigma)
        return x * self.s ** 2 / (self.s ** 2 + sigma ** 2)


def test_sampler_passes_noise_levels_as_device_tensors_without_host_copies():
    """Catches a noise level built from a Python number at every network call (torch.tensor(sigma, device=...):
    a host-to-device copy per evaluation on CUDA), also inside the preconditioner."""
    for sampler, calls in (("heun", 11), ("dpm2m", 6)):
        D = _GaussianDenoiser()
        edm.SAMPLERS[sampler](D, torch.randn(2, 1, 4, 4), edm.make_config("paper", num_steps=6))
        assert len(D.sigmas) == calls and all(s.dim() == 0 and s.dtype == torch.float64 for s in D.sigmas)
    net = edm.build_denoiser(edm.make_config("small", model_channels=16, num_blocks=1)).eval()
    with Ops() as ops, torch.no_grad():
        edm.heun_sampler(net, torch.randn(2, 1, 8, 8), edm.make_config("paper", num_steps=6, S_churn=5.0))
        edm.dpm2m_sampler(net, torch.randn(2, 1, 8, 8), edm.make_config("paper", num_steps=6, sampler="dpm2m"))
    assert "aten.lift_fresh" not in ops.names  # a tensor made from Python data
    assert [n for n in ops.names if n in HOST_SYNCS] == []


def test_churn_noise_comes_in_per_image_blocks(monkeypatch):
    """Catches churn noise drawn per image per step (one kernel each), noise of one image drawn from another's
    generator, and a misaligned block: against Algorithm 2 written out with each image's noise drawn as blocks
    of NOISE_BLOCK steps, and the same seed alone or in a batch of 3."""
    cfg = edm.make_config("paper", num_steps=edm.NOISE_BLOCK + 10, S_churn=40.0, S_min=0.05, S_max=50.0)
    latents = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    draws, randn = [], torch.randn

    def counting_randn(*args, **kwargs):
        draws.append(kwargs.get("generator"))
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", counting_randn)
    gens = [torch.Generator().manual_seed(s) for s in (3, 11, 5)]
    many, _ = edm.heun_sampler(_GaussianDenoiser(), latents, cfg, gens)
    monkeypatch.undo()
    assert len(draws) == 2 * 3 and all(d is not None for d in draws)  # 2 blocks x 3 images
    one, _ = edm.heun_sampler(_GaussianDenoiser(), latents[1:2], cfg, [torch.Generator().manual_seed(11)])
    assert torch.equal(one[0], many[1])
    # Algorithm 2 for image 1 with Python floats, its noise drawn as the blocks of 50 and 10 steps
    gen = torch.Generator().manual_seed(11)
    eps = torch.cat([torch.randn((k, 1, 4, 4), generator=gen, dtype=torch.float64) for k in (50, 10)])
    t = edm.time_steps(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).tolist()
    D, x = _GaussianDenoiser(), latents[1].double() * t[0]
    for i in range(cfg.num_steps):
        gamma = min(cfg.S_churn / cfg.num_steps, math.sqrt(2) - 1) if cfg.S_min <= t[i] <= cfg.S_max else 0.0
        t_hat = t[i] * (1 + gamma)
        x_hat = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * eps[i]
        d = (x_hat - D(x_hat, t_hat)) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if i < cfg.num_steps - 1:
            x = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * (x - D(x, t[i + 1])) / t[i + 1])
    torch.testing.assert_close(many[1], x, rtol=1e-10, atol=1e-10)
    cfg.S_churn = 0.0
    assert (edm.heun_sampler(_GaussianDenoiser(), latents, cfg)[0][1] - x).abs().max() > 1e-2  # the noise matters


def test_adam_moments_take_their_parameter_layout_on_load():
    """Catches Adam moments kept in the checkpoint's layout: a state saved by an NCHW run (e.g. on a CPU) and
    resumed with NHWC weights (CUDA's fused Adam refuses moments whose strides differ from the parameter's),
    and the checkpoint's fused=False replacing this Config's fused Adam."""
    torch.manual_seed(0)
    nchw = small_model(channels_last="false", fused_adam="false")
    nchw.train_step(digits_like(8))
    buf = io.BytesIO()
    torch.save(nchw.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    nhwc = small_model(**CUDA_PROFILE)
    nhwc.load_state_dict(state)
    assert nhwc.opt.param_groups[0]["fused"] is True
    params = list(nhwc.net.parameters())
    assert any(p.stride() != torch.empty(p.shape).stride() for p in params)  # some layouts do differ
    for p, p_saved in zip(params, nchw.net.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            m = nhwc.opt.state[p][key]
            assert m.stride() == p.stride(), key
            assert torch.equal(m, nchw.opt.state[p_saved][key])
    nhwc.train_step(digits_like(8))  # and a resumed step keeps them so
    assert all(nhwc.opt.state[p][k].stride() == p.stride() for p in params for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # autocast("cuda") turns itself off: nothing computed
def test_paper_model_builds_and_runs_on_fake_cuda_tensors():
    """Catches a CUDA query or a CPU tensor in the paper model's construction, loss or sampler (FakeTensors on
    device cuda: no GPU needed, nothing computed), and an EMA whose parameters live in another fake mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = edm.make_config("paper", **CUDA_PROFILE)
    with FakeTensorMode(), torch.device("cuda"):
        model = edm.Model(cfg, "cuda")
        assert all(p.device.type == "cuda" for p in [*model.net.parameters(), *model.ema.parameters()])
        loss = model.loss(torch.rand(2, 3, 32, 32) * 2 - 1)
        assert loss.device.type == "cuda" and loss.dim() == 0
        x, nfe = edm.heun_sampler(model.ema, torch.randn(2, 3, 32, 32), edm.make_config("paper", num_steps=2,
                                                                                        S_churn=10.0))
        assert x.shape == (2, 3, 32, 32) and x.device.type == "cuda" and nfe == 3
