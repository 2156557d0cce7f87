"""metrics.py -- how good is a model's set of samples: the evaluation that retrain.py runs every iteration.

Bertrand et al. (ICLR 2024) measure every retraining iteration by FID, precision and recall of 50k samples
against the 50k CIFAR-10 training images. Evaluator does the same in a feature space fitted to the data
(below), with fid.py's formulas: the Frechet distance between Gaussian fits of the two feature sets (FID when
the features are Inception's, FD otherwise), precision, recall, density and coverage of k-nearest-neighbour
balls (Kynkaanniemi et al. 2019; Naeem et al. 2020), and in a classifier's space the samples' class histogram;
against a held-out test split first, and against the training images as a second view, with a measure of
copying. Its noise floor is what two independent real sets of the same sizes score: sampling noise alone.

    import data
    test, train = data.load_labelled("digits", split="test"), data.load_labelled("digits")
    evaluate = Evaluator(test, train, len(train[0]), "auto", None, n_eval=1198, device=torch.device("cpu"),
                         progress=False, cache="runs/x", classifier_cache="cache", seed=0)
    evaluate(samples)   # {"fd": .., "precision": .., ..., "train_fd": .., "nn_train_share": .., "features": "classifier"}
"""

import json
import os
import traceback

import numpy as np
import torch
import torch.distributed as dist

import fid
from figures import PANELS, plot_metrics
from jobs import UserError, rank_world
from settings import lam_folder, save_atomic


# ----------------------------------------------------------------------------------------------------
# The metrics of one iteration's samples


class Evaluator:
    """The metrics of samples against a real reference set, in one feature space (recorded as `features`):

        inception   Inception-v3 pool features (FID): images of 32 px or more, when the weights are available
        classifier  the penultimate features of a small classifier trained on the training split's labels
                    (classifier.py): the default for labelled images under 32 px or in greyscale (the digits,
                    MNIST), where Inception's 299-px colour view means little and raw pixels judge poorly
        pixel       raw pixels (--metrics pixel, or small images without labels)
        raw         the vectors of --data gaussian

    The reference is the dataset's test split where it has one (held out from every model and from the
    classifier), else the training set. In each space: the Frechet distance ("fid" for Inception, else "fd")
    against the whole reference; precision, recall, density and coverage (k = 3) against its first n_eval
    points. With a test split, a second view as the paper measures (against the training set): train_fd,
    train_precision, train_recall against the model's real training images (their first n_eval), and a
    memorization measure in pixel space, from each sample's nearest real image among m training and m
    reference images (m = the smaller set): nn_train_share, the share of samples whose nearest is a
    training image (0.5 for a model that does not copy, 1 for one that does), and nn_ratio, the mean distance
    to the nearest training image over that to the nearest reference one (1: no copying). In classifier
    space also the samples' classes (the classifier's argmax): the total variation distance of their histogram
    to the reference labels' (class_tv), the number of classes produced (classes) and the histogram
    (class_hist); and the pixel-space metrics (pixel_fd, pixel_precision, ...). `floor` holds what two
    independent real sets of these sizes score (fid.noise_floor: [mean, sd] per metric). Under torchrun every
    rank extracts the Inception features of its share of the samples; rank 0 computes the metrics."""

    def __init__(self, reference: tuple, train: tuple | None, n_train: int, choice: str, inception: str | None,
                 n_eval: int, device, progress: bool, cache: str, classifier_cache: str, seed: int,
                 inception_every: int = 0, second_view: bool = True):
        """reference, train: (uint8 images or float vectors, labels or None); train the training split (None when
        the data have no test split: then the reference is the training set), whose first n_train the model
        trains on. cache: a folder for the Inception features of the reference and training images (inception_cache).
        inception_every K > 0 (in another space than Inception's): also Inception's FID, precision and recall
        against the reference at iteration 0 and every K-th (fid, inception_precision, inception_recall).
        second_view False: the training images only join the noise floor's real pool (that nested Inception view)."""
        self.device, self.progress, self.net, self.clf, self.n_eval = device, progress, None, None, n_eval
        self.main = rank_world()[0] == 0
        real, labels = reference
        is_image = real.dtype == torch.uint8
        small = is_image and (real.shape[-1] < 32 or real.shape[1] == 1)  # digits, MNIST: not Inception's kind of image
        if choice == "classifier" or (choice == "auto" and small and labels is not None):
            if labels is None or not is_image:
                raise UserError("--metrics classifier needs labelled images (digits, mnist, fashion-mnist, cifar10, "
                                "or an .npz with labels)")
            self.kind = "classifier"
        elif choice == "inception" or (choice == "auto" and is_image and real.shape[-1] >= 32):
            try:
                self.net = fid.load_inception(inception, device=device)
            except fid.InceptionUnavailable as e:
                if choice == "inception":
                    raise UserError(str(e)) from None
                if self.main:
                    print(f"retrain.py: Inception weights unavailable, using pixel-space metrics ({e})")
            self.kind = "inception" if self.net is not None else "pixel"
        else:
            self.kind = "pixel" if is_image else "raw"
        self.fd_key = "fid" if self.kind == "inception" else "fd"
        self.every, self.inception = inception_every, None
        if inception_every and self.kind != "inception":  # its floor's real halves also from the training images
            self.inception = Evaluator(reference, train, n_train, "inception", inception, n_eval, device, progress,
                                       cache, classifier_cache, seed, second_view=False)
        self.floor = {}  # rank 0's, below
        if not self.main:
            return
        trained_on = None if train is None else train[0][:min(n_train, n_eval)]  # the second view's real images
        if self.kind == "classifier":
            import classifier

            self.clf, self.clf_info = classifier.get(*(train or reference), classifier_cache, progress=progress)
            self.labels, self.n_classes = labels.numpy(), int((train or reference)[1].max()) + 1
            self.pixel_real = fid.pixel_features(real)
            self.pixel_stats = fid.feature_stats(self.pixel_real)
        self.real_feats = self.real_features(real, "reference", cache)
        self.real_stats = fid.feature_stats(self.real_feats)
        if trained_on is not None:
            self.train_feats = self.real_features(trained_on, "train", cache)
        if trained_on is not None and second_view:  # train_stats present: the second view is measured (__call__)
            self.train_stats = fid.feature_stats(self.train_feats)
            self.train_pixels = fid.pixel_features(trained_on)
            m = min(len(trained_on), len(real))  # as many of each: a sample that copies nothing is as near to either
            self.nn_sets = self.train_pixels[:m], fid.pixel_features(real[:m])
        self.floor = self.noise_floor(seed)
        if self.inception is not None:
            self.floor.update(inception_keys(self.inception.floor))

    def real_features(self, x: torch.Tensor, name: str, cache: str) -> np.ndarray:
        """Features of real images (or vectors); Inception's through fid.reference's cache file in `cache`."""
        if self.net is None:
            return self.features(x)
        try:
            return fid.reference(x, name=f"{name}-{len(x)}", path=inception_cache(cache, name, x, self.net),
                                 net=self.net, device=self.device, progress=self.progress)["features"].astype(np.float64)
        except fid.ReferenceMismatch as e:
            raise UserError(str(e)) from None

    def features(self, x: torch.Tensor) -> np.ndarray | None:
        """Features of x on rank 0 (None on the others). Inception: each rank extracts its share, and rank 0
        gathers them as one tensor (float32, which the features are, padded to the largest share)."""
        if self.kind == "classifier":
            import classifier

            return classifier.features(self.clf, x)
        if self.net is None:
            return fid.pixel_features(x) if x.dtype == torch.uint8 else x.reshape(len(x), -1).numpy().astype(np.float64)
        rank, world = rank_world()
        if world == 1:
            return fid.inception_features(x, self.net, device=self.device, progress=self.progress)
        shares = torch.tensor_split(x, world)
        try:
            f, error = fid.inception_features(shares[rank], self.net, device=self.device, progress=self.progress), None
        except Exception as e:  # (a CUDA out-of-memory, say) every rank learns of it, instead of waiting in gather
            traceback.print_exc()
            f, error = None, f"rank {rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        errors = [None] * world
        dist.all_gather_object(errors, error)
        if any(errors):
            raise UserError(next(e for e in errors if e))
        size = len(shares[0])  # tensor_split: the first share is the largest
        mine = torch.zeros(size, f.shape[1], dtype=torch.float32, device=self.device)
        mine[:len(f)] = torch.from_numpy(f).to(self.device, torch.float32)
        parts = [torch.empty_like(mine) for _ in range(world)] if rank == 0 else None
        dist.gather(mine, parts, dst=0)
        if rank != 0:
            return None
        return torch.cat([p[:len(s)] for p, s in zip(parts, shares)]).cpu().double().numpy()

    def space_metrics(self, fake_feats: np.ndarray, real_feats: np.ndarray, real_stats: tuple) -> dict:
        """Frechet distance of all samples against real_stats; precision, recall, density, coverage of as many samples
        as real points (at most n_eval). The matrix square root from symmetric eigenvalues: on a GPU with torch (a
        second for Inception's 2048 dimensions, where scipy's sqrtm takes ~40 CPU-s), on a CPU with LAPACK."""
        m = min(len(fake_feats), len(real_feats), self.n_eval)
        fd = fid.frechet_distance(*fid.feature_stats(fake_feats), *real_stats, method="eigh",
                                  device=self.device if self.device.type == "cuda" else None)
        return {"fd": fd, **fid.prdc(real_feats[:m], fake_feats[:m], k=3, device=self.device)}

    def __call__(self, fake: torch.Tensor, it: int = 0) -> dict:
        """The metrics of `fake`, the samples of iteration `it`, on rank 0 ({} on the other ranks, which only help
        with the Inception features)."""
        extra = inception_keys(self.inception(fake)) if self.inception is not None and it % self.every == 0 else {}
        f = self.features(fake) if self.main or self.net is not None else None
        if not self.main:
            return {}
        r = self.space_metrics(f, self.real_feats, self.real_stats)
        r = {self.fd_key: r.pop("fd"), **r, "features": self.kind, **extra}
        if hasattr(self, "train_stats"):
            train = self.space_metrics(f, self.train_feats, self.train_stats)
            r.update({f"train_{k}": train[k] for k in ("fd", "precision", "recall")})
            pixels = fid.pixel_features(fake)
            d_train, d_ref = (fid.nearest_distances(pixels, points, self.device) for points in self.nn_sets)
            r.update(nn_train_share=float(np.mean((d_train < d_ref) + 0.5 * (d_train == d_ref))),
                     nn_ratio=float(d_train.mean() / d_ref.mean()))
        if self.kind == "classifier":
            import classifier

            r.update(fid.class_metrics(classifier.predict(self.clf, fake), self.labels, self.n_classes))
            pixel = self.space_metrics(fid.pixel_features(fake), self.pixel_real, self.pixel_stats)
            r.update({f"pixel_{k}": v for k, v in pixel.items()})
        return r

    def noise_floor(self, seed: int) -> dict:
        """What two independent real sets of the evaluated sizes score (n_eval samples against the reference; the
        training view against its images), [mean, sd] per metric in the keys the samples' metrics use. The real
        halves are drawn from the reference and the training view's images together."""
        pool = np.concatenate([self.real_feats, getattr(self, "train_feats", self.real_feats[:0])])
        labelled = self.kind == "classifier"
        r = fid.noise_floor(pool, self.n_eval, len(self.real_feats), seed=seed, device=self.device,
                            labels=self.labels if labelled else None, n_classes=self.n_classes if labelled else None,
                            fd_device=self.device if self.device.type == "cuda" else None)
        r = {self.fd_key: r.pop("fd"), **r}
        if hasattr(self, "train_feats"):  # FD's level moves with the reference's size alone (fid.noise_floor)
            scale = (1 / self.n_eval + 1 / len(self.train_feats)) / (1 / self.n_eval + 1 / len(self.real_feats))
            r.update(train_fd=[v * scale for v in r[self.fd_key]], train_precision=r["precision"], train_recall=r["recall"],
                     nn_train_share=[0.5, 0.5 / self.n_eval ** 0.5])  # each sample nearer either set at even odds
        if labelled:
            pixels = np.concatenate([self.pixel_real, getattr(self, "train_pixels", self.pixel_real[:0])])
            pixel = fid.noise_floor(pixels, self.n_eval, len(self.pixel_real), seed=seed, device=self.device)
            r.update({f"pixel_{k}": pixel[k] for k in ("fd", "precision", "recall", "density", "coverage")})
        return r


def inception_cache(cache: str, name: str, images: torch.Tensor, net) -> str:
    """The file of the Inception features of real images in the cache folder, named by the images' and the network's
    fingerprints: every run and every lambda's process that measures against the same images finds it."""
    images_id, net_id = fid.images_sha256(images)[:12], fid.weights_fingerprint(net)[:12]
    return os.path.join(cache, f"inception-{name}-{images_id}-{net_id}.npz")


def inception_keys(r: dict) -> dict:
    """The Inception metrics (or their floor) beside another space's: fid, inception_precision, inception_recall."""
    return {"fid": r["fid"], "inception_precision": r["precision"], "inception_recall": r["recall"]}


# ----------------------------------------------------------------------------------------------------
# Over seeds: independent replicates of one run (retrain.py --seeds)


def summarize_seeds(base: str, seeds: list[int]) -> dict:
    """Per lambda and iteration, the mean and standard deviation over seeds of every metric, into base/seeds.json
    and base/metrics.png, and the last iteration's as lines of text."""
    configs = [json.load(open(os.path.join(base, f"seed_{seed}", "config.json"))) for seed in seeds]
    c, lams = configs[0], configs[0]["lams"]
    logs = {lam: [os.path.join(lam_folder(os.path.join(base, f"seed_{seed}"), lams, float(lam)), "metrics.jsonl")
                  for seed in seeds] for lam in lams}
    histories = {lam: [[json.loads(line) for line in open(log)] for log in logs[lam]] for lam in lams}
    summary = {"seeds": seeds, "features": c.get("features"), "noise_floor": c.get("noise_floor"), "lams": {}}
    for lam, hs in histories.items():
        rows = []
        for it in sorted({r["iter"] for h in hs for r in h}):
            recs = [r for h in hs for r in h if r["iter"] == it]
            rows.append({"iter": it, "seeds": len(recs), **{k: [float(np.mean([r[k] for r in recs])),
                                                                float(np.std([r[k] for r in recs], ddof=1)) if len(recs) > 1 else 0.0]
                                                            for k in PANELS if all(k in r for r in recs)}})
        summary["lams"][lam] = rows
        last = rows[-1]
        print(f"seeds {', '.join(map(str, seeds))}, lam {lam}, iteration {last['iter']} ({last['seeds']} seeds): "
              + ", ".join(f"{k} {v[0]:.4g} +- {v[1]:.2g}" for k, v in last.items() if k not in ("iter", "seeds")))
    save_atomic(json.dumps(summary, indent=1) + "\n", os.path.join(base, "seeds.json"))
    plot_metrics(histories, os.path.join(base, "metrics.png"), floor=c.get("noise_floor"),
                 title=f"{c['model']} ({c['preset']}) on {c['data']}: mean and one standard deviation over "
                       f"{len(seeds)} seeds; {c.get('features', '')} features")
    return summary
