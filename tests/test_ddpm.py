"""Tests of ddpm.py: the U-Net against tqch/ddpm-torch fixtures, the diffusion formulas, the samplers,
training, mixed precision, the Model interface, and the CUDA profile (bf16, channels_last, fused Adam,
no host sync, per-image noise in blocks) run on the CPU.  Run: python -m pytest tests/test_ddpm.py"""

import dataclasses
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm
from shared_fixtures import fixture


@pytest.fixture(scope="module")
def small():
    """The ddpm_small.pt fixture (tqch UNet, small config) and a matching Config."""
    d = torch.load(fixture("ddpm_small.pt"), weights_only=True)
    kw = d["kwargs"]
    cfg = ddpm.make_config("paper", img_channels=kw["in_channels"], hid_channels=kw["hid_channels"],
                           ch_multipliers=kw["ch_multipliers"], num_res_blocks=kw["num_res_blocks"],
                           apply_attn=kw["apply_attn"], drop_rate=kw["drop_rate"])
    return d, cfg


def fixture_net(d, cfg):
    net = ddpm.build_net(cfg)
    net.load_state_dict(d["state_dict"], strict=True)
    return net.eval()


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# The network and schedules against tqch/ddpm-torch


def test_fixture_output(small):
    d, cfg = small
    net = fixture_net(d, cfg)
    with torch.no_grad():
        y = net(d["inputs"]["x"], d["inputs"]["t"])
    assert y.dtype == torch.float32
    assert max_diff(y, d["output"]) < 1e-5


def test_resampling_without_conv_averages_down_and_repeats_up():
    """resample_conv=False (Ho et al.'s resamp_with_conv off): the two resampling convs of a two-level network are
    gone (and only they), downsampling is the 2x2 mean, upsampling repeats each pixel; the net still maps
    (B, 1, 8, 8) to (B, 1, 8, 8)."""
    nets = {rc: ddpm.build_net(ddpm.make_config("small", resample_conv=rc)) for rc in (True, False)}
    keys = {rc: set(net.state_dict()) for rc, net in nets.items()}
    gone = keys[True] - keys[False]
    assert not keys[False] - keys[True]
    assert gone == {"downsamples.level_0.1.1.weight", "downsamples.level_0.1.1.bias",
                    "upsamples.level_1.2.1.weight", "upsamples.level_1.2.1.bias"}
    down, up = nets[False].downsamples["level_0"][-1], nets[False].upsamples["level_1"][-1]
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(down(x), x.reshape(2, 16, 4, 2, 4, 2).mean(dim=(3, 5)), rtol=0, atol=1e-6)  # float32 sums
    assert torch.equal(up(x)[..., ::2, 1::2], x) and torch.equal(up(x)[..., 1::2, ::2], x)
    assert nets[False](torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])).shape == (3, 1, 8, 8)


def test_fixture_betas_and_time_grids(small):
    d, cfg = small
    assert torch.equal(ddpm.linear_betas(cfg), d["betas"])
    assert torch.equal(ddpm.time_grid("quadratic", 10, 1000), d["ddim_timesteps"])
    assert torch.equal(ddpm.time_grid("quadratic", 100, 1000), d["ddim_timesteps_100"])
    assert torch.equal(ddpm.time_grid("uniform", 4, 1000), torch.tensor([0, 250, 500, 750]))
    assert torch.equal(ddpm.time_grid("uniform", 1000, 1000), torch.arange(1000))


def test_fixture_ddim_trace(small):
    d, cfg = small
    net = fixture_net(d, cfg)
    seen = []  # the sampler's state before each network call = the state after the previous step

    def eps_fn(x, t):
        seen.append(x[:2].clone())
        with torch.no_grad():
            return net(x, torch.full((x.shape[0],), int(t)))

    alphas_bar = torch.cumprod(1 - d["betas"], 0)
    out = ddpm.ddim_sampler(eps_fn, d["ddim_x_T"].clone(), alphas_bar, d["ddim_timesteps"], None)
    trace = torch.stack(seen[1:] + [out[:2]])  # (10, 2, 3, 32, 32)
    assert max_diff(trace, d["ddim_xs"]) < 1e-4
    assert max_diff(out, d["ddim_out"]) < 1e-4


def test_fused_attention_matches_explicit(small):
    q, k, v = torch.randn(3, 2, 32, 64, generator=torch.Generator().manual_seed(0)).unbind(0)
    a = ddpm.attention(q, k, v, fused=False)
    b = ddpm.attention(q, k, v, fused=True)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)
    assert max_diff(a, torch.einsum("bij,bcj->bci", w, v)) < 1e-5
    assert max_diff(a, b) < 1e-5


def test_paper_config_keys_and_param_count():
    ref = json.loads(fixture("ddpm_cifar10_keys.json").read_text())
    net = ddpm.build_net(ddpm.make_config("paper"))
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == ref["keys"]
    assert sum(p.numel() for p in net.parameters()) == ref["total_params"] == 35_746_307


def test_make_config():
    cfg = ddpm.make_config("small", batch=7)
    assert cfg.batch == 7 and cfg.img_resolution == 8 and cfg.sample_ema is True
    with pytest.raises(ValueError, match="nonsense"):
        ddpm.make_config("small", nonsense=1)
    with pytest.raises(ValueError, match="preset"):
        ddpm.make_config("huge")
    with pytest.raises(ValueError, match="multiples of norm_groups"):  # 24 channels in 32 groups
        ddpm.make_config("small", hid_channels=24, norm_groups=32)
    net = ddpm.build_net(ddpm.make_config("small", hid_channels=24, ch_multipliers=(1, 2), norm_groups=8))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    assert ddpm.Config().norm_groups == 32  # Ho et al.'s, which the paper preset's checkpoints need


# ----------------------------------------------------------------------------------------------------
# Diffusion formulas


def alphas_bar_paper():
    import numpy as np  # independent of ddpm.py: numpy's float64 cumulative product

    return torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))


def test_q_sample_closed_form():
    alphas_bar = alphas_bar_paper()
    assert max_diff(torch.cumprod(1 - ddpm.linear_betas(ddpm.make_config("paper")), 0), alphas_bar) < 1e-14
    x0 = torch.tensor([-0.8, 0.1, 0.9]).repeat(4, 1)[:, :, None, None]  # (4, 3, 1, 1)
    t = torch.tensor([0, 10, 500, 999])
    ab = alphas_bar[t].float()[:, None, None, None]
    # the mean: the draw with zero noise; the standard deviation: the slope in the noise
    assert max_diff(ddpm.q_sample(x0, t, torch.zeros_like(x0), alphas_bar), ab.sqrt() * x0) < 1e-6
    one = ddpm.q_sample(x0, t, torch.ones_like(x0), alphas_bar) - ddpm.q_sample(x0, t, torch.zeros_like(x0), alphas_bar)
    assert max_diff(one, (1 - ab).sqrt().expand_as(x0)) < 1e-6
    # Monte Carlo: 200,000 draws per (t, pixel)
    noise = torch.randn(4, 3, 1, 200_000, generator=torch.Generator().manual_seed(0))
    xt = ddpm.q_sample(x0.expand(4, 3, 1, 200_000), t, noise, alphas_bar)
    se = (1 - ab).sqrt() / math.sqrt(200_000)  # standard error of the mean
    assert ((xt.mean(-1, keepdim=True) - ab.sqrt() * x0).abs() < 5 * se).all()
    assert ((xt.var(-1, keepdim=True) / (1 - ab) - 1).abs() < 0.02).all()


def test_loss_of_exact_noise_is_zero():
    alphas_bar = alphas_bar_paper()
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    t = torch.tensor([0, 1, 100, 500, 998, 999])
    noise = torch.randn_like(x0)
    assert ddpm.ddpm_loss(lambda x, t: noise, x0, t, noise, alphas_bar).item() == 0.0

    def oracle(xt, t):  # the noise recovered from x_t and the known x_0
        ab = alphas_bar[t][:, None, None, None]
        return ((xt.double() - ab.sqrt() * x0.double()) / (1 - ab).sqrt()).float()

    assert ddpm.ddpm_loss(oracle, x0, t, noise, alphas_bar).item() < 1e-8
    loss0 = ddpm.ddpm_loss(lambda x, t: torch.zeros_like(x), x0, t, noise, alphas_bar).item()
    assert loss0 == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def test_min_snr_weights_each_image_by_its_clipped_snr():
    alphas_bar = alphas_bar_paper()
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    t = torch.tensor([0, 50, 150, 400, 999])  # SNR from ~1e4 down to ~4e-5
    noise = torch.randn_like(x0)
    zero = lambda x, t: torch.zeros_like(x)  # each image's error is then the mean of its noise squared
    per_image = noise.double().pow(2).mean(dim=(1, 2, 3))
    snr = (alphas_bar / (1 - alphas_bar))[t]
    assert snr[0] > 1000 and snr[-1] < 1e-3
    for gamma in (5.0, 1.0):
        weight = torch.where(snr > gamma, gamma / snr, torch.ones_like(snr))  # min(SNR, gamma) / SNR, written apart
        want = (weight * per_image).mean().item()
        assert ddpm.ddpm_loss(zero, x0, t, noise, alphas_bar, min_snr=gamma).item() == pytest.approx(want, rel=1e-5)
    # a gamma above every SNR weights nothing down: L_simple, and the default is L_simple itself
    simple = ddpm.ddpm_loss(zero, x0, t, noise, alphas_bar).item()
    assert ddpm.ddpm_loss(zero, x0, t, noise, alphas_bar, min_snr=1e9).item() == pytest.approx(simple, rel=1e-6)
    assert ddpm.make_config("paper").min_snr == 0
    with pytest.raises(ValueError, match="min_snr"):
        ddpm.make_config("small", min_snr=-1)
    # the Model trains on the weighted loss with its own draws of t and the noise
    model = ddpm.Model(ddpm.make_config("small", min_snr=5.0), torch.device("cpu"))
    torch.manual_seed(3)
    got = model.loss(x0).item()
    torch.manual_seed(3)
    t = torch.randint(0, model.cfg.timesteps, (5,))
    want = ddpm.ddpm_loss(model.net, x0, t, torch.randn_like(x0), model.alphas_bar, min_snr=5.0).item()
    assert got == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Samplers with exact denoisers


@pytest.mark.parametrize("sampler,schedule,steps", [("ddim", "quadratic", 100), ("ddim", "uniform", 10),
                                                    ("ddpm", "uniform", 50), ("dpm2m", "quadratic", 12),
                                                    ("dpm2m", "quadratic", 100)])
def test_perfect_denoiser_of_one_point_returns_it(sampler, schedule, steps):
    alphas_bar = alphas_bar_paper()
    point = torch.linspace(-0.9, 0.9, 64).reshape(1, 1, 8, 8)

    def eps_fn(x, t):  # the exact eps of a data set holding only `point`
        ab = alphas_bar[int(t)].item()
        return (x - math.sqrt(ab) * point) / math.sqrt(1 - ab)

    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    grid = ddpm.time_grid(schedule, steps, 1000)
    out = ddpm.SAMPLERS[sampler](eps_fn, x, alphas_bar, grid, gens)
    assert max_diff(out, point.expand(3, 1, 8, 8)) < 1e-5


def gaussian_eps(alphas_bar, s):
    """The exact eps of data N(0, s^2): sqrt(1 - abar) x_t / (abar s^2 + 1 - abar)."""
    def eps_fn(x, t):
        ab = alphas_bar[int(t)].item()
        return math.sqrt(1 - ab) * x / (ab * s * s + 1 - ab)
    return eps_fn


def test_ddpm_sampler_draws_a_gaussian_with_its_exact_denoiser():
    alphas_bar, s, n = alphas_bar_paper(), 0.3, 40
    gens = [torch.Generator().manual_seed(100 + i) for i in range(n)]
    x = torch.stack([torch.randn(1, 8, 8, generator=g) for g in gens])  # 2,560 values
    out = ddpm.ddpm_sampler(gaussian_eps(alphas_bar, s), x, alphas_bar, torch.arange(1000), gens)
    assert out.mean().abs().item() < 4 * s / math.sqrt(out.numel())
    assert out.std().item() == pytest.approx(s, rel=0.05)  # the estimate's own error is ~1.4%


def test_ddim_follows_the_probability_flow_of_a_gaussian():
    """With exact eps, DDIM is linear in x_T; its gain tends to the flow's s / std(x_T's true marginal)."""
    alphas_bar, s = alphas_bar_paper(), 0.3
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    gains = [ddpm.ddim_sampler(gaussian_eps(alphas_bar, s), x, alphas_bar, ddpm.time_grid("uniform", n, 1000),
                               None).item() for n in (10, 100, 1000)]
    ab_T = alphas_bar[999].item()  # the start of the 1000-step grid
    assert gains[0] < gains[1] < gains[2]
    assert gains[2] == pytest.approx(s / math.sqrt(ab_T * s * s + 1 - ab_T), rel=0.01)  # 0.5% here


def test_dpm2m_is_second_order_and_ddim_first_on_the_flow_of_a_gaussian():
    """With exact eps the error at the flow's end, against its closed form, falls ~4x per doubling of the
    quadratic grid for DPM-Solver++(2M) and ~2x for DDIM; both are linear in x_T, so x_T = 1 gives the gain."""
    alphas_bar, s = alphas_bar_paper(), 0.3
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)

    def errors(sampler):
        out = []
        for n in (25, 50, 100):
            grid = ddpm.time_grid("quadratic", n, 1000)
            a_T, a_0 = alphas_bar[grid[-1]].item(), alphas_bar[grid[0]].item()
            # x_t = x_T sqrt((a_t s^2 + 1 - a_t) / (a_T s^2 + 1 - a_T)) along the flow, then E[x_0 | x_t] at t = 0
            exact = math.sqrt(a_0) * s * s / math.sqrt(a_0 * s * s + 1 - a_0) / math.sqrt(a_T * s * s + 1 - a_T)
            out.append(abs(ddpm.SAMPLERS[sampler](gaussian_eps(alphas_bar, s), x, alphas_bar, grid, None).item()
                           - exact))
        return out

    ddim, dpm2m = errors("ddim"), errors("dpm2m")
    assert all(1.8 < e0 / e1 < 2.2 for e0, e1 in zip(ddim, ddim[1:]))  # measured 2.0, 2.0
    assert all(e0 / e1 > 3.5 for e0, e1 in zip(dpm2m, dpm2m[1:]))  # measured 4.6, 5.2
    assert dpm2m[0] < ddim[0] / 3


# ----------------------------------------------------------------------------------------------------
# The Model interface


def tiny_config(**kw):
    return ddpm.make_config("small", **{"hid_channels": 32, "ch_multipliers": (1, 1), "num_res_blocks": 1,
                                        "apply_attn": (False, False), **kw})


def test_training_lowers_loss_warmup_and_ema():
    cfg = tiny_config(warmup=10, batch=32)
    torch.manual_seed(0)
    model = ddpm.Model(cfg, "cpu")
    data = (torch.rand(8, 1, 8, 8) > 0.5).float() * 2 - 1  # 8 binary images
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (256,), generator=g)
    noise = torch.randn(256, 1, 8, 8, generator=g)
    x_eval = data.repeat(32, 1, 1, 1)

    def eval_loss():
        model.net.eval()
        with torch.no_grad():
            return ddpm.ddpm_loss(model.net, x_eval, t, noise, model.alphas_bar).item()

    before = eval_loss()
    w0 = [p.detach().clone() for p in model.net.parameters()]
    model.train_step(data.repeat(4, 1, 1, 1))
    assert model.opt.param_groups[0]["lr"] == pytest.approx(cfg.lr / 10)  # warm-up: lr (step + 1) / warmup
    for p0, p, pe in zip(w0, model.net.parameters(), model.ema.parameters()):  # EMA decay min(d, 1/10) at step 0
        assert torch.allclose(pe, 0.1 * p0 + 0.9 * p, atol=1e-7)
    for _ in range(39):
        model.train_step(data.repeat(4, 1, 1, 1))
    assert model.step == 40 and model.opt.param_groups[0]["lr"] == cfg.lr
    assert eval_loss() < 0.5 * before  # ~0.24 x here


def fixture_model(d, cfg, **kw):
    model = ddpm.Model(dataclasses.replace(cfg, **kw), "cpu")
    model.net.load_state_dict(d["state_dict"])
    model.ema.load_state_dict(d["state_dict"])
    return model


def test_bf16_autocast_loss_close_to_fp32(small):
    d, cfg = small
    x = d["inputs"]["x"].clamp(-1, 1)
    losses, dtypes = {}, {}
    for amp in ("fp32", "bf16"):
        model = fixture_model(d, cfg, amp=amp, drop_rate=0.0)
        seen = dtypes[amp] = []
        model.net.in_conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        model.net.out_conv[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        torch.manual_seed(3)
        losses[amp] = model.train_step(x)
    assert dtypes["fp32"] == [torch.float32, torch.float32]
    assert dtypes["bf16"] == [torch.bfloat16, torch.float32]  # convolutions in bf16, GroupNorm in float32
    assert losses["bf16"] != losses["fp32"]
    assert abs(losses["bf16"] - losses["fp32"]) < 0.01 * losses["fp32"]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm2m"])
def test_generate_depends_only_on_each_seed(small, sampler):
    d, cfg = small
    model = fixture_model(d, cfg, sampler=sampler, sample_steps=4, skip_schedule="uniform")
    a = model.generate(torch.tensor([11, 12, 13]))
    assert model.nfe == 4 and a.shape == (3, 3, 32, 32) and a.dtype == torch.float32
    assert a.abs().max() <= 1
    b = model.generate(torch.tensor([13, 11]))
    assert max_diff(a[2], b[0]) < 1e-4 and max_diff(a[0], b[1]) < 1e-4
    assert max_diff(a[0], a[1]) > 0.1


def test_sample_ema_setting(small):
    d, cfg = small
    seeds = torch.tensor([1, 2])
    model = fixture_model(d, cfg, sample_steps=2)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05)
    ema = model.generate(seeds)
    model.cfg.sample_ema = False
    raw = model.generate(seeds)
    ref = fixture_model(d, cfg, sample_steps=2).generate(seeds)
    assert max_diff(ema, ref) < 1e-6 and max_diff(raw, ref) > 1e-3


def test_state_dict_round_trip(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    a = ddpm.Model(cfg, "cpu")
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    for _ in range(2):
        a.train_step(x)
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b = ddpm.Model(cfg, "cpu")
    b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert b.step == 2
    torch.manual_seed(1)
    la = a.train_step(x)
    torch.manual_seed(1)
    lb = b.train_step(x)
    assert la == lb
    for key, sd in a.state_dict().items():
        if key in ("net", "ema"):
            other = b.state_dict()[key]
            assert all(torch.equal(v, other[k]) for k, v in sd.items())


# ----------------------------------------------------------------------------------------------------
# Official checkpoints (tqch/ddpm-torch format)


def tqch_checkpoint(cfg, model_sd, shadow, num_updates=1234):
    """A checkpoint dict laid out as tqch's Trainer.save_checkpoint writes it (trained with DDP)."""
    net = ddpm.build_net(cfg)
    net.load_state_dict(model_sd)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    net(torch.randn(1, cfg.img_channels, 16, 16), torch.tensor([3])).square().mean().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 5000, 1.0))
    ckpt = {"model": {"module." + k: v for k, v in model_sd.items()}, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "epoch": 3, "loss": 0.031}
    if shadow is not None:
        ckpt["ema"] = {"decay": 0.9999, "shadow": shadow, "num_updates": num_updates}
    return ckpt


def test_load_official(small, tmp_path):
    d, cfg = small
    sd = d["state_dict"]
    other = {k: v + 1.0 for k, v in sd.items()}
    x, t = d["inputs"]["x"], d["inputs"]["t"]
    cases = {"ema": tqch_checkpoint(cfg, other, sd), "model": tqch_checkpoint(cfg, sd, None), "bare": sd}
    for name, ckpt in cases.items():  # EMA weights preferred; "module." stripped; bare state dicts accepted
        torch.save(ckpt, tmp_path / f"{name}.pt")
        net = ddpm.load_official(str(tmp_path / f"{name}.pt"), cfg)
        assert not net.training
        with torch.no_grad():
            assert max_diff(net(x, t), d["output"]) < 1e-5, name
    with pytest.raises(ValueError, match=r"missing: downsamples\.level_0\.1\.norm1\.weight.*"
                                         r"unexpected: downsamples\.level_0\.1\.1\.weight.*"
                                         r"embed\.0\.weight \(128, 32\) vs \(512, 128\)"):
        ddpm.load_official(str(tmp_path / "ema.pt"))  # the paper architecture
    w86 = {"head.weight": torch.zeros(128, 3, 3, 3), "time_embedding.timembedding.0.weight": torch.zeros(1000, 128)}
    torch.save({"net_model": w86, "ema_model": w86}, tmp_path / "w86.pt")
    with pytest.raises(ValueError, match=r"neither .* its keys: net_model, ema_model"):
        ddpm.load_official(str(tmp_path / "w86.pt"), cfg)
    torch.save(w86, tmp_path / "w86_bare.pt")
    with pytest.raises(ValueError, match=r"unexpected: head\.weight"):
        ddpm.load_official(str(tmp_path / "w86_bare.pt"), cfg)


def test_load_pretrained(small, tmp_path):
    d, cfg = small
    sd = d["state_dict"]
    ckpt = tqch_checkpoint(cfg, {k: v + 1.0 for k, v in sd.items()}, sd, num_updates=795_600)
    torch.save(ckpt, tmp_path / "c.pt")
    model = ddpm.Model(cfg, "cpu")
    model.load_pretrained(str(tmp_path / "c.pt"))
    assert all(torch.equal(v, sd[k]) for k, v in model.ema.state_dict().items())
    assert all(torch.equal(v, sd[k] + 1.0) for k, v in model.net.state_dict().items())
    assert model.step == 795_600
    for i, p in enumerate(model.net.parameters()):  # Adam's moments carried over, as tqch's --resume does
        assert torch.equal(model.opt.state[p]["exp_avg_sq"], ckpt["optimizer"]["state"][i]["exp_avg_sq"])
    assert model.opt.param_groups[0]["lr"] == cfg.lr
    torch.save(sd, tmp_path / "bare.pt")
    model = ddpm.Model(cfg, "cpu")
    model.load_pretrained(str(tmp_path / "bare.pt"))
    assert model.step == cfg.warmup  # no warm-up again
    assert all(torch.equal(v, sd[k]) for k, v in model.net.state_dict().items())
    model.train_step(d["inputs"]["x"])
    assert model.opt.param_groups[0]["lr"] == cfg.lr
    ckpt["optimizer"] = torch.optim.Adam(torch.nn.Linear(2, 2).parameters()).state_dict()  # another network's
    torch.save(ckpt, tmp_path / "other_opt.pt")
    with pytest.warns(UserWarning, match="optimizer state does not fit"):
        ddpm.Model(cfg, "cpu").load_pretrained(str(tmp_path / "other_opt.pt"))


# ----------------------------------------------------------------------------------------------------
# The CUDA path, run on the CPU: every device-dependent choice is a Config field


CUDA_PROFILE = dict(amp="bf16", channels_last="true", fused_adam="true")


class OpCounter(TorchDispatchMode):
    """Counts the aten operators that run, by name (views excluded: they launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            name = str(func.overloadpacket)
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_engineering_fields_validate_and_resolve():
    """The "auto" settings resolve against the device, "true" / "false" (or Python bools) force the choice on any
    device, and anything else is refused by name. Catches choices keyed on the device type instead of the Config."""
    assert ddpm.Model(tiny_config(), "cpu").profile == {"amp": "fp32", "channels_last": False, "fused_adam": False,
                                                         "compile": False}
    model = ddpm.Model(tiny_config(**CUDA_PROFILE), "cpu")
    assert model.profile == {"amp": "bf16", "channels_last": True, "fused_adam": True, "compile": False}
    assert model.opt.param_groups[0]["fused"] is True
    assert ddpm.make_config("small", channels_last=True, fused_adam=False).channels_last == "true"
    assert ddpm.make_config("small", fused_adam=False).fused_adam == "false"
    for field in ("channels_last", "fused_adam"):
        with pytest.raises(ValueError, match=f"{field} 'yes': choose auto, true or false"):
            ddpm.make_config("small", **{field: "yes"})
    with pytest.raises(ValueError, match="amp 'fp16'"):
        ddpm.make_config("small", amp="fp16")


def test_channels_last_profile_runs_nhwc_and_fused_attention_follows_amp():
    """channels_last="true" on the CPU: net and EMA weights NHWC, and the network's inputs NHWC in training and
    sampling; the fused attention kernel is on in bf16 and off in fp32, whatever the device. Catches the
    layout and the attention kernel keyed on the device type (they were: `device.type == "cuda"`, `x.is_cuda`)."""
    cfg = tiny_config(**CUDA_PROFILE, apply_attn=(False, True), sample_steps=2)
    model = ddpm.Model(cfg, "cpu")
    for net in (model.net, model.ema):
        convs = [p for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]  # 3x3, C > 1
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                             for p in convs)
    inputs = []
    for net in (model.net, model.ema):
        net.in_conv.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model.train_step(x)
    model.generate(torch.tensor([1, 2]))
    assert len(inputs) == 3 and all(i.is_contiguous(memory_format=torch.channels_last) for i in inputs)
    for amp, fused in (("bf16", 4), ("fp32", 0)):  # 4 attention blocks: 3 at 4x4 (1 down, 2 up), 1 in the middle
        with OpCounter() as counter:
            ddpm.Model(dataclasses.replace(cfg, amp=amp), "cpu").generate(torch.tensor([1]))
        assert sum(k for name, k in counter.ops.items() if "scaled_dot_product" in name) == 2 * fused, amp


def test_train_step_returns_the_loss_on_the_device_without_host_sync():
    """train_step returns the detached 0-dim float32 loss tensor and reads nothing back to the host in the way
    (no .item(), bool(t), ...). Catches `return loss.item()`: one host sync per step on a GPU."""
    model = ddpm.Model(tiny_config(**CUDA_PROFILE), "cpu")
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    with OpCounter() as counter:
        losses = [model.train_step(x) for _ in range(3)]
    syncs = {k: n for k, n in counter.ops.items() if k in ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal")}
    assert syncs == {}
    assert all(torch.is_tensor(l) and l.dim() == 0 and l.dtype == torch.float32 and not l.requires_grad
               for l in losses)
    assert model.step == 3


def test_update_runs_a_fixed_number_of_operators():
    """_update (clipping, lr, Adam, EMA) runs as many operators for a network with twice the parameter tensors.
    Catches per-tensor loops: clip_grad_norm_(foreach=False), an unfused Adam, a per-parameter EMA. Counted at
    the second step: Adam creates its moments lazily, one tensor each, at the first."""
    counts = []
    for blocks in (1, 2):
        model = ddpm.Model(tiny_config(**CUDA_PROFILE, num_res_blocks=blocks), "cpu")
        x = torch.rand(4, 1, 8, 8) * 2 - 1
        model.train_step(x)
        update, counter = model._update, OpCounter()

        def counted(batch):
            with counter:
                return update(batch)

        model._update = counted
        model.train_step(x)
        counts.append((len(list(model.net.parameters())), sum(counter.ops.values())))
    (n1, ops1), (n2, ops2) = counts
    assert n2 > n1 + 10 and ops1 == ops2 < 30, counts


def assert_moments_like_params(model):
    """Every Adam moment has exactly its parameter's strides (CUDA's fused Adam refuses any other layout)."""
    params = list(model.net.parameters())
    assert len(model.opt.state) == len(params)
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert model.opt.state[p][key].stride() == p.stride(), (key, tuple(p.shape))


def nchw_moments_differ(model):
    """The test's premise: channels_last weights, whose NCHW moments would have other strides."""
    return any(p.stride() != p.contiguous().stride() for p in model.net.parameters())


def test_load_pretrained_gives_adam_moments_the_channels_last_layout(tmp_path):
    """A tqch file's optimizer (saved from an NCHW model) loaded into the channels_last + fused Adam profile: the
    moments take the parameters' NHWC layout and keep their values, and training goes on. Catches the moments
    loaded in the file's NCHW layout: CUDA's fused Adam stops at the first step from the released checkpoint."""
    cfg = tiny_config(**CUDA_PROFILE)
    torch.manual_seed(0)
    sd = ddpm.build_net(cfg).state_dict()
    ckpt = tqch_checkpoint(cfg, sd, sd)
    torch.save(ckpt, tmp_path / "c.pt")
    model = ddpm.Model(cfg, "cpu")
    model.load_pretrained(str(tmp_path / "c.pt"))
    assert nchw_moments_differ(model)
    assert_moments_like_params(model)
    for i, p in enumerate(model.net.parameters()):
        assert torch.equal(model.opt.state[p]["exp_avg"], ckpt["optimizer"]["state"][i]["exp_avg"])
    assert torch.isfinite(model.train_step(torch.rand(4, 1, 8, 8) * 2 - 1))
    assert_moments_like_params(model)


def test_load_state_dict_gives_adam_moments_the_model_layout():
    """A state saved by an NCHW model (a run begun on the CPU) loaded into the channels_last profile, and back:
    the moments take each model's own layout. Catches the moments keeping the saved layout on load."""
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    nchw = ddpm.Model(tiny_config(channels_last="false"), "cpu")
    nchw.train_step(x)
    nhwc = ddpm.Model(tiny_config(**CUDA_PROFILE), "cpu")
    nhwc.load_state_dict(nchw.state_dict())
    assert nchw_moments_differ(nhwc)
    assert_moments_like_params(nhwc)
    nhwc.train_step(x)
    back = ddpm.Model(tiny_config(channels_last="false"), "cpu")
    back.load_state_dict(nhwc.state_dict())  # a GPU run resumed on the CPU
    assert_moments_like_params(back)


def test_resume_from_a_cpu_run_in_the_cuda_profile(tmp_path):
    """A run begun in the CPU profile, saved to a file, resumed in the CUDA profile, saved, resumed again: every
    load gives moments their parameter's layout and keeps this profile's fused Adam, and the resumed model steps
    exactly as the one that saved it. Catches the moments keeping the file's layout across a resume, and the
    saved run's Adam options (fused=False from the CPU) replacing this profile's."""
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    cpu_run = ddpm.Model(tiny_config(), "cpu")
    cpu_run.train_step(x)
    torch.save(cpu_run.state_dict(), tmp_path / "a.pt")
    gpu_run = ddpm.Model(tiny_config(**CUDA_PROFILE), "cpu")
    gpu_run.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True))
    assert gpu_run.opt.param_groups[0]["fused"] is True  # this profile's Adam, not the saved run's
    assert nchw_moments_differ(gpu_run)
    assert_moments_like_params(gpu_run)
    gpu_run.train_step(x)
    torch.save(gpu_run.state_dict(), tmp_path / "b.pt")
    resumed = ddpm.Model(tiny_config(**CUDA_PROFILE), "cpu")
    resumed.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    assert_moments_like_params(resumed)
    torch.manual_seed(1)
    la = gpu_run.train_step(x)
    torch.manual_seed(1)
    lb = resumed.train_step(x)
    assert torch.equal(la, lb)
    assert all(torch.equal(p, q) for p, q in zip(gpu_run.net.parameters(), resumed.net.parameters()))


def test_ancestral_sampler_gives_a_seed_the_same_image_alone_and_in_a_batch():
    """DDPM ancestral sampling over 3 noise blocks (120 steps): seed 7 alone and among other seeds gives the same
    image, and other seeds other images. Catches noise drawn for the whole batch at once (image i would then
    depend on its position and on the other seeds)."""
    torch.manual_seed(0)
    model = ddpm.Model(tiny_config(sampler="ddpm", sample_steps=120, skip_schedule="uniform"), "cpu")
    with torch.no_grad():  # a network whose output is not ~0 (the initial output layer has gain 1e-5)
        model.ema.out_conv[2].weight.normal_(0, 0.05)
    alone = model.generate(torch.tensor([7]))
    batch = model.generate(torch.tensor([3, 7, 9, 4]))
    assert model.nfe == 120
    assert max_diff(alone[0], batch[1]) < 1e-5
    assert min(max_diff(batch[1], batch[i]) for i in (0, 2, 3)) > 0.1


def test_ancestral_noise_is_drawn_in_blocks_per_image():
    """N images over S steps draw their noise with N randn calls per block of NOISE_BLOCK steps, each from the
    image's own generator, in order. Catches one randn kernel per image per step (1000 x N at Ho's 1000 steps)."""
    alphas_bar, n, steps = alphas_bar_paper(), 3, 120
    x = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    noises = []

    def eps_fn(x, t):  # zero eps: the noise added at each step can be read back from the state
        return torch.zeros_like(x)

    with OpCounter() as counter:
        ddpm.ddpm_sampler(eps_fn, x, alphas_bar, torch.arange(steps), gens)
    randn = sum(k for name, k in counter.ops.items() if name.startswith("aten.randn"))
    assert randn == n * math.ceil((steps - 1) / ddpm.NOISE_BLOCK) == 9
    for s in range(n):  # the draws image s gets: its generator's first (50, ...), then (50, ...), then (19, ...)
        g = torch.Generator().manual_seed(s)
        noises.append(torch.cat([torch.randn(k, 1, 4, 4, generator=g) for k in (50, 50, 19)]))
    got = list(ddpm.noise_blocks([torch.Generator().manual_seed(s) for s in range(n)], (1, 4, 4), steps - 1, "cpu"))
    assert len(got) == steps - 1
    assert torch.equal(torch.stack(got, 1), torch.stack(noises))  # (N, S - 1, 1, 4, 4)


@pytest.mark.filterwarnings("ignore:CUDA is not available", "ignore:Accessing the data pointer of FakeTensor")
def test_paper_model_builds_and_steps_on_fake_cuda_tensors():
    """The paper preset in the CUDA profile on FakeTensor CUDA tensors (no GPU, nothing computed): the model
    builds, the loss and a step of each sampler run on cuda, without mixing devices. Catches Module.to on fake
    parameters (it cannot swap them) and per-step tensor reads in the samplers; the grid and abar are real
    tensors read once on the host (inside the mode every new tensor is fake and has no values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = ddpm.make_config("paper", **CUDA_PROFILE)
    grid = ddpm.time_grid(cfg.skip_schedule, 2, cfg.timesteps)
    alphas_bar = torch.cumprod(1 - ddpm.linear_betas(cfg), 0)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        model = ddpm.Model(cfg, "cuda")
        assert all(p.device.type == "cuda" for p in model.net.parameters())
        loss = model.loss(torch.rand(2, 3, 32, 32) * 2 - 1)
        assert loss.device.type == "cuda" and loss.dim() == 0 and loss.dtype == torch.float32

        def eps_fn(x, t):
            with model._autocast():
                return model.ema(model._input(x), torch.full((x.shape[0],), t, dtype=torch.long)).float()

        x_T = torch.randn(2, 3, 32, 32)
        for sampler in ("ddim", "ddpm", "dpm2m"):
            gens = [torch.Generator().manual_seed(s) for s in range(2)]
            out = ddpm.SAMPLERS[sampler](eps_fn, x_T, alphas_bar, grid, gens)
            assert out.shape == x_T.shape and out.device.type == "cuda"
