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
"""

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


PRESETS = {"paper": {}, "small": {}}  # nothing to size: one preset is as cheap as the other
OFFICIAL_URLS = {}                     # no released checkpoint


def make_config(preset: str, **overrides) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' for gaussian; choose from {sorted(PRESETS)}")
    fields = set(Config.__dataclass_fields__)
    for k in overrides:
        if k not in fields:
            raise ValueError(f"gaussian.Config has no field '{k}'; fields: {', '.join(sorted(fields))}")
    return Config(**{**PRESETS[preset], **overrides})


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
    """N(mu, Sigma) with full covariance, fitted by maximum likelihood."""

    def __init__(self, cfg: Config, device="cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        d = cfg.dim if cfg.img_channels is None else cfg.img_channels * cfg.img_resolution ** 2
        self.mu = torch.zeros(d, dtype=torch.float64)
        self.sigma = torch.eye(d, dtype=torch.float64)
        self.fits = 0   # how many times fit() ran; the first fit gets the init_* perturbation
        self.nfe = 0    # no network

    def fit(self, x: torch.Tensor) -> None:
        """Maximum likelihood: mu = mean, Sigma = (1/N) sum (x - mu)(x - mu)^T, on the flattened data."""
        x = x.reshape(len(x), -1).to(torch.float64).cpu()  # (N, d)
        self.mu = x.mean(0)
        xc = x - self.mu
        self.sigma = xc.T @ xc / len(x)
        if self.fits == 0:
            self.mu = self.mu + self.cfg.init_mean_shift
            self.sigma = self.sigma * self.cfg.init_cov_scale
        self.fits += 1

    def generate(self, seeds: torch.Tensor) -> torch.Tensor:
        """mu + L z with Sigma = L L^T and z ~ N(0, I) from one generator per seed."""
        d = len(self.mu)
        # eigen-factor rather than Cholesky, so a collapsed (singular) covariance still samples
        evals, evecs = torch.linalg.eigh(self.sigma)
        l = evecs * evals.clamp(min=0).sqrt()
        z = torch.stack([torch.randn(d, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                         for s in seeds.tolist()]) if len(seeds) else torch.zeros(0, d, dtype=torch.float64)
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

