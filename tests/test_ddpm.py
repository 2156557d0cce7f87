"""Tests of ddpm.py: the U-Net against tqch/ddpm-torch fixtures, the diffusion formulas, the samplers,
training, mixed precision, and the Model interface.  Run: python -m pytest tests/test_ddpm.py"""

import dataclasses
import json
import math

import pytest
import torch

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


# ----------------------------------------------------------------------------------------------------
# Samplers with exact denoisers


@pytest.mark.parametrize("sampler,schedule,steps", [("ddim", "quadratic", 100), ("ddim", "uniform", 10),
                                                    ("ddpm", "uniform", 50)])
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


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
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
