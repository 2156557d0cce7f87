"""regimes.py -- what each retraining iteration trains on: the self-consuming regimes, the paper's and beyond.

Bertrand et al. (ICLR 2024) retrain on the same n real images plus round(lam n) samples of the previous
model, which replace the earlier ones. The flags of retrain.py vary each part of that loop, as later papers do
(README, "The loop"; gaussian.py gives each regime in closed form):

  --pool   replace (the paper): generation t-1's samples replace the earlier ones; accumulate: every
           generation's samples are kept (Gerstgrasser et al. 2024), the training set grows by round(lam n) per
           iteration (and so does ckpt.pt, which holds them for --resume); accumulate-subsample: of all kept
           samples, round(lam n) drawn without replacement each iteration, replace's size (Kazdan et al. 2024)
  --real   fixed (the paper): the same n real points every iteration; fresh: n new ones each iteration (images:
           chunk t of the data set, chunk 0 being iteration 0's real set; --data gaussian: new draws); none: no
           real data, round(lam n) samples alone (Alemohammad et al. 2024's three loops). lam = inf means no
           real data whatever --real says
  --start  warm (the paper): fine-tune the previous model; scratch: iteration 0's initial weights again
           (retrain.py; --kimg then defaults to the preset's pretraining budget)
  --budget fixed (the paper): kimg thousand images seen per iteration whatever the training set's size; epochs:
           kimg scaled by the training set's size over that of the paper's loop (n + round(lam n)), so that each
           image is seen as often in every iteration: accumulate then trains on its whole growing pool
  --temperature  tau scales the samplers' initial noise (the Gaussian: samples of N(mu, tau^2 Sigma)); model 0
           is sampled again at tau and evaluated again: the shared iteration 0 is sampled at 1
  --curate K     each kept sample is one of K candidates, candidate i kept with probability softmax(r)_i over
           the K, for the reward r of --reward (Ferbach et al. 2024)

The loop calls training_set() once per iteration: the pool of kept samples in, the training set out. The
defaults take none of the branches: they draw nothing that the paper's loop does not, and give its results
bit for bit.
"""

import dataclasses
import math

import torch
import torch.distributed as dist

from jobs import UserError

FLAGS = ("pool", "real", "start", "budget", "temperature", "curate", "reward", "beta", "gamma", "reward_class")
DEFAULTS = {"pool": "replace", "real": "fixed", "start": "warm", "budget": "fixed", "temperature": 1.0, "curate": 1,
            "reward": None}
FRESH_REAL, SUBSAMPLE, CURATE = 1, 2, 3  # which regime seed (regime_seed)


def regime_seed(train_seed: int, what: int) -> int:
    """Seeds the regime's own draws in an iteration (fresh Gaussian data, subsample, curation): just below the
    iteration's training seed, above every image seed of the iteration (retrain.image_seeds)."""
    return train_seed - what


# ----------------------------------------------------------------------------------------------------
# The regime: its flags, checked once


@dataclasses.dataclass
class Regime:
    pool: str = "replace"
    real: str = "fixed"
    start: str = "warm"
    budget: str = "fixed"                 # fixed kimg per iteration, or epochs: kimg scaled with the training set
    temperature: float = 1.0
    curate: int = 1                       # K candidates per kept sample; 1 = no curation
    reward: str | None = None             # linear | quadratic (vectors) | class | confidence (images)
    beta: list = (1.0,)                   # linear reward: one coefficient, or one per coordinate
    gamma: float = 1.0                    # quadratic reward: the pull toward 0
    reward_class: int = 0                 # class reward: the class
    fresh: torch.Tensor | None = None     # --real fresh on images: the whole data set, cut into chunks of n (check)
    labelled: tuple | None = None         # image rewards: (images, labels) to train the classifier on (check)

    @property
    def reward_spec(self) -> dict | None:
        """The reward as config.json records it: {"kind": linear, "beta": [..]} | {"kind": quadratic, "gamma": g} |
        {"kind": class, "class": c} | {"kind": confidence} | None."""
        extra = {"linear": {"beta": list(self.beta)}, "quadratic": {"gamma": self.gamma},
                 "class": {"class": self.reward_class}}.get(self.reward, {})
        return None if self.reward is None else {"kind": self.reward, **extra}

    def config(self) -> dict:
        return {**{key: getattr(self, key) for key in DEFAULTS}, "reward": self.reward_spec}

    def check(self, data: str, real: torch.Tensor, lams: list[float], iters: int, whole: tuple | None) -> "Regime":
        """The flags against each other and against the data, before the run starts; keeps what the regime needs
        of the data set (images, labels) that real was taken from: fresh real data, the reward's classifier."""
        is_image, n = real.dtype == torch.uint8, len(real)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"--temperature {self.temperature}: give a positive number (1 = no sampling bias)")
        if self.curate < 1:
            raise UserError(f"--curate {self.curate}: give the number of candidates per kept sample, 1 or more (1 = no curation)")
        if self.reward in ("linear", "quadratic"):
            if is_image:
                raise UserError(f"--reward {self.reward} is for vector data (--data gaussian); images take --reward class or confidence")
            if len(self.beta) not in (1, real.shape[1]):
                raise UserError(f"--beta has {len(self.beta)} values; give one, or one per coordinate ({real.shape[1]})")
        elif self.reward is not None:
            if not is_image:
                raise UserError(f"--reward {self.reward} scores images with the digits classifier; vectors take --reward linear or quadratic")
            if whole[1] is None:
                raise UserError(f"--reward {self.reward} needs class labels to train the classifier, and '{data}' has none "
                                "(digits, mnist, fashion-mnist, cifar10 or an .npz with 'labels' have them)")
            n_classes = int(whole[1].max()) + 1
            if self.reward == "class" and not 0 <= self.reward_class < n_classes:
                raise UserError(f"--reward-class {self.reward_class}: '{data}' has classes 0..{n_classes - 1}")
            self.labelled = whole
        if self.curate > 1 and self.reward is None:
            raise UserError(f"--curate {self.curate} keeps samples by a reward: add --reward "
                            + ("class or confidence" if is_image else "linear or quadratic"))
        with_real = [lam for lam in lams if not math.isinf(lam)]
        if self.real == "none" and 0 in with_real:
            raise UserError("--real none with --lam 0 leaves nothing to train on; give lam > 0 (synthetic samples per real image)")
        if self.real == "fresh" and with_real and is_image:
            self.fresh = whole[0]
            if (iters + 1) * n > len(self.fresh):
                raise UserError(f"--real fresh needs {iters + 1} disjoint sets of {n} images (iterations 0..{iters}), "
                                f"{(iters + 1) * n} in all, and '{data}' has {len(self.fresh)}; lower --n-real or --iters")
        return self


# ----------------------------------------------------------------------------------------------------
# Rewards: what --curate keeps, recorded each iteration


def image_reward(reward: dict, labelled: tuple[torch.Tensor, torch.Tensor], device, cache_dir: str | None):
    """The reward of uint8 images (N, C, H, W) -> float64 (N,): the log-probability of class reward["class"], or of
    the most likely class ("confidence"), under classifier.py's net trained on the whole labelled data set
    (seconds on the digits; the same weights from its seed on every rank and at --resume), once: later runs
    load it from cache_dir."""
    import classifier

    with torch.random.fork_rng(devices=[]):  # whatever global randomness its training draws: the same net every time
        torch.manual_seed(0)
        net = classifier.get(*labelled, cache_dir)[0].to(device)

    def reward_of(images: torch.Tensor) -> torch.Tensor:
        log_p = torch.from_numpy(classifier.log_probs(net, images))  # (N, classes) float64
        return log_p[:, reward["class"]] if reward["kind"] == "class" else log_p.max(1).values

    return reward_of


def reward_function(regime: Regime, is_image: bool, device, cache_dir: str | None = None):
    """The regime's reward as a function of samples (uint8 images or float64 vectors) -> float64 (N,), or None."""
    spec = regime.reward_spec
    if spec is None:
        return None
    if is_image:
        return image_reward(spec, regime.labelled, device, cache_dir)
    import gaussian

    return gaussian.Reward(spec["kind"], beta=tuple(spec.get("beta", (1.0,))), gamma=spec.get("gamma", 1.0))


# ----------------------------------------------------------------------------------------------------
# One iteration's training set


def real_part(regime: Regime, lam: float, real: torch.Tensor, train_seed: int, it: int) -> torch.Tensor | None:
    """The real data of iteration it: the run's real set (fixed), the it-th set of n (fresh: chunk it of the data
    set, or n new draws of --data gaussian), or None."""
    if math.isinf(lam) or regime.real == "none":
        return None
    if regime.real == "fixed" or it == 0:
        return real
    n = len(real)
    if regime.fresh is not None:
        return regime.fresh[it * n:(it + 1) * n].to(real.device)
    import gaussian

    return gaussian.make_data(real.shape[1], n, seed=regime_seed(train_seed, FRESH_REAL))


def curate(samples: torch.Tensor, rewards: torch.Tensor, n_keep: int, k: int, train_seed: int) -> torch.Tensor:
    """n_keep samples, sample i one of the k candidates samples[i k:(i + 1) k], candidate j kept with probability
    softmax(rewards)_j over the k (drawn on the CPU, the same on every rank)."""
    gen = torch.Generator().manual_seed(regime_seed(train_seed, CURATE))
    pick = torch.multinomial(torch.softmax(rewards[:n_keep * k].view(n_keep, k), 1), 1, generator=gen)[:, 0]
    if dist.is_initialized():  # rank 0's choice: rewards computed on different machines may differ in the last bits
        shared = [pick]
        dist.broadcast_object_list(shared, src=0)
        pick = shared[0]
    return samples[:n_keep * k].view(n_keep, k, *samples.shape[1:])[torch.arange(n_keep), pick]


def synthetic_part(regime: Regime, gens: list[torch.Tensor], n_synth: int, train_seed: int, it: int):
    """The synthetic data of iteration it from the kept samples of generations 0..it-1 (gens; replace holds the last
    one only) and its make-up {generation: count}: all of them, or n_synth drawn without replacement
    (accumulate-subsample)."""
    first = it - len(gens)  # the generation of gens[0]
    origin = torch.cat([torch.full((len(g),), first + k) for k, g in enumerate(gens)])
    synth = torch.cat(gens) if len(gens) > 1 else gens[0]
    if regime.pool == "accumulate-subsample" and len(gens) > 1:
        keep = torch.randperm(len(synth), generator=torch.Generator().manual_seed(regime_seed(train_seed, SUBSAMPLE)))
        keep = keep[:n_synth].sort().values
        synth, origin = synth[keep], origin[keep]
    gen_ids, counts = origin.unique(return_counts=True)
    return synth, {str(g): c for g, c in zip(gen_ids.tolist(), counts.tolist())}


def paper_size(regime: Regime, lam: float, n: int, n_synth: int) -> int:
    """The size of the paper's D_t for these lambda and n: n real images (none at lam = inf or --real none) plus
    n_synth samples; --budget epochs scales kimg by a training set's size over this one."""
    return (0 if math.isinf(lam) or regime.real == "none" else n) + n_synth


def training_set(regime: Regime, lam: float, real: torch.Tensor, samples: torch.Tensor, gens: list, n_synth: int,
                 reward, train_seed: int, it: int) -> tuple[torch.Tensor, list, dict]:
    """Iteration it's training set: its real part, and n_synth kept samples of generation it-1 (the first n_synth of
    `samples`, or n_synth curated from K n_synth candidates) with those of earlier generations when accumulating.
    Returns (training set, the pool of kept generations after this one, the record's fields of its make-up)."""
    kept, kept_reward = samples[:n_synth], {}
    if regime.curate > 1 and n_synth:
        kept = curate(samples, reward(samples), n_synth, regime.curate, train_seed)
        kept_reward = {"reward_kept": reward(kept).mean().item()}
    gens = [*gens, kept] if regime.pool != "replace" else [kept]
    synth, by_gen = synthetic_part(regime, gens, n_synth, train_seed, it)
    synth = synth.to(real.device)
    real_t = real_part(regime, lam, real, train_seed, it)
    made = {"n_real": 0 if real_t is None else len(real_t), "n_synth": len(synth), "n_synth_by_gen": by_gen,
            **({"n_pool": sum(map(len, gens))} if regime.pool == "accumulate-subsample" else {}), **kept_reward}
    return (synth if real_t is None else torch.cat([real_t, synth])), gens, made
