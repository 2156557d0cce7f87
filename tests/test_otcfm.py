"""Tests of otcfm.py: torchcfm fixtures (forward, Euler and dopri5 traces, state-dict keys), minibatch OT
against brute force, the straight path, the samplers on an exact velocity field, training, mixed precision,
per-seed sampling, checkpoints (own and torchcfm's), the OT plan over the global batch under torchrun, the
CUDA profile (bf16, channels_last, fused Adam) run on the CPU.

    python -m pytest tests/test_otcfm.py
"""

import io
import itertools
import json

import numpy as np
import pytest
import torch

import otcfm
from shared_fixtures import fixture




@pytest.fixture(scope="module")
def small_fx():
    return torch.load(fixture("torchcfm_small.pt"), weights_only=True)


def fixture_config(fx, **overrides) -> otcfm.Config:
    """Our Config for the fixture's UNetModelWrapper kwargs."""
    k = fx["kwargs"]
    return otcfm.make_config(
        "paper", img_channels=k["dim"][0], img_resolution=k["dim"][1], channels=k["num_channels"],
        num_res_blocks=k["num_res_blocks"], channel_mult=k["channel_mult"], num_heads=k["num_heads"],
        head_channels=k["num_head_channels"], dropout=k["dropout"],
        attn_resolutions=[int(r) for r in k["attention_resolutions"].split(",")], **overrides)


@pytest.fixture(scope="module")
def small_net(small_fx):
    net = otcfm.UNet(fixture_config(small_fx))
    net.load_state_dict(small_fx["state_dict"])  # strict; float16-stored values cast exactly to float32
    return net.eval()


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# The network against torchcfm


def test_resampling_without_conv_averages_down_and_repeats_up():
    """conv_resample=False (torchcfm's conv_resample off): the two resampling convs of a two-level network are gone
    (and only they), downsampling is the 2x2 mean, upsampling repeats each pixel; the net still maps
    (B, 1, 8, 8) to (B, 1, 8, 8)."""
    nets = {rc: otcfm.UNet(otcfm.make_config("small", conv_resample=rc)) for rc in (True, False)}
    keys = {rc: set(net.state_dict()) for rc, net in nets.items()}
    assert not keys[False] - keys[True]
    assert keys[True] - keys[False] == {"input_blocks.2.0.op.weight", "input_blocks.2.0.op.bias",
                                        "output_blocks.1.2.conv.weight", "output_blocks.1.2.conv.bias"}
    down, up = nets[False].input_blocks[2][0], nets[False].output_blocks[1][2]
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(down(x), x.reshape(2, 16, 4, 2, 4, 2).mean(dim=(3, 5)), rtol=0, atol=1e-6)  # float32 sums
    assert torch.equal(up(x)[..., ::2, 1::2], x) and torch.equal(up(x)[..., 1::2, ::2], x)
    assert nets[False](torch.tensor([0.0, 0.5, 1.0]), torch.randn(3, 1, 8, 8)).shape == (3, 1, 8, 8)


def test_forward_matches_torchcfm(small_fx, small_net):
    inp = small_fx["inputs"]
    with torch.no_grad():
        y = small_net(inp["t"], inp["x"])  # (4, 3, 16, 16), one t per image
        y_scalar = small_net(inp["t_scalar"], inp["x"])  # 0-dim t repeated over the batch
        y_t0 = small_net(torch.zeros(4), inp["x"])
    assert max_diff(y, small_fx["output"]) < 1e-5
    assert max_diff(y_scalar, small_fx["output_scalar_t"]) < 1e-5
    assert max_diff(y_t0, y) > 1e-3  # the output depends on t


def test_euler_trace_matches_torchdiffeq(small_fx, small_net):
    s = small_fx["sampler"]
    cfg = otcfm.make_config("paper", sampler="euler", steps=len(s["euler_t"]) - 1)
    with torch.no_grad():
        x, nfe = otcfm.euler(small_net, small_fx["inputs"]["x0"], cfg)
    assert nfe == s["euler_nfe"] == 4
    assert max_diff(x, s["euler_final"]) < 1e-5


def test_dopri5_trace_matches_torchdiffeq(small_fx, small_net):
    s = small_fx["sampler"]
    cfg = otcfm.make_config("paper", rtol=s["dopri5_rtol"], atol=s["dopri5_atol"])
    with torch.no_grad():
        x, nfe = otcfm.dopri5(small_net, small_fx["inputs"]["x0"], cfg)
    assert nfe == s["dopri5_nfe"] == 20
    assert max_diff(x, s["dopri5_final"]) < 1e-3


def test_construction_order_gives_torchcfm_init(small_fx):
    """Same seed, same module order -> the fixture's weights (torchcfm init + its recorded perturbation)."""
    torch.manual_seed(0)
    net = otcfm.UNet(fixture_config(small_fx))
    g = torch.Generator().manual_seed(1)
    for name, p in net.named_parameters():
        expected = (p.detach() + 0.02 * torch.randn(p.shape, generator=g)).half()
        assert torch.equal(expected, small_fx["state_dict"][name]), name


def test_paper_config_has_torchcfm_keys():
    ref = json.loads(fixture("torchcfm_cifar10_keys.json").read_text())
    net = otcfm.UNet(otcfm.make_config("paper"))
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == ref["keys"]
    assert sum(p.numel() for p in net.parameters()) == ref["num_parameters"] == 35_746_307
    assert not list(net.buffers())


# ----------------------------------------------------------------------------------------------------
# Minibatch OT, the path, the samplers


def pairing_cost(x0, x1, perm) -> float:
    return (x0.double() - x1.double()[perm]).square().sum().item()


@pytest.mark.parametrize("n", range(1, 8))
def test_ot_pairing_is_the_brute_force_optimum(n):
    g = torch.Generator().manual_seed(n)
    x0, x1 = torch.randn(n, 2, 3, 3, generator=g), torch.randn(n, 2, 3, 3, generator=g) + 0.5
    perm = otcfm.ot_pairing(x0, x1)
    assert sorted(perm.tolist()) == list(range(n))  # a permutation
    cost = torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()).square().numpy()  # (n, n)
    perms = np.array(list(itertools.permutations(range(n))))  # (n!, n)
    best = cost[np.arange(n), perms].sum(axis=1).min()
    ours = pairing_cost(x0, x1, perm)
    assert ours == pytest.approx(best, rel=1e-12)
    assert ours <= pairing_cost(x0, x1, torch.arange(n)) * (1 + 1e-12)


def test_ot_pairing_recovers_a_permutation():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(32, 3, 4, 4, generator=g)
    p = torch.randperm(32, generator=g)
    perm = otcfm.ot_pairing(x0, x0[p])
    assert torch.equal(x0[p][perm], x0)
    assert torch.equal(p[perm], torch.arange(32))


def test_conditional_path_closed_form():
    g = torch.Generator().manual_seed(0)
    x0, x1, eps = (torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    xt, ut = otcfm.conditional_path(x0, x1, t)
    for i in range(5):
        assert torch.allclose(xt[i], t[i] * x1[i] + (1 - t[i]) * x0[i], rtol=0, atol=1e-15)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[-1], x1[-1])  # t = 0: noise, t = 1: data
    assert torch.equal(ut, x1 - x0)
    h = 1e-6  # u_t is the time derivative of x_t
    assert torch.allclose((otcfm.conditional_path(x0, x1, t + h)[0] - xt) / h, ut, atol=1e-8)
    xs, us = otcfm.conditional_path(x0, x1, t, sigma=0.1, eps=eps)
    assert torch.allclose(xs - xt, 0.1 * eps, atol=1e-15) and torch.equal(us, ut)


@pytest.mark.parametrize("name", sorted(otcfm.SAMPLERS))
def test_samplers_integrate_one_point_dataset(name):
    """The exact marginal velocity field of the one-point dataset {x*} is integrated to (nearly) x*.

    Field of the path x_t = t x* + (1 - (1 - s) t) x0 (s -> 0 is the path trained here; s > 0 keeps the field
    finite at t = 1): u(t, x) = x* - (1 - s)(x - t x*) / (1 - (1 - s) t). Each trajectory is a straight line
    ending at x* + s x0, which every Runge-Kutta method follows exactly, whatever its step count."""
    s = 1e-4
    g = torch.Generator().manual_seed(1)
    target = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)  # (1, C, H, W): the dataset
    x0 = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)

    def field(t, x):
        return target - (1 - s) * (x - t * target) / (1 - (1 - s) * t)

    cfg = otcfm.make_config("paper", sampler=name, steps=3)
    x1, nfe = otcfm.SAMPLERS[name](field, x0, cfg)
    assert max_diff(x1, target + s * x0) < 1e-10
    assert max_diff(x1, target.expand_as(x1)) <= s * x0.abs().max().item() + 1e-10
    assert nfe == {"euler": 3, "midpoint": 6, "heun": 6}.get(name, nfe) and nfe > 0


# ----------------------------------------------------------------------------------------------------
# The Model: loss, training, precision, sampling, checkpoints


def tiny_config(**overrides) -> otcfm.Config:
    return otcfm.make_config("small", img_channels=1, img_resolution=8, **overrides)


def tiny_data(n=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g).round() * 2 - 1  # (n, 1, 8, 8) binary images in {-1, 1}


@pytest.mark.parametrize("resample", [False, True])
def test_loss_is_the_ot_cfm_objective(resample):
    model = otcfm.Model(tiny_config(ot_resample=resample), "cpu")
    torch.nn.init.normal_(model.net.out[2].weight, std=0.1)  # a non-zero output layer
    x1 = tiny_data()
    torch.manual_seed(3)
    with torch.no_grad():
        loss = model.loss(x1).item()
    torch.manual_seed(3)  # the same draws, written out: noise, plan, (resampled pairs), t
    x0 = torch.randn_like(x1)
    x1p = x1[otcfm.ot_pairing(x0, x1)]
    if resample:
        idx = torch.randint(len(x0), (len(x0),))
        x0, x1p = x0[idx], x1p[idx]
    t = torch.rand(len(x0))
    xt = t[:, None, None, None] * x1p + (1 - t[:, None, None, None]) * x0
    with torch.no_grad():
        expected = ((model.net(t, xt) - (x1p - x0)) ** 2).mean().item()
    assert loss == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("resample", [False, True])
def test_two_ranks_pair_over_the_global_batch(resample, monkeypatch):
    """Two torchrun ranks simulated in one process (torch.distributed patched, every draw a function of the global
    image index) train on the same pairs as one process on the whole batch. Catches each rank solving the OT
    assignment over its own half only: the pairing (and training) then depends on the number of processes."""
    model = otcfm.Model(tiny_config(ot_resample=resample), "cpu")
    torch.nn.init.normal_(model.net.out[2].weight, std=0.1)  # a non-zero output layer
    B, g = 8, torch.Generator().manual_seed(5)  # B images per rank, 2B in the global batch
    x1 = tiny_data(2 * B)  # (2B, 1, 8, 8) the global data batch
    x0 = torch.randn(2 * B, 1, 8, 8, generator=g)  # the global draws: noise, resampled pairs, t
    idx, t = torch.randint(2 * B, (2 * B,), generator=g), torch.rand(2 * B, generator=g)
    pairs, real_path = [], otcfm.conditional_path
    monkeypatch.setattr(otcfm, "conditional_path", lambda a, b, *args: pairs.append((a, b)) or real_path(a, b, *args))

    def loss(rank, world):
        rows = slice(rank * B, (rank + 1) * B) if world == 2 else slice(None)  # a draw of n rows: rows of the global

        def randint(high, size, **kw):
            assert high == 2 * B and size == (len(x1[rows]),)  # uniform over the global batch's matched pairs
            return idx[rows]

        def all_gather(outs, x):  # rank order; the other rank holds the other rows of the same global batch
            src = x0 if torch.equal(x, x0[rows]) else x1
            for out, part in zip(outs, src.chunk(world)):
                out.copy_(part)

        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(torch, "randn_like", lambda x: x0[rows].clone())
            m.setattr(torch, "randint", randint)
            m.setattr(torch, "rand", lambda n, **kw: t[rows])
            if world == 2:
                m.setattr(torch.distributed, "is_initialized", lambda: True)
                m.setattr(torch.distributed, "get_rank", lambda: rank)
                m.setattr(torch.distributed, "get_world_size", lambda: 2)
                m.setattr(torch.distributed, "all_gather", all_gather)
            return model.loss(x1[rows]).item()

    single = loss(0, 1)
    ranks = [loss(0, 2), loss(1, 2)]
    (x0_one, x1_one), (x0_r0, x1_r0), (x0_r1, x1_r1) = pairs
    assert torch.equal(torch.cat([x0_r0, x0_r1]), x0_one) and torch.equal(torch.cat([x1_r0, x1_r1]), x1_one)
    assert sum(ranks) / 2 == pytest.approx(single, rel=1e-6)  # DDP averages the two ranks' means
    if not resample:
        assert torch.equal(x0_r0, x0[:B])  # each rank keeps its own noise rows, with the data they were matched to
    local = x1[:B][otcfm.ot_pairing(x0[:B], x1[:B])]  # what pairing rank 0's half alone would give
    assert not torch.equal(local, x1_one[:B])


def test_small_preset_training_lowers_the_loss():
    torch.manual_seed(0)
    model = otcfm.Model(tiny_config(batch=16, warmup_steps=5), "cpu")
    x = tiny_data(4).repeat(4, 1, 1, 1)  # (16, 1, 8, 8): a four-image dataset

    def held_out_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return np.mean([model.loss(x).item() for _ in range(4)])

    before = held_out_loss()
    for _ in range(60):
        model.train_step(x)
    after = held_out_loss()
    assert model.step == 60
    assert after < 0.6 * before, (before, after)


def test_warmup_from_scratch_only(small_fx):
    cfg = fixture_config(small_fx, warmup_steps=4, lr=1e-3)
    model = otcfm.Model(cfg, "cpu")
    x = torch.zeros(2, 3, 16, 16)
    lrs = []
    for _ in range(6):
        model.train_step(x)
        lrs.append(model.opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0, 0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_decay_from_step_0_or_ramped(warmup):
    """torchcfm's EMA uses ema_decay from the first step; ema_warmup ramps it as min(decay, (1 + k) / (10 + k)),
    so that the EMA of a short run from scratch forgets the random initial weights (0.1 of them after step 0)."""
    torch.manual_seed(0)
    model = otcfm.Model(tiny_config(batch=4, warmup_steps=0, ema_decay=0.999, ema_warmup=warmup), "cpu")
    x = tiny_data(4)
    for k in range(3):
        before, ema = [p.detach().clone() for p in model.net.parameters()], [p.clone() for p in model.ema.parameters()]
        model.train_step(x)
        decay = min(0.999, (1 + k) / (10 + k)) if warmup else 0.999
        for e0, p0, p, pe in zip(ema, before, model.net.parameters(), model.ema.parameters()):
            assert torch.allclose(pe, decay * e0 + (1 - decay) * p, atol=1e-7)
            if k == 0:
                assert torch.equal(e0, p0)  # the EMA starts as a copy of the network


def test_bf16_autocast_on_cpu_within_one_percent(small_fx):
    fp32 = otcfm.Model(fixture_config(small_fx, amp="fp32"), "cpu")
    bf16 = otcfm.Model(fixture_config(small_fx, amp="bf16"), "cpu")
    for m in (fp32, bf16):
        m.net.load_state_dict(small_fx["state_dict"])
        m.net.eval()
    x1 = small_fx["inputs"]["x"].clamp(-1, 1)
    losses = []
    for m in (fp32, bf16):
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(m.loss(x1).item())
    assert losses[1] == pytest.approx(losses[0], rel=0.01)
    assert losses[1] != losses[0]  # bf16 really ran
    t, x = small_fx["inputs"]["t"], small_fx["inputs"]["x"]
    with torch.no_grad(), bf16._autocast():
        y = bf16.net(t, x)
    assert y.dtype == torch.float32
    # bf16 rounds to 2^-9 ~ 0.2% per operation; through the network's ~25 layers that is ~1% (0.98% measured)
    assert ((y - small_fx["output"]).norm() / small_fx["output"].norm()).item() < 0.02


def test_generate_per_seed_and_clipped(small_fx):
    cfg = fixture_config(small_fx, sampler="euler", steps=3)
    model = otcfm.Model(cfg, "cpu")
    model.ema.load_state_dict(small_fx["state_dict"])  # EMA: the fixture weights; raw net: zero output layer
    torch.manual_seed(0)
    a = model.generate(torch.tensor([11, 22, 33]))
    torch.manual_seed(1)  # the global RNG plays no part
    b = model.generate(torch.tensor([22]))
    c = model.generate(torch.tensor([44, 22, 55, 66]))
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.float32 and model.nfe == 3
    assert max_diff(a[1], b[0]) < 1e-6 and max_diff(a[1], c[1]) < 1e-6
    assert max_diff(a[0], a[2]) > 0.5
    noise = torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (11, 22, 33)])
    with torch.no_grad():
        x, _ = otcfm.euler(model.ema, noise, cfg)
    assert max_diff(a, x.clamp(-1, 1)) < 1e-6
    assert a.min() == -1 and a.max() == 1 and x.abs().max() > 1.5  # clipping did happen
    model.cfg.sample_ema = False  # the raw net's output layer is zero: samples are the clipped noise
    assert torch.equal(model.generate(torch.tensor([11, 22, 33])), noise.clamp(-1, 1))


def test_generate_dopri5_reports_nfe_and_batch_dependence_is_at_tolerance_level(small_fx):
    model = otcfm.Model(fixture_config(small_fx), "cpu")
    model.ema.load_state_dict(small_fx["state_dict"])
    a = model.generate(torch.tensor([7, 8]))
    nfe = model.nfe
    b = model.generate(torch.tensor([8]))
    assert nfe >= 8 and nfe % 6 == 2  # two for the initial step size, six per dopri5 step
    assert max_diff(a[1], b[0]) < 1e-3  # one step-size sequence per call: differences at the rtol/atol level


def test_dopri5_runs_the_network_in_float32_whatever_amp(small_fx):
    """amp="bf16" changes nothing in dopri5 sampling (same samples, same NFE as float32) but still applies to the
    fixed-step samplers. Catches dopri5 under bf16 autocast: its rounding inflates the adaptive error estimate
    (more evaluations) and the samples are no longer the paper's float32 ones."""
    out = {}
    for amp in ("fp32", "bf16"):
        model = otcfm.Model(fixture_config(small_fx, amp=amp, rtol=1e-4, atol=1e-4), "cpu")
        model.ema.load_state_dict(small_fx["state_dict"])
        x = model.generate(torch.tensor([3, 4]))
        model.cfg.sampler, model.cfg.steps = "euler", 2
        out[amp] = x, model.nfe, model.generate(torch.tensor([3, 4]))
    assert torch.equal(out["bf16"][0], out["fp32"][0]) and out["bf16"][1] == out["fp32"][1]
    assert not torch.equal(out["bf16"][2], out["fp32"][2])  # Euler: the network ran in bf16


def test_state_dict_round_trip(small_fx):
    cfg = fixture_config(small_fx, warmup_steps=2)
    x = small_fx["inputs"]["x"].clamp(-1, 1)
    torch.manual_seed(0)
    a = otcfm.Model(cfg, "cpu")
    for _ in range(3):
        a.train_step(x)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    d = torch.load(buf, weights_only=True)
    torch.manual_seed(1)
    b = otcfm.Model(cfg, "cpu")
    b.load_state_dict(d)
    assert b.step == a.step == 3
    for key in ("net", "ema"):
        sa, sb = getattr(a, key).state_dict(), getattr(b, key).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    losses = []
    for m in (a, b):
        torch.manual_seed(9)
        losses.append(m.train_step(x))
    assert losses[0] == losses[1]
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.ema.parameters(), b.ema.parameters()))


def test_distributed_training_keeps_plain_state_dict_keys(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = otcfm.Model(tiny_config(batch=4), "cpu")
        assert isinstance(model._train_fwd, torch.nn.parallel.DistributedDataParallel)
        before = [p.clone() for p in model.net.parameters()]
        model.step = model.cfg.warmup_steps  # past the warm-up: the update moves the weights
        assert torch.isfinite(model.train_step(tiny_data(4)))
        assert any(not torch.equal(p, q) for p, q in zip(before, model.net.parameters()))
        sd = model.state_dict()
        assert not any(k.startswith("module.") for k in [*sd["net"], *sd["ema"]])
    finally:
        dist.destroy_process_group()


@pytest.fixture
def official_file(tmp_path, small_fx):
    """A file in torchcfm's checkpoint format (train_cifar10.py) holding the fixture weights as EMA."""
    cfg = fixture_config(small_fx)
    net = otcfm.UNet(cfg)
    net.load_state_dict(small_fx["state_dict"])
    raw = {k: v.float() + 0.01 for k, v in small_fx["state_dict"].items()}  # the raw (non-EMA) weights differ
    optim = torch.optim.Adam(net.parameters(), lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=lambda step: min(step, 5000) / 5000)
    net(torch.rand(2), torch.randn(2, 3, 16, 16)).square().mean().backward()
    optim.step()
    sched.step()
    path = tmp_path / "otcfm_weights_step_400000.pt"
    torch.save({"net_model": raw, "ema_model": {"module." + k: v for k, v in small_fx["state_dict"].items()},
                "sched": sched.state_dict(), "optim": optim.state_dict(), "step": 400000}, path)
    return path, raw, optim.state_dict()


def test_load_official(official_file, small_fx):
    path, raw, _ = official_file
    cfg = fixture_config(small_fx)
    inp = small_fx["inputs"]
    net = otcfm.load_official(path, cfg)  # EMA weights by default
    assert not net.training
    with torch.no_grad():
        assert max_diff(net(inp["t"], inp["x"]), small_fx["output"]) < 1e-5
        raw_net = otcfm.load_official(path, cfg, ema=False)
        assert all(torch.equal(raw_net.state_dict()[k], raw[k]) for k in raw)
    with pytest.raises(RuntimeError):  # strict loading: the paper network does not take these weights
        otcfm.load_official(path)


def test_load_pretrained_fine_tunes_without_warmup(official_file, small_fx):
    path, raw, optim_sd = official_file
    model = otcfm.Model(fixture_config(small_fx), "cpu")
    model.load_pretrained(path)
    assert all(torch.equal(model.net.state_dict()[k], raw[k]) for k in raw)
    assert all(torch.equal(model.ema.state_dict()[k], small_fx["state_dict"][k].float()) for k in raw)
    assert torch.equal(model.opt.state_dict()["state"][0]["exp_avg"], optim_sd["state"][0]["exp_avg"])
    assert model.step == 400001
    model.train_step(small_fx["inputs"]["x"].clamp(-1, 1))
    assert model.opt.param_groups[0]["lr"] == model.cfg.lr  # no warm-up when fine-tuning


def test_load_pretrained_keeps_this_configs_adam_options(official_file, small_fx):
    """The file's optimizer was a plain Adam (fused=False, lr 2e-4): only its moments and step are taken. Catches
    loading its whole state dict, param_groups included, which silently turned fused Adam off and took its lr."""
    path, _, optim_sd = official_file
    model = otcfm.Model(fixture_config(small_fx, fused_adam="true", lr=1e-3), "cpu")
    model.load_pretrained(path)
    group = model.opt.param_groups[0]
    assert group["fused"] is True and group["lr"] == 1e-3
    assert torch.equal(model.opt.state_dict()["state"][0]["exp_avg"], optim_sd["state"][0]["exp_avg"])
    model.train_step(small_fx["inputs"]["x"].clamp(-1, 1))
    assert model.opt.param_groups[0]["fused"] is True


def test_adam_moments_take_the_channels_last_layout_on_every_load(official_file, small_fx):
    """With channels_last, every Adam moment has its parameter's strides after load_pretrained, after
    load_state_dict of a state saved from an NCHW model, and after training on. Catches moments loaded in the
    file's NCHW layout, which CUDA's fused Adam refuses next to NHWC parameters."""
    path, _, _ = official_file
    x = small_fx["inputs"]["x"].clamp(-1, 1)

    def check(model):
        params = dict(enumerate(model.net.parameters()))
        assert any(not p.is_contiguous() for p in params.values())  # NHWC convolution weights
        for i, s in model.opt.state_dict()["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert s[key].stride() == params[i].stride(), (i, key)

    model = otcfm.Model(fixture_config(small_fx, channels_last="true"), "cpu")
    model.load_pretrained(path)
    check(model)
    nchw = otcfm.Model(fixture_config(small_fx, channels_last="false"), "cpu")
    nchw.train_step(x)
    model = otcfm.Model(fixture_config(small_fx, channels_last="true"), "cpu")
    model.load_state_dict(nchw.state_dict())
    check(model)
    assert torch.equal(model.opt.state_dict()["state"][0]["exp_avg"], nchw.opt.state_dict()["state"][0]["exp_avg"])
    model.train_step(x)
    check(model)


def test_make_config():
    cfg = otcfm.make_config("small", channel_mult=[1, 2])
    assert cfg.channel_mult == (1, 2) and cfg.img_channels == 1
    with pytest.raises(ValueError, match="no_such_field"):
        otcfm.make_config("small", no_such_field=1)
    with pytest.raises(ValueError, match="sampler"):
        otcfm.make_config("paper", sampler="rk45")
    assert otcfm.OFFICIAL_URLS["cifar10"].endswith("/1.0.4/otcfm_cifar10_weights_step_400000.pt")


# ----------------------------------------------------------------------------------------------------
# The CUDA profile (bf16, channels_last, fused Adam) on the CPU


def test_engineering_fields_and_profile():
    """channels_last / fused_adam take auto | true | false (or Python bools) and resolve into Model.profile; with
    them on, the net's and the EMA's convolution weights are NHWC and Adam is fused. Catches a missing or
    unvalidated field, or a profile that does not reach the network and the optimizer."""
    cfg = otcfm.make_config("small", channels_last=True, fused_adam=False)
    assert cfg.channels_last == "true" and cfg.fused_adam == "false"
    for key in ("channels_last", "fused_adam"):
        with pytest.raises(ValueError, match=key):
            otcfm.make_config("small", **{key: "yes"})
    assert otcfm.Model(tiny_config(), "cpu").profile == {
        "amp": "fp32", "channels_last": False, "fused_adam": False, "compile": False}  # "auto" on the CPU
    model = otcfm.Model(tiny_config(amp="bf16", channels_last="true", fused_adam="true"), "cpu")
    assert model.profile == {"amp": "bf16", "channels_last": True, "fused_adam": True, "compile": False}
    assert model.opt.param_groups[0]["fused"] is True
    for net in (model.net, model.ema):
        w = net.input_blocks[1][0].in_layers[2].weight  # (16, 16, 3, 3)
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_network_inputs(small_fx, channels_last):
    """With channels_last the training and the sampling network (EMA) get NHWC inputs; the loss and the samples
    stay what they are in NCHW, up to float rounding. Catches NCHW inputs reaching NHWC weights (a layout
    conversion inside every convolution) and a layout change that alters values."""
    def fixture_model(**overrides):
        model = otcfm.Model(fixture_config(small_fx, sampler="euler", steps=2, **overrides), "cpu")
        model.net.load_state_dict(small_fx["state_dict"])
        model.ema.load_state_dict(small_fx["state_dict"])
        model.net.eval()  # no dropout: its masks follow the memory layout
        return model

    model = fixture_model(channels_last=channels_last)
    seen = []
    for net in (model.net, model.ema):
        net.register_forward_pre_hook(lambda m, args: seen.append(args[1].is_contiguous(
            memory_format=torch.channels_last)))
    torch.manual_seed(0)
    with torch.no_grad():
        loss = model.loss(small_fx["inputs"]["x"].clamp(-1, 1)).item()
    x = model.generate(torch.tensor([1, 2]))
    assert seen == [channels_last] * 3  # one training forward, two Euler steps of the EMA
    reference = fixture_model()  # NCHW
    torch.manual_seed(0)
    with torch.no_grad():
        assert loss == pytest.approx(reference.loss(small_fx["inputs"]["x"].clamp(-1, 1)).item(), rel=1e-5)
    assert max_diff(x, reference.generate(torch.tensor([1, 2]))) < 1e-5 and x.is_contiguous()


def test_train_step_returns_the_device_loss_without_reading_it(monkeypatch):
    """train_step returns the detached 0-dim float32 loss on the model's device and never reads a tensor on the
    host on the way (with fused Adam; the exact OT's cost matrix goes to scipy by design, not through these).
    Catches loss.item() (a host synchronisation every step) and a float return value."""
    model = otcfm.Model(tiny_config(batch=4, fused_adam="true", channels_last="true"), "cpu")

    def refuse(*args, **kwargs):
        raise AssertionError("train_step read a tensor on the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, refuse)
        loss = model.train_step(tiny_data(4))
    assert isinstance(loss, torch.Tensor) and loss.shape == () and loss.dtype == torch.float32
    assert not loss.requires_grad and loss.device == model.device and loss.item() > 0 and model.step == 1
