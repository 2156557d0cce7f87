"""The closed forms of gaussian.py's docstring, each against a seeded Monte Carlo of many independent 1-D
loops (gaussian.simulate) with the regimes of retrain.py's flags.

Each test states its assumptions and its tolerance; the tolerances are 3-5 Monte-Carlo standard errors
(estimated in each docstring), so a wrong formula (a missing factor (n-1)/n, 1 + lam for 1 + 2 lam, ...)
fails by far more. Labels (R1), (A1), ... refer to the derivations in gaussian.py."""

import math

import pytest
import torch

import gaussian


def rel(a, b) -> float:
    return abs(a / b - 1)


# ----------------------------------------------------------------------------------------------------
# (R) Replace, fully synthetic: collapse of the variance, random walk of the mean


def test_replace_ml_variance_shrinks_and_mean_drifts():
    """ML (ddof 0), n = 10, from N(0, 1): E[s2_t] = ((n-1)/n)^t and E[mu_t^2] = 1 - ((n-1)/n)^t, (R1, R2).
    20,000 loops: the relative standard error of either average is at most ~1% for t <= 5; tolerance 4%."""
    n, loops = 10, 20_000
    r = gaussian.simulate(loops, 5, n, ddof=0, start=(0.0, 1.0), seed=1)
    for t in range(1, 6):
        e_s2, e_mu2 = gaussian.replace_moments(t, n, 1.0, ddof=0)
        assert abs(e_s2 - 0.9 ** t) < 1e-12 and abs(e_mu2 - (1 - 0.9 ** t)) < 1e-12  # the lead's form
        assert rel(r["s2"][t].mean().item(), e_s2) < 0.04, t
        assert rel((r["mu"][t] ** 2).mean().item(), e_mu2) < 0.04, t


def test_replace_unbiased_variance_holds_in_mean_yet_collapses():
    """Unbiased (ddof 1), n = 10, from N(0, 1): E[s2_t] = 1 while E[mu_t^2] = t / n grows linearly (R1, R2), and
    E[log s2_t] = t (psi((n-1)/2) + log 2 - log(n-1)) < 0 (R3): the median falls while the mean stays.
    20,000 loops, t <= 6: relative standard errors ~1.1%, tolerance 5%; log: standard error 0.009, tolerance 0.04."""
    n, loops = 10, 20_000
    r = gaussian.simulate(loops, 6, n, ddof=1, start=(0.0, 1.0), seed=2)
    drift = torch.special.digamma(torch.tensor((n - 1) / 2)).item() + math.log(2) - math.log(n - 1)
    for t in range(1, 7):
        e_s2, e_mu2 = gaussian.replace_moments(t, n, 1.0, ddof=1)
        assert e_s2 == 1.0 and abs(e_mu2 - t / n) < 1e-12
        assert rel(r["s2"][t].mean().item(), 1.0) < 0.05, t
        assert rel((r["mu"][t] ** 2).mean().item(), t / n) < 0.05, t
        assert abs(r["s2"][t].log().mean().item() - t * drift) < 0.04, t
    assert r["s2"][6].median() < 0.6  # exp(6 drift) = 0.50: most loops have lost half their variance


@pytest.mark.parametrize("tau", [0.8, 1.25, math.sqrt(20 / 19)])
def test_temperature_scales_the_variance_by_tau_squared(tau):
    """Replace, ML, n = 20, samples of N(mu, tau^2 s2): E[s2_{t+1}] = tau^2 (n-1)/n E[s2_t] (R1); tau^2 = n/(n-1)
    holds the variance in expectation. 20,000 loops, t <= 3: relative standard error < 1%, tolerance 3%."""
    n = 20
    r = gaussian.simulate(20_000, 3, n, temperature=tau, start=(0.0, 1.0), seed=3)
    for t in range(1, 4):
        assert rel(r["s2"][t].mean().item(), (tau ** 2 * (n - 1) / n) ** t) < 0.03, (tau, t)


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("tau", [0.8, 1.25])
def test_replace_moments_at_other_temperatures(tau, ddof):
    """(R1) and (R2) at tau != 1, ML and unbiased, against 20,000 loops of n = 10: E[s2_t] (relative standard error
    ~0.4%) and E[(mu_t - mu_0)^2] (~1.2%) for t = 1..3, within 4%. tau^2 against tau is 20-50% apart here."""
    n = 10
    r = gaussian.simulate(20_000, 3, n, ddof=ddof, temperature=tau, start=(0.0, 1.0), seed=40)
    for t in (1, 2, 3):
        s2_t, drift = gaussian.replace_moments(t, n, 1.0, ddof=ddof, tau=tau)
        assert rel(r["s2"][t].mean().item(), s2_t) < 0.04, t
        assert rel(((r["mu"][t] - r["mu"][0]) ** 2).mean().item(), drift) < 0.04, t


# ----------------------------------------------------------------------------------------------------
# (A) Accumulate: the mean stays bounded; accumulate-subsample in between


def test_accumulate_keeps_the_mean_bounded():
    """n = 10 per generation, 20 generations, 8,000 loops. Accumulate: E[(mu_t - mu_0)^2] follows (A1) from the
    loops' own E[s2_k] (relative standard error ~1.6%, tolerance 7%) and stays below (pi^2/6) E[s2_0] / n
    without real data (below (pi^2/6) / n around the truth with the real set kept, lam = 1). Replace drifts
    to E[s2_0] (1 - 0.9^20) ~ 0.79; accumulate-subsample lies between the two."""
    n, iters, loops = 10, 20, 8_000
    spread = {}
    for pool in ("replace", "accumulate", "accumulate-subsample"):  # the last two only compared: 2,000 loops
        r = gaussian.simulate(loops if pool == "accumulate" else 2_000, iters, n, pool=pool, real="none", seed=4)
        spread[pool] = ((r["mu"] - r["mu"][0]) ** 2).mean(1)  # (iters + 1,)
        if pool == "accumulate":
            mean_s2 = r["s2"].mean(1).tolist()
            for t in (5, 10, 20):
                assert rel(spread[pool][t].item(), gaussian.accumulate_mean_var(mean_s2[:t], 0, n)) < 0.07, t
            bound = math.pi ** 2 / 6 * mean_s2[0] / n
            assert spread[pool][-1] < 1.03 * bound and spread[pool][-1] - spread[pool][10] < 0.1 * bound
    assert spread["replace"][-1] > 5 * spread["accumulate"][-1]
    assert spread["accumulate"][-1] < spread["accumulate-subsample"][-1] < spread["replace"][-1]

    r = gaussian.simulate(loops, iters, n, lam=1, pool="accumulate", real="fixed", seed=5)
    mean_s2 = r["s2"].mean(1).tolist()
    around_real = ((r["mu"][-1] - r["real_mean"]) ** 2).mean().item()
    assert rel(around_real, gaussian.accumulate_mean_var(mean_s2[:iters], n, n)) < 0.07
    assert (r["mu"][-1] ** 2).mean() < 1.03 * math.pi ** 2 / 6 / n  # around the truth, N(0, 1)


def test_accumulate_mean_at_a_temperature_follows_each_generations_variance():
    """(A1) at tau = 0.8, n = 5, no real data, 20,000 loops: each generation's E[s2_k] weighs its own term (the
    variance falls ~40% over 4 generations here) and tau^2 scales them all; within 4% (standard error ~1%)."""
    n, tau = 5, 0.8
    r = gaussian.simulate(20_000, 4, n, pool="accumulate", real="none", temperature=tau, start=(0.0, 1.0), seed=41)
    mean_s2 = r["s2"].mean(1).tolist()
    assert mean_s2[3] < 0.7 * mean_s2[0]
    for t in (2, 3, 4):
        expected = gaussian.accumulate_mean_var(mean_s2[:t], 0, n, tau=tau)
        assert rel(((r["mu"][t] - r["mu"][0]) ** 2).mean().item(), expected) < 0.04, t


# ----------------------------------------------------------------------------------------------------
# (P) The paper's loop, and fresh real data


def stationary(x: torch.Tensor, burn_in: int) -> float:
    """The average of x^2 over loops and the iterations after the burn-in."""
    return (x[burn_in:] ** 2).mean().item()


@pytest.mark.parametrize("lam", [0.5, 1, 2])
def test_paper_loop_stationary_variance(lam):
    """Fixed real set of n plus lam n samples, replace: stationary E[(mu_t - m_R)^2] = lam E[s2] / (n (1 + 2 lam))
    (P1). At n = 200 the large-n form lam / (n (1 + 2 lam)) holds within 5% (1,500 loops x 20 iterations,
    correlated at lam / (1 + lam): relative standard error ~1.5%); at n = 10 the large-n form is ~12% high and
    (P1) with the loops' stationary E[s2] holds within 5%."""
    r = gaussian.simulate(1_500, 30, 200, lam=lam, seed=6)  # D_0 = 0: at t = 10, 1 - (2/3)^20 of V is reached
    assert rel(stationary(r["mu"] - r["real_mean"], 10), gaussian.paper_stationary_var(200, lam, 1.0)) < 0.05
    r = gaussian.simulate(4_000, 30, 10, lam=lam, seed=7)
    measured = stationary(r["mu"] - r["real_mean"], 10)
    assert rel(measured, gaussian.paper_stationary_var(10, lam, r["s2"][10:].mean().item())) < 0.05
    assert measured < 0.93 * gaussian.paper_stationary_var(10, lam, 1.0)


def test_fresh_real_data_beats_a_fixed_set():
    """n = 200, lam = 1, around the truth mu* = 0: fresh data E[mu^2] = (1 + lam) / (n (1 + 2 lam)) (P2), a fixed
    set (1 + 3 lam) / (n (1 + 2 lam)) (P1 plus the real mean's own error). 1,500 loops x 20 iterations:
    relative standard error ~1.5% (the fixed set's error is one draw per loop: ~3%); tolerance 6%."""
    n, lam = 200, 1
    fresh = gaussian.simulate(1_500, 30, n, lam=lam, real="fresh", seed=8)
    assert rel(stationary(fresh["mu"], 10), gaussian.fresh_stationary_var(n, lam, 1.0)) < 0.06
    fixed = gaussian.simulate(1_500, 30, n, lam=lam, real="fixed", seed=9)
    assert rel(stationary(fixed["mu"], 10), (1 + 3 * lam) / (n * (1 + 2 * lam))) < 0.06


@pytest.mark.parametrize("lam", [0.5, 2])
def test_fresh_real_data_at_other_lambdas(lam):
    """(P2) at lam = 0.5 and 2, where (1 + lam) and 2 lam differ by 50% and 25%: within 6% (as at lam = 1)."""
    r = gaussian.simulate(1_500, 30, 200, lam=lam, real="fresh", seed=42)
    assert rel(stationary(r["mu"], 10), gaussian.fresh_stationary_var(200, lam, 1.0)) < 0.06


# ----------------------------------------------------------------------------------------------------
# (C) Curation: Ferbach et al.'s K-choice model


LINEAR, QUADRATIC = gaussian.Reward("linear", beta=(0.5,)), gaussian.Reward("quadratic", gamma=1.0)
GRID = torch.linspace(-10, 10, 801, dtype=torch.float64)


def moments(p: torch.Tensor) -> tuple[float, float]:
    m = torch.trapezoid(p * GRID, GRID).item()
    return m, torch.trapezoid(p * GRID ** 2, GRID).item() - m * m


def test_curated_density_formula_by_quadrature():
    """(C2), the Laplace-transform form, against (C1) integrated directly for K = 2 (a 2-D quadrature): the same
    density to 1e-9; it integrates to 1; K = 1 is the model itself; K = 10^4 is the reward-tilted model of
    (C3, C4) within 0.2% (the O(1/K) gap)."""
    mu, s2 = 0.3, 1.2
    p = torch.exp(-0.5 * (GRID - mu) ** 2 / s2) / math.sqrt(2 * math.pi * s2)
    for reward in (LINEAR, QUADRATIC):
        r = reward(GRID[:, None])
        direct = 2 * p * torch.trapezoid(p[None, :] * torch.sigmoid(r[:, None] - r[None, :]), GRID, dim=1)
        assert (gaussian.curated_density(GRID, mu, s2, reward, 2) - direct).abs().max() < 1e-9
        assert (gaussian.curated_density(GRID, mu, s2, reward, 1) - p).abs().max() < 1e-9
        many = gaussian.curated_density(GRID, mu, s2, reward, 10_000)
        assert abs(torch.trapezoid(many, GRID).item() - 1) < 1e-9
        (m, v), (m_tilt, v_tilt) = moments(many), reward.tilt(mu, s2)
        assert abs(m - m_tilt) < 0.002 * abs(m_tilt) + 1e-3 and rel(v, v_tilt) < 0.002


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("reward", [LINEAR, QUADRATIC], ids=["linear", "quadratic"])
def test_kept_samples_follow_the_curated_density(reward, k):
    """One curated generation from N(0.3, 1.2) (simulate: softmax choice by the Gumbel-max trick), refitted by ML
    on n = 500 kept samples, 400 loops: E[mu_1] = the kept mean and E[s2_1] = (n-1)/n the kept variance of
    the density (C2). Standard errors 0.0025 (mean) and 0.3% (variance); tolerances 0.012 and 2%."""
    n = 500
    r = gaussian.simulate(400, 1, n, k=k, reward=reward, start=(0.3, 1.2), seed=10 + k)
    m, v = moments(gaussian.curated_density(GRID, 0.3, 1.2, reward, k))
    assert abs(r["mu"][1].mean().item() - m) < 0.012
    assert rel(r["s2"][1].mean().item(), (n - 1) / n * v) < 0.02


def test_curation_over_generations_tilts_by_the_reward():
    """K = 200 (within ~1% of K -> inf for these rewards), n = 50 kept samples, 4 generations, 100 loops, ML refit.
    Linear r = 0.5 x: the mean moves by beta s2_t per generation (C3); quadratic r = -x^2 / 2: s2_{t+1} =
    (n-1)/n s2_t / (1 + gamma s2_t) in expectation (C4). 400 loop-generations: standard errors ~1.4% and
    ~1%; tolerances 6% and 4%."""
    n = 50
    r = gaussian.simulate(100, 4, n, k=200, reward=LINEAR, start=(0.0, 1.0), seed=20)
    shift = (r["mu"][1:] - r["mu"][:-1]).sum() / (0.5 * r["s2"][:-1]).sum()
    assert rel(shift.item(), 1.0) < 0.06
    r = gaussian.simulate(100, 4, n, k=200, reward=QUADRATIC, start=(0.0, 1.0), seed=21)
    ratio = (r["s2"][1:] * (1 + r["s2"][:-1]) / r["s2"][:-1]).mean()
    assert rel(ratio.item(), (n - 1) / n) < 0.04
    assert r["s2"][-1].mean() < 0.3  # 1 -> 1/2 -> 1/3 -> 1/4 -> 1/5 (times (n-1)/n per step)


def test_curation_with_real_data_settles_or_diverges():
    """The fixed real set (n = 500) plus lam n curated samples, linear reward, K = 30, 40 loops x 20 iterations.
    lam = 1, beta = 0.2 (4 lam (1 + lam) beta^2 = 0.32 <= 1): the model settles at (C5): s2_inf from the real
    set's variance, and D = lam times the kept samples' shift, which at K = 30 falls 3.5% short of beta s2 (C2).
    Both within 4% (standard errors ~0.5% and ~1.1%, after a burn-in of 10 iterations). beta = 0.5 (2 > 1):
    no fixed point, the variance grows without bound (median 1 -> 9 -> 27 -> 111 at iterations 0, 16, 18,
    20 in the first 20 loops), slowly at first, then faster and faster."""
    n, lam, k = 500, 1, 30
    reward = gaussian.Reward("linear", beta=(0.2,))
    r = gaussian.simulate(40, 20, n, lam=lam, k=k, reward=reward, seed=30)
    v_real = r["s2"][0].mean().item()  # model 0 is the ML fit of the real set: its variance
    _, s2_inf = gaussian.curated_real_fixed_point(lam, 0.2, v_real)
    assert rel(r["s2"][10:].mean().item(), s2_inf) < 0.04
    shift = moments(gaussian.curated_density(GRID, 0.0, s2_inf, reward, k))[0]
    assert rel((r["mu"] - r["real_mean"])[10:].mean().item(), lam * shift) < 0.04
    assert gaussian.curated_real_fixed_point(lam, 0.5, v_real) is None
    r = gaussian.simulate(20, 20, n, lam=lam, k=k, reward=gaussian.Reward("linear", beta=(0.5,)), seed=31)
    median = r["s2"].median(1).values
    assert (r["s2"][-1] > 2).all() and median[-1] > 3 * median[-3] > 3 * median[-5]  # and accelerating



@pytest.mark.parametrize("lam,beta,v_real", [(0.5, 0.3, 1.0), (1.0, 0.2, 0.8), (2.0, 0.15, 1.2)])
def test_curated_fixed_point_is_where_the_recursion_settles(lam, beta, v_real):
    """(C5) against the recursion it solves (large n, K -> inf): D <- lam / (1 + lam) (D + beta s2),
    s2 <- (v + lam s2) / (1 + lam) + lam / (1 + lam)^2 (D + beta s2)^2, iterated from the real set's fit; both
    D_inf and s2_inf, at lam != 1 too. Past the threshold (beta doubled: 4 lam (1 + lam) beta^2 v > 1) there is
    no fixed point and the recursion's variance grows without bound."""
    d, s2 = 0.0, v_real
    for _ in range(3_000):
        d, s2 = (lam / (1 + lam) * (d + beta * s2),
                 (v_real + lam * s2) / (1 + lam) + lam / (1 + lam) ** 2 * (d + beta * s2) ** 2)
    assert gaussian.curated_real_fixed_point(lam, beta, v_real) == pytest.approx((d, s2), rel=1e-9)
    assert gaussian.curated_real_fixed_point(lam, 2 * beta, v_real) is None
    d, s2 = 0.0, v_real
    for _ in range(200):
        d, s2 = (lam / (1 + lam) * (d + 2 * beta * s2),
                 (v_real + lam * s2) / (1 + lam) + lam / (1 + lam) ** 2 * (d + 2 * beta * s2) ** 2)
        if s2 > 1e6:
            break
    assert s2 > 1e6


def test_every_mutation_of_the_closed_forms_is_caught():
    """tests/mutate_gaussian.py: each wrong formula in a copy of gaussian.py fails a test of this file. The
    mutations these tests used to let through are checked here (the whole list: run the script, a minute)."""
    import mutate_gaussian

    assert mutate_gaussian.survivors(["(R2) tau^2 -> tau", "(A1) E[s2_0] for every k", "(P2) 1 + lam -> 2 lam",
                                      "(C5) D_inf = lam beta s2 -> 0"]) == []
