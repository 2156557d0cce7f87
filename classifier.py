"""classifier.py -- a small CNN classifier whose features judge generated small images (8x8 digits, MNIST).

Bertrand et al., "On the Stability of Iterative Retraining of Generative Models on their Own Data" (ICLR
2024) measure every model with FID, precision and recall on Inception-v3 features. Inception does not
see 8 x 8 digits, and raw pixels are a poor judge of images (a sample turned to speckle can stay close
to real digits in pixel distance). For MNIST-like data the usual feature space is that of a small
classifier trained on the dataset itself (LeNet-style, LeCun et al. 1998, "Gradient-Based Learning
Applied to Document Recognition"), and its argmax gives each sample a class, so a lost class shows up
as a gap in the class histogram of the samples. This file trains that classifier, once per dataset:

  - on a stratified held-out split (Config.test_frac of every class held out), whose accuracy is printed
    and returned, so a reader knows how much to trust the features and the classes;
  - deterministically from Config.seed (weights, split, batch order, dropout: the same seed gives
    bit-identical weights on one machine and torch build), on Config.threads CPU threads whatever the
    caller uses, since the order of float sums, and so the weights, depend on the thread count;
  - in seconds on one CPU thread for the 1,797 digits (about 1.5 minutes for MNIST's 60,000 images,
    whose features then take about a minute per 60,000 on one thread: move the network to a GPU with
    net.to("cuda") for those; features, predict and log_probs run where the network is);
  - cached on disk under the sha256 of the images, labels, the Config and this file's source, so a
    cached network is reused only for the same data, settings and code (else it is retrained).

What is here, top to bottom:
  Config                   the defaults
  Net                      conv-ReLU-maxpool stages -> fc-ReLU (the features) -> dropout -> fc (the class logits)
  split, fingerprint       the held-out split and the cache key
  threads, train, get      training (on fixed threads), and training through the cache
  features, predict, log_probs   what the metrics use (eval mode, batch-wise, float64 numpy out)
  main                     the command line

    python classifier.py --data digits                       # train (or load) and print one JSON line
    python classifier.py --data mnist --root data --cache cache/classifier
    python -c "import classifier, data; x, y = data.load_labelled('digits'); print(classifier.get(x, y, 'cache')[1])"

The metrics that use these features (Fréchet distance, precision, recall, density, coverage, the class
histogram and the noise floor) are in fid.py.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    seed: int = 0               # initial weights, held-out split, batch order and dropout masks
    test_frac: float = 0.2      # share of every class held out for the accuracy (80/20, stratified)
    width: int = 32             # channels of the first conv; doubled after every 2x max pool, at most 4 * width
    feature_dim: int = 64       # penultimate layer = the feature space (fewer dims than the 1,797 digits' halves)
    dropout: float = 0.5        # dropout on the features while training (Srivastava et al. 2014); digits, seeds
                                # 0-7, held-out accuracy: 97.8-99.2% (mean 98.4) without, 98.1-99.7% (98.9) with
    steps: int = 400            # AdamW steps: 51,200 images seen, ~36 epochs of the digits' 1,438 training
                                # images (~2.5 s on one CPU thread), ~1 epoch of MNIST's 48,000 (~95 s)
    batch_size: int = 128       # images per step
    lr: float = 3e-3            # AdamW peak learning rate, decayed linearly to 0 over the steps
    weight_decay: float = 1e-4  # decoupled weight decay (Loshchilov & Hutter 2019)
    threads: int = 1            # CPU threads while training, fixed: the weights depend on the thread count (the
                                # order of float sums), and every metric on the weights (digits, AVX2 CPU: 97.77%
                                # held out on 1 thread, 98.05% on 2): a run's own thread choice must not move
                                # its ruler. Other CPUs and torch builds may still round differently.


# ----------------------------------------------------------------------------------------------------
# The network


class Net(nn.Module):
    """(B, C, H, W) in [-1, 1] -> (B, n_classes) logits; `features` is the penultimate layer.

    Stages of conv 3x3 (padding 1) -> ReLU -> 2x2 max pool while the side is at least 4: an 8 x 8 digit
    goes 8 -> 4 -> 2 (two stages), a 32 x 32 image 32 -> 16 -> 8 -> 4 -> 2 (four)."""

    def __init__(self, shape: tuple[int, int, int], n_classes: int, width: int, feature_dim: int, dropout: float):
        super().__init__()
        c, h, w = shape
        self.shape, self.n_classes = tuple(shape), n_classes
        layers, cout = [], width
        while min(h, w) >= 4:
            layers += [nn.Conv2d(c, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w, cout = cout, h // 2, w // 2, min(2 * cout, 4 * width)
        self.body = nn.Sequential(*layers, nn.Flatten())                 # (B, c * h * w)
        self.fc = nn.Linear(c * h * w, feature_dim)                      # -> ReLU: (B, feature_dim) features
        self.drop = nn.Dropout(dropout)                                  # identity in eval mode
        self.head = nn.Linear(feature_dim, n_classes)                    # (B, n_classes) logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


def _as_input(images, shape: tuple | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1] (x / 127.5 - 1, the models' scaling); floats are taken as
    already in [-1, 1]. With `shape`, the images must be (N, *shape)."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or (shape is not None and tuple(x.shape[1:]) != tuple(shape)):
        want = f"(N, {', '.join(map(str, shape))})" if shape is not None else "(N, C, H, W)"
        raise ValueError(f"images must be {want}, got shape {tuple(x.shape)}")
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


# ----------------------------------------------------------------------------------------------------
# The held-out split and the cache key


def split(labels, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: (train indices, test indices), each sorted. From every class, round(test_frac *
    its count) images chosen at random (numpy PCG64 from `seed`, classes in increasing order) are held out."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[:round(test_frac * len(members))])
    test = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test), test


def fingerprint(images, labels, cfg: Config) -> str:
    """sha256 (hex) of the images (shape, bytes), the labels (int64 bytes), the Config (JSON) and the source
    of this file: the cache key, and the name of the feature space in metrics records."""
    x, y = torch.as_tensor(images).cpu().contiguous(), torch.as_tensor(labels, dtype=torch.int64).cpu().contiguous()
    h = hashlib.sha256()
    with open(__file__, "rb") as f:
        h.update(f.read())
    h.update(f"{x.dtype} {tuple(x.shape)}".encode())
    h.update(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Training


@contextlib.contextmanager
def threads(n: int):
    """torch's CPU threads set to n inside the block, and set back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(images, labels, cfg: Config = Config(), progress: bool = False) -> tuple[Net, dict]:
    """Train a Net on the training part of the split; returns it (eval mode, CPU) and its info dict
    (accuracy on the held-out part, sizes, seconds, the hash of data and settings)."""
    t0 = time.perf_counter()
    x = _as_input(images)                                                  # (N, C, H, W) in [-1, 1]
    y = torch.as_tensor(labels, dtype=torch.int64)
    if len(y) != len(x) or y.ndim != 1 or y.min() < 0:
        raise ValueError(f"need one non-negative class label per image: {len(x)} images, labels of shape "
                         f"{tuple(y.shape)}")
    n_classes = int(y.max()) + 1
    train_idx, test_idx = split(y.numpy(), cfg.test_frac, cfg.seed)
    x_train, y_train = x[train_idx], y[train_idx]
    with torch.random.fork_rng(devices=[]), threads(cfg.threads):  # weights, batch order, dropout: all from the
        torch.manual_seed(cfg.seed)                     # seed, and the caller's RNG and threads are left as they were
        net = Net(tuple(x.shape[1:]), n_classes, cfg.width, cfg.feature_dim, cfg.dropout)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        perm, pos = torch.randperm(len(x_train)), 0
        net.train()
        for step in range(cfg.steps):
            if pos + cfg.batch_size > len(perm):                           # a new epoch: a new order
                perm, pos = torch.randperm(len(x_train)), 0
            batch = perm[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            for group in opt.param_groups:
                group["lr"] = cfg.lr * (1 - step / cfg.steps)              # linear decay to 0
            loss = F.cross_entropy(net(x_train[batch]), y_train[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress and (step + 1) % 250 == 0:
                print(f"classifier: step {step + 1}/{cfg.steps}, loss {loss.item():.4f}", file=sys.stderr)
    net.eval()
    accuracy = float((predict(net, x[test_idx]) == y[test_idx].numpy()).mean()) if len(test_idx) else float("nan")
    info = {"accuracy": accuracy, "hash": fingerprint(images, labels, cfg), "n_train": len(train_idx),
            "n_test": len(test_idx), "n_classes": n_classes, "shape": list(x.shape[1:]),
            "feature_dim": cfg.feature_dim, "seconds": round(time.perf_counter() - t0, 2),
            "config": dataclasses.asdict(cfg), "torch": str(torch.__version__)}
    return net, info


def get(images, labels, cache_dir: str | None, cfg: Config = Config(), progress: bool = False) -> tuple[Net, dict]:
    """The classifier of (images, labels): from cache_dir/classifier-<hash>.pt when that file holds the same
    hash of data, settings and code, else trained (and written there; cache_dir None: no cache).

    Prints one line with the held-out accuracy. info: accuracy, hash, n_train, n_test, n_classes, shape,
    feature_dim, seconds (of training), config, torch, path (of the cache file or None), cached (bool)."""
    key = fingerprint(images, labels, cfg)
    path = None if cache_dir is None else os.path.join(cache_dir, f"classifier-{key[:16]}.pt")
    net = None
    if path is not None and os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            info = saved["info"]
            if info["hash"] != key:
                raise ValueError("it was made from other data or settings")
            net = Net(tuple(info["shape"]), info["n_classes"], cfg.width, cfg.feature_dim, cfg.dropout)
            net.load_state_dict(saved["state_dict"])
            net.eval()
        except Exception as e:  # another hash, a broken or foreign file: refused, retrained and overwritten
            print(f"classifier: not using the cache {path} ({str(e).splitlines()[0] if str(e) else e!r}); retraining",
                  file=sys.stderr)
            net = None
    cached = net is not None
    if not cached:
        net, info = train(images, labels, cfg, progress)
        if path is not None:
            os.makedirs(cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".pt.tmp", dir=cache_dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save({"state_dict": net.state_dict(), "info": info}, f)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
    info = {**info, "path": path, "cached": cached}
    how = f"loaded from {path}" if cached else (f"trained in {info['seconds']} s" + (f", cached in {path}" if path else ""))
    print(f"classifier: held-out accuracy {100 * info['accuracy']:.2f}% on {info['n_test']} of "
          f"{info['n_train'] + info['n_test']} images ({how})")
    return net, info


# ----------------------------------------------------------------------------------------------------
# What the metrics use


@torch.inference_mode()
def _batched(fn, net: Net, images, batch_size: int) -> np.ndarray:
    x = _as_input(images, net.shape)
    device = next(net.parameters()).device
    net.eval()
    return np.concatenate([fn(x[i:i + batch_size].to(device)).double().cpu().numpy()
                           for i in range(0, len(x), batch_size)])


def features(net: Net, images, batch_size: int = 1000) -> np.ndarray:
    """Penultimate-layer features (after the ReLU), float64 (N, feature_dim), of uint8 (N, C, H, W) images
    or floats in [-1, 1]."""
    return _batched(net.features, net, images, batch_size)


def log_probs(net: Net, images, batch_size: int = 1000) -> np.ndarray:
    """log p(class | image), float64 (N, n_classes) (log-softmax of the logits)."""
    return _batched(lambda x: F.log_softmax(net(x), dim=1), net, images, batch_size)


def predict(net: Net, images, batch_size: int = 1000) -> np.ndarray:
    """The most probable class of every image, int64 (N,)."""
    return _batched(net, net, images, batch_size).argmax(axis=1).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train (or load from the cache) the feature classifier of a labelled set.")
    p.add_argument("--data", default="digits", help="digits | mnist | fashion-mnist | cifar10 | .npz with 'labels'")
    p.add_argument("--root", default="data", help="download folder of named datasets")
    p.add_argument("--n", type=int, default=None, help="use the first n images")
    p.add_argument("--cache", default="cache", help="folder of the cached classifiers ('' for none)")
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--steps", type=int, default=Config.steps)
    p.add_argument("--progress", action="store_true", help="print the loss every 250 steps")
    args = p.parse_args(argv)
    from data import DataError, load_labelled

    try:
        images, labels = load_labelled(args.data, root=args.root, n=args.n)
        if labels is None:
            raise DataError(f"data '{args.data}' has no labels")
        _, info = get(images, labels, args.cache or None, Config(seed=args.seed, steps=args.steps), args.progress)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        print(f"classifier.py: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: info[k] for k in ("accuracy", "n_train", "n_test", "n_classes", "seconds", "cached", "hash",
                                           "path")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
