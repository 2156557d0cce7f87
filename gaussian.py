"""gaussian.py -- the paper's warm-up: a Gaussian fitted by maximum likelihood, retrained on its own samples.

Bertrand et al., "On the Stability of Iterative Retraining of Generative Models on their Own Data"
(ICLR 2024), start from the simplest generative model: fit N(mu, Sigma) by maximum likelihood, sample
from the fit, refit on the samples, repeat. With samples alone (the fully synthetic loop) the
covariance collapses: log det Sigma_t is a random walk with negative drift. With the real data kept
in the mix the loop is stable, and for a well-specified model the distance to the true parameters
shrinks by lambda / (1 + lambda) per iteration (the implicit-function argument behind Theorem 1:
J = lambda (H_d + lambda H_m)^-1 H_m = lambda / (1 + lambda) I when H_d = H_m).

This file is a model with the same interface as ddpm.py, edm.py and otcfm.py (see retrain.py), except
that its training is closed form: `fit(x)` instead of `train_step(x)`, so the budget in kimg does not
apply. It fits any data, flattened: `--data gaussian` (a synthetic d-dimensional Gaussian with known
mu*, Sigma*, made by `make_data`), or images (a 64-d Gaussian of the digits, say).

    python retrain.py --model gaussian --data gaussian --lam 0.5 1 2 --iters 10 --n-real 100000
    python retrain.py --model gaussian --data gaussian --lam inf 1 --iters 300 --n-real 20
    python retrain.py --model gaussian --data gaussian --lam inf --pool accumulate --iters 100 --n-real 20

It is also where every self-consuming regime of retrain.py (--pool, --real, --temperature, --curate)
has an answer in closed form, derived below for a 1-D Gaussian, and `simulate` runs thousands of
independent 1-D loops at once to check each one (tests/test_gaussian.py).

Closed forms (1-D; derived here, each checked by Monte Carlo in tests/test_gaussian.py)
-------------------------------------------------------------------------------------------
Setting. A model N(mu, s2) is fitted to a training set of N points by mu = mean and
s2 = sum (x - mu)^2 / (N - ddof): ddof = 0 is maximum likelihood (ML, the default), ddof = 1 the
unbiased estimate. A generation draws n_s samples x = mu + tau s z, z ~ N(0, 1), where tau is the
sampling temperature (1 = no bias). The real data are N(0, sigma^2) draws; the loop starts from model 0
fitted to the first real set of n points. Two facts about n i.i.d. N(m, v) points are used throughout:
their mean is N(m, v / n), and independently of it sum (x - mean)^2 ~ v chi2_{n-1} (Cochran).

(R) Replace, fully synthetic (the collapse). Model t+1 is fitted to n samples of model t alone, so
        mu_{t+1} = mu_t + tau s_t z / sqrt(n),    s2_{t+1} = tau^2 s2_t chi2_{n-1} / (n - ddof),
    with z and the chi2 independent. Taking expectations, E[s2_{t+1} | s2_t] = rho s2_t with
        rho = tau^2 (n - 1) / (n - ddof),   so   E[s2_t] = rho^t s2_0,                                    (R1)
    and the mean makes a martingale whose increments add their variances:
        E[(mu_t - mu_0)^2] = (tau^2 / n) sum_{k<t} E[s2_k] = (tau^2 s2_0 / n) (1 - rho^t) / (1 - rho).       (R2)
    ML (ddof 0, tau 1): rho = (n - 1) / n, E[s2_t] = s2_0 ((n-1)/n)^t, Var mu_t = s2_0 (1 - ((n-1)/n)^t).
    Unbiased (ddof 1, tau 1): rho = 1, E[s2_t] = s2_0 stays put while Var mu_t = t s2_0 / n grows
    linearly; yet s2_t still collapses almost surely: E[log s2_{t+1} - log s2_t] = log tau^2 + psi((n-1)/2)
    + log 2 - log(n - ddof) < 0 at tau = 1 (Jensen), a random walk with negative drift. In d dimensions
    the same argument on the Wishart matrix gives E[Sigma_{t+1}] = rho Sigma_t and a drift of log det
    Sigma_t of d log tau^2 + sum_{i=1..d} psi((n-i)/2) + d log 2 - d log(n - ddof) per step.       (R3)
    Temperature (tau != 1, ML): E[s2_{t+1}] = tau^2 (n-1)/n s2_t, so tau^2 = n / (n-1) holds the
    variance in expectation and any other tau makes it shrink or grow geometrically.

(A) Accumulate: every generation's n_s samples are kept, and model t is fitted to n_r real points
    (n_r = n with --real fixed, 0 without real data) plus all t generations so far, N_t = n_r + t n_s
    points, with model 0 fitted to the real points themselves (mu_0 = their mean when n_r > 0). The
    sum of the training set is M_t = N_{t-1} mu_{t-1} + n_s mean(S_{t-1}) and mean(S_{t-1}) = mu_{t-1} +
    tau s_{t-1} z / sqrt(n_s), so
        mu_t = mu_{t-1} + tau sqrt(n_s) s_{t-1} z / N_t,
        E[(mu_t - mu_0)^2] = tau^2 sum_{k=1..t} n_s E[s2_{k-1}] / N_k^2.                                     (A1)
    The weights 1/N_k^2 are summable, so the mean stays bounded for ever. With s2 ~ sigma^2 and no real
    data (N_k = k n_s) this is (sigma^2 / n_s) sum_{k>=1} 1/k^2 <= (pi^2/6) sigma^2 / n_s; with the real set
    kept and n_s = n it is (sigma^2/n) sum_{k>=2} 1/k^2 around the real mean, and adding the real mean's own
    error sigma^2/n, (pi^2/6) sigma^2 / n around the truth (Gerstgrasser et al. 2024 find the same pi^2/6
    for linear models). Replace, by (R2), drifts by sigma^2 (1 - rho^t) (ML) or t sigma^2 / n (unbiased).
    Accumulate-subsample (n_s points drawn from the pool) has no such simple form; the tests only
    check that it sits between the two.

(P) The paper's loop: the fixed real set R (n points, mean m_R) plus n_s = lam n samples of the latest
    model, which replace the previous ones. With D_t = mu_t - m_R,
        D_{t+1} = (n m_R + n_s mean(S_t)) / (n + n_s) - m_R = lam / (1 + lam) (D_t + s_t z / sqrt(lam n)).
    A stationary variance V solves V = (lam / (1+lam))^2 (V + E[s2] / (lam n)), that is
        V = lam E[s2_inf] / (n (1 + 2 lam)),                                                                (P1)
    which is lam sigma^2 / (n (1 + 2 lam)) for large n (E[s2_inf] -> sigma^2; at n = 10 the stationary E[s2]
    is ~12% below sigma^2, and so is V). The factor lam / (1 + lam) is the contraction of Theorem 1.
    Fresh real data (a new real set each iteration, mean m_t ~ N(0, sigma^2 / n)): now
        mu_{t+1} = m_t / (1 + lam) + lam / (1 + lam) (mu_t + s_t z / sqrt(lam n)),
    and with s2 ~ sigma^2, V = sigma^2 / (n (1+lam)^2) + (lam / (1+lam))^2 V + lam sigma^2 / (n (1+lam)^2):
        E[mu_inf^2] = (1 + lam) sigma^2 / (n (1 + 2 lam)),                                                  (P2)
    against (1 + 3 lam) sigma^2 / (n (1 + 2 lam)) for the fixed set (P1 plus the real mean's own error):
    fresh data are worth 2 lam sigma^2 / (n (1 + 2 lam)) of squared error.

(C) Curation (Ferbach et al. 2024): each kept sample is one of K candidates X_1..X_K ~ p_t, candidate i
    kept with probability e^{r(X_i)} / sum_j e^{r(X_j)} for a reward r. By symmetry over which
    candidate is kept, the kept sample has the density
        p_{t+1}(x) = K p_t(x) E[e^{r(x)} / (e^{r(x)} + sum_{j=2..K} e^{r(X_j)})],   X_j ~ p_t.                  (C1)
    With 1 / (a + S) = int_0^inf e^{-u (a + S)} du and the X_j independent, the expectation becomes a 1-D
    integral of the Laplace transform phi(u) = E[exp(-u e^{r(X)})]:
        p_{t+1}(x) = K p_t(x) int_0^inf e^{r(x)} exp(-u e^{r(x)}) phi(u)^{K-1} du,                         (C2)
    which `curated_density` evaluates by quadrature for any K. As K -> inf, sum_{j>=2} e^{r(X_j)} / (K-1)
    -> E[e^r] (law of large numbers) and p_{t+1} -> p_t e^r / E[e^r], the reward-tilted model. For a
    Gaussian N(mu, s2), completing the square in the exponent:
        r(x) = beta x:           N(mu + beta s2, s2)                 the mean moves by beta s2 per generation  (C3)
        r(x) = -gamma x^2 / 2:   N(mu / (1 + gamma s2), s2 / (1 + gamma s2))  concentration on the maximizer 0 (C4)
    (Reward.tilt). Curation with the fixed real set (n points, mean m_R, variance v_R) and n_s = lam n
    curated samples, linear reward, K -> inf and large n: the curated samples are N(mu + beta s2, s2), and
    the ML fit of the two groups adds their between-group spread to the variance:
        D_{t+1} = lam / (1 + lam) (D_t + beta s2_t),                                     D = mu - m_R,
        s2_{t+1} = (v_R + lam s2_t) / (1 + lam) + lam / (1 + lam)^2 (D_t + beta s2_t)^2.
    At a fixed point D + beta s2 = (1 + lam) beta s2, so D = lam beta s2 and s2 = v_R + c s2^2 with
    c = lam (1 + lam) beta^2. A fixed point exists if and only if 4 c v_R <= 1, and the stable one is
        s2_inf = 2 v_R / (1 + sqrt(1 - 4 c v_R)),    D_inf = lam beta s2_inf:                               (C5)
    the real data hold the curated model to a bounded offset. Beyond 4 lam (1 + lam) beta^2 v_R = 1,
    s2 < v_R + c s2^2 for every s2: the Gaussian widens to straddle the real data and its ever further
    curated samples, without bound (with beta = 0.5 and v_R = 1, from lam = 0.62 up).
"""

import argparse
import math
from dataclasses import dataclass

import torch


@dataclass
class Config:
    dim: int = 2                 # dimension of --data gaussian (--dim)
    img_channels: int | None = None    # set by retrain.py when fitting images (samples are then reshaped)
    img_resolution: int | None = None  # set by retrain.py when fitting images
    sample_batch: int = 100_000  # samples per generate() call
    init_mean_shift: float = 0.0  # added to every coordinate of the first fit's mean: starts theta_0 away from theta*
    init_cov_scale: float = 1.0   # multiplies the first fit's covariance, for the same purpose
    ddof: int = 0                 # covariance divisor N - ddof: 0 = maximum likelihood (the paper), 1 = unbiased


PRESETS = {"paper": {}, "small": {}}  # nothing to size: one preset is as cheap as the other
OFFICIAL_URLS = {}                     # no released checkpoint


RANGES = {**dict.fromkeys(("dim", "sample_batch", "init_cov_scale"), "> 0"), "ddof": ">= 0"}  # what make_config accepts


def _check_ranges(cfg) -> None:
    """Every number of RANGES within its range: a ValueError naming the field otherwise."""
    rules = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1,
             "in [0, 1]": lambda v: 0 <= v <= 1}
    for name, rule in RANGES.items():
        value = getattr(cfg, name)
        if not (math.isfinite(value) and rules[rule](value)):
            raise ValueError(f"{name} {value!r}: must be {rule}")


def make_config(preset: str, **overrides) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' for gaussian; choose from {sorted(PRESETS)}")
    fields = set(Config.__dataclass_fields__)
    for k in overrides:
        if k not in fields:
            raise ValueError(f"gaussian.Config has no field '{k}'; fields: {', '.join(sorted(fields))}")
    cfg = Config(**{**PRESETS[preset], **overrides})
    _check_ranges(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------
# The synthetic data set and the parameter errors


def truth(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mu*, Sigma* of --data gaussian: a fixed mean and a fixed well-conditioned covariance (float64)."""
    g = torch.Generator().manual_seed(dim)
    mu = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    sigma = a @ a.T / dim + 0.5 * torch.eye(dim, dtype=torch.float64)
    return mu, sigma


def make_data(dim: int, n: int, seed: int = 0) -> torch.Tensor:
    """n samples of N(mu*, Sigma*): the real data of --data gaussian, float64 (n, dim)."""
    mu, sigma = truth(dim)
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return mu + z @ torch.linalg.cholesky(sigma).T


def errors(model: "Model", mu_star: torch.Tensor, sigma_star: torch.Tensor) -> dict:
    """||mu_t - mu*||_2, ||Sigma_t - Sigma*||_F and log det Sigma_t, as metrics.jsonl records them."""
    return {"mean_err": torch.linalg.vector_norm(model.mu - mu_star).item(),
            "cov_err": torch.linalg.matrix_norm(model.sigma - sigma_star).item(),
            "logdet": torch.linalg.slogdet(model.sigma)[1].item()}


# ----------------------------------------------------------------------------------------------------


class Model:
    """N(mu, Sigma) with full covariance, fitted by maximum likelihood (or unbiased: Config.ddof)."""

    def __init__(self, cfg: Config, device="cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        d = cfg.dim if cfg.img_channels is None else cfg.img_channels * cfg.img_resolution ** 2
        self.mu = torch.zeros(d, dtype=torch.float64)
        self.sigma = torch.eye(d, dtype=torch.float64)
        self.fits = 0   # how many times fit() ran; the first fit gets the init_* perturbation
        self.nfe = 0    # no network

    def fit(self, x: torch.Tensor) -> None:
        """mu = mean, Sigma = sum (x - mu)(x - mu)^T / (N - ddof), on the flattened data."""
        x = x.reshape(len(x), -1).to(torch.float64).cpu()  # (N, d)
        self.mu = x.mean(0)
        xc = x - self.mu
        self.sigma = xc.T @ xc / (len(x) - self.cfg.ddof)
        if self.fits == 0:
            self.mu = self.mu + self.cfg.init_mean_shift
            self.sigma = self.sigma * self.cfg.init_cov_scale
        self.fits += 1

    def generate(self, seeds: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """mu + tau L z with Sigma = L L^T and z ~ N(0, I) from one generator per seed: samples of
        N(mu, tau^2 Sigma) for the temperature tau."""
        d = len(self.mu)
        # eigen-factor rather than Cholesky, so a collapsed (singular) covariance still samples
        evals, evecs = torch.linalg.eigh(self.sigma)
        l = evecs * evals.clamp(min=0).sqrt()
        g = torch.Generator()  # reseeded for each sample: the values of one generator per seed, built once
        z = torch.stack([torch.randn(d, generator=g.manual_seed(s), dtype=torch.float64)
                         for s in seeds.tolist()]) if len(seeds) else torch.zeros(0, d, dtype=torch.float64)
        if temperature != 1:
            z = z * temperature
        x = self.mu + z @ l.T  # (N, d)
        if self.cfg.img_channels is not None:  # images: back to (N, C, H, W) in the data range
            r = self.cfg.img_resolution
            x = x.clamp(-1, 1).to(torch.float32).reshape(len(x), self.cfg.img_channels, r, r)
        return x.to(self.device)

    def state_dict(self) -> dict:
        return {"mu": self.mu.clone(), "sigma": self.sigma.clone(), "fits": self.fits}

    def load_state_dict(self, d: dict) -> None:
        if d["mu"].shape != self.mu.shape:
            raise ValueError(f"checkpoint holds a {len(d['mu'])}-d Gaussian, this model is {len(self.mu)}-d")
        self.mu, self.sigma, self.fits = d["mu"].clone(), d["sigma"].clone(), int(d["fits"])

    def load_pretrained(self, path: str) -> None:
        raise ValueError("the Gaussian model has no released checkpoint; leave out --init")


# ----------------------------------------------------------------------------------------------------
# Rewards for curation (--reward linear | quadratic in retrain.py)


@dataclass(frozen=True)
class Reward:
    """r(x) = beta . x ("linear") or r(x) = -gamma |x|^2 / 2 ("quadratic") of vectors x (..., d) -> (...)."""

    kind: str
    beta: tuple[float, ...] = (1.0,)  # linear: one coefficient for every coordinate, or one per coordinate
    gamma: float = 1.0                # quadratic: the strength of the pull toward 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return (x * torch.tensor(self.beta, dtype=x.dtype, device=x.device)).sum(-1)
        return -0.5 * self.gamma * (x * x).sum(-1)

    def tilt(self, mu, s2):
        """The K -> inf curated model p e^r / E[e^r] of a 1-D N(mu, s2): its mean and variance, (C3) and (C4)."""
        if self.kind == "linear":
            return mu + self.beta[0] * s2, s2
        return mu / (1 + self.gamma * s2), s2 / (1 + self.gamma * s2)


# ----------------------------------------------------------------------------------------------------
# The closed forms of the module docstring, as functions of the loop's settings


def replace_moments(t: int, n: int, s2_0: float, ddof: int = 0, tau: float = 1.0) -> tuple[float, float]:
    """Replace, fully synthetic, n samples per generation: (E[s2_t], E[(mu_t - mu_0)^2]), (R1) and (R2)."""
    rho = tau ** 2 * (n - 1) / (n - ddof)
    drift = t if rho == 1 else (1 - rho ** t) / (1 - rho)
    return s2_0 * rho ** t, tau ** 2 * s2_0 / n * drift


def accumulate_mean_var(mean_s2: list[float], n_real: int, n_synth: int, tau: float = 1.0) -> float:
    """Accumulate: E[(mu_t - mu_0)^2] from E[s2_0], ..., E[s2_{t-1}] (mean_s2), (A1)."""
    return sum(tau ** 2 * n_synth * s2 / (n_real + k * n_synth) ** 2 for k, s2 in enumerate(mean_s2, 1))


def paper_stationary_var(n: int, lam: float, s2: float) -> float:
    """The paper's loop (fixed real set): stationary E[(mu_t - m_R)^2] given the stationary E[s2], (P1)."""
    return lam * s2 / (n * (1 + 2 * lam))


def fresh_stationary_var(n: int, lam: float, sigma2: float) -> float:
    """Fresh real data each iteration: stationary E[(mu_t - mu*)^2], large n, (P2)."""
    return (1 + lam) * sigma2 / (n * (1 + 2 * lam))


def curated_real_fixed_point(lam: float, beta: float, v_real: float) -> tuple[float, float] | None:
    """Curation by a linear reward with the fixed real set: the stable (D_inf, s2_inf) of (C5), or None beyond
    the threshold 4 lam (1 + lam) beta^2 v_real > 1, where the variance grows without bound."""
    c = lam * (1 + lam) * beta ** 2
    if 4 * c * v_real > 1:
        return None
    s2 = 2 * v_real / (1 + math.sqrt(1 - 4 * c * v_real))
    return lam * beta * s2, s2


def curated_density(x: torch.Tensor, mu: float, s2: float, reward: Reward, k: int) -> torch.Tensor:
    """The density (C2) of the kept sample, on the grid x (1-D, float64, wide and fine enough to integrate
    N(mu, s2) by the trapezoid rule), for K candidates of N(mu, s2) and the reward."""
    p = torch.exp(-0.5 * (x - mu) ** 2 / s2) / math.sqrt(2 * math.pi * s2)  # p_t on the grid
    a = torch.exp(reward(x[:, None]))  # e^{r(x)}
    v = torch.linspace(-40.0, 40.0, 1601, dtype=torch.float64)  # u = e^v: du = e^v dv covers all scales of u
    u = v.exp()
    phi = torch.trapezoid(p[None, :] * torch.exp(-u[:, None] * a[None, :]), x, dim=1)  # phi(u) = E[exp(-u e^r)]
    inner = torch.trapezoid(a[:, None] * u[None, :] * torch.exp(-u[None, :] * a[:, None]) * phi[None, :] ** (k - 1),
                            v, dim=1)  # int_0^inf e^r exp(-u e^r) phi(u)^{K-1} du, per grid point
    return k * p * inner


# ----------------------------------------------------------------------------------------------------
# Many 1-D loops at once: the regimes of retrain.py, vectorized over independent loops


def _fit(x: torch.Tensor, ddof: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-loop mean and variance of x (loops, N)."""
    mu = x.mean(1)
    return mu, ((x - mu[:, None]) ** 2).sum(1) / (x.shape[1] - ddof)


def simulate(loops: int, iters: int, n: int, *, lam: float = math.inf, pool: str = "replace", real: str = "fixed",
             ddof: int = 0, temperature: float = 1.0, k: int = 1, reward: Reward | None = None,
             start: tuple[float, float] | None = None, seed: int = 0) -> dict:
    """`loops` independent 1-D retraining loops, with the settings of retrain.py's flags of the same names.

    The real data are N(0, 1) draws; model 0 is fitted to the first n of them, or is N(start) in every loop
    when start = (mu_0, s2_0) is given. Iteration t draws n_s = round(lam n) groups (n for lam = inf) of k
    samples of model t-1 at the temperature, keeps one sample per group (by softmax(reward), here through
    the Gumbel-max trick; the only one when k = 1), and fits model t to the real set of the iteration (the
    same n points with real "fixed", n new ones with "fresh", none with "none" or lam = inf) plus the
    synthetic part: the kept samples ("replace"), all kept samples so far ("accumulate"), or n_s of those
    drawn without replacement ("accumulate-subsample").

    Returns {"mu": (iters + 1, loops), "s2": (iters + 1, loops), "real_mean": (loops,) the first real set's}."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    n_synth = n if math.isinf(lam) else round(lam * n)
    with_real = not math.isinf(lam) and real != "none"
    first = normal(loops, n)
    mu, s2 = _fit(first, ddof) if start is None else (torch.full((loops,), float(v), dtype=torch.float64) for v in start)
    mus, s2s, kept = [mu], [s2], []
    for _ in range(iters):
        x = mu[:, None, None] + temperature * s2.clamp(min=0).sqrt()[:, None, None] * normal(loops, n_synth, k)
        if k > 1:  # softmax(r) over the k candidates: argmax of r + Gumbel noise
            gumbel = -torch.log(-torch.log(torch.rand(x.shape, generator=g, dtype=torch.float64)))
            x = x.gather(2, (reward(x[..., None]) + gumbel).argmax(2, keepdim=True))
        kept = [*kept, x[..., 0]] if pool != "replace" else [x[..., 0]]
        synth = torch.cat(kept, 1)
        if pool == "accumulate-subsample":
            synth = synth.gather(1, torch.rand(synth.shape, generator=g).argsort(1)[:, :n_synth])
        if with_real:
            synth = torch.cat([first if real == "fixed" else normal(loops, n), synth], 1)
        mu, s2 = _fit(synth, ddof)
        mus.append(mu)
        s2s.append(s2)
    return {"mu": torch.stack(mus), "s2": torch.stack(s2s), "real_mean": first.mean(1)}


# ----------------------------------------------------------------------------------------------------
# Command line: the closed forms at a glance (the loop itself runs in retrain.py --model gaussian)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="real points per iteration")
    p.add_argument("--lam", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="synthetic points per real one")
    args = p.parse_args()
    for lam in args.lam:
        print(f"lam {lam:g}: distance to the true parameters x {lam / (1 + lam):.3f} per iteration; stationary "
              f"E[(mu_t - m)^2] for sigma^2 = 1: fixed real set (P1) {paper_stationary_var(args.n, lam, 1.0):.3g}, "
              f"fresh real data (P2) {fresh_stationary_var(args.n, lam, 1.0):.3g}")
