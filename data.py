"""data.py -- every image dataset of the project as one uint8 tensor (N, C, H, W).

retrain.py trains on these tensors and fid.py computes reference statistics from them, so both read
images through the one function here, `load_images(spec)`; `load_labelled(spec)` gives the same
images with their class labels (classifier.py trains its feature network on them). A spec is one of

    cifar10            CIFAR-10 (50,000 + 10,000 x 3 x 32 x 32), downloaded by torchvision on first use
    digits             scikit-learn's bundled 8x8 digits (1,198 + 599 x 1 x 8 x 8), works offline
    mnist              MNIST (LeCun et al. 1998; 60,000 + 10,000 x 1 x 32 x 32), downloaded by torchvision
    fashion-mnist      Fashion-MNIST (Xiao et al. 2017; 60,000 + 10,000 x 1 x 32 x 32), the same way
    DIR                a folder of image files (png, jpg, ...), read in sorted order
    FILE.zip           a zip of image files, read in sorted order (FFHQ-64 is usually given this way)
    FILE.npy/.npz      a uint8 array, NHWC or NCHW (in a .npz: the array named 'images', 'x' or the only one)

Images in a folder or zip must all have one size; greyscale files give 1 channel when every file is
greyscale, otherwise everything is read as RGB. The named datasets have a training and a test split
(split="train" | "test"): the models train on the first, and the samples are measured against the second,
which no model and no feature classifier ever sees. The digits have no official split: every third image
(index i with i % 3 == 2, 599 of 1,797; the file cycles through the ten digits, so every class is cut alike)
is their test split. MNIST and Fashion-MNIST (28 x 28) are padded with 2 black
pixels on every side to 32 x 32, the side of the models' 32-px configurations (and of LeNet-5's input,
LeCun et al. 1998). Labels: the class index of every named dataset (CIFAR-10's 10 classes, the digit
0..9, Fashion-MNIST's 10 classes of clothes, shoes and bags), and of a .npz that holds an array
'labels' (or 'y') beside its images; none for folders, zips and .npy files. Every problem raises
DataError with a one-line message.

    python data.py digits            # what a spec loads: shape, and images per label
"""

import importlib.util
import io
import os
import zipfile

import numpy as np
import torch

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
NAMED = ("cifar10", "digits", "mnist", "fashion-mnist")  # the specs that name a dataset rather than a path
SPLITS = ("train", "test")
MNIST_PAD = 2  # black pixels added on each side of the 28 x 28 MNIST-like images: 28 + 2 * 2 = 32


class DataError(ValueError):
    """A dataset that cannot be read; the message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------------
# The named datasets


def _cifar10(root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision  # only needed here, so the other datasets work without it

    try:
        ds = torchvision.datasets.CIFAR10(root=root, train=train, download=True)
    except Exception as e:  # no internet, broken archive, ...
        raise DataError(f"could not download or read CIFAR-10 into '{root}' ({e}); "
                        "download it by hand or pass --data with a folder/zip/npz of images") from None
    return ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets)  # (N, 32, 32, 3) -> (N, 3, 32, 32); (N,)


def _digits(train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits of one split (the test split: every third image) from the file scikit-learn ships them in (datasets/data/digits.csv.gz: per row 64 grey
    levels 0..16, then the label), read without importing scikit-learn, which takes ~1.8 s; through its
    load_digits where that file is not found."""
    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.isfile(path):
        rows = np.loadtxt(path, delimiter=",", dtype=np.int64)  # (1797, 65)
        x, y = rows[:, :64].reshape(-1, 8, 8), rows[:, 64]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.images, bunch.target  # (1797, 8, 8), integer grey levels 0..16; (1797,)
    keep = (np.arange(len(x)) % 3 == 2) != train
    return np.round(x[keep] * (255.0 / 16.0)).astype(np.uint8)[:, None], y[keep]  # (N, 1, 8, 8), 17 levels in 0..255


def _mnist_like(spec: str, root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """MNIST or Fashion-MNIST, one split, through torchvision (its idx files under root/MNIST/raw or
    root/FashionMNIST/raw, downloaded when missing), padded to (N, 1, 32, 32)."""
    import torchvision

    cls = torchvision.datasets.MNIST if spec == "mnist" else torchvision.datasets.FashionMNIST
    try:
        ds = cls(root=root, train=train, download=True)
    except Exception as e:  # no internet, broken file, ...
        raise DataError(f"could not download or read {spec} into '{root}' ({str(e).splitlines()[0] if str(e) else e!r}); "
                        f"put its four idx files into {os.path.join(root, cls.__name__, 'raw')} by hand "
                        "or pass --data with a folder/zip/npz of images") from None
    x = np.asarray(ds.data, dtype=np.uint8)                                   # (N, 28, 28)
    x = np.pad(x, ((0, 0), (MNIST_PAD, MNIST_PAD), (MNIST_PAD, MNIST_PAD)))   # (N, 32, 32), zeros = black
    return x[:, None], np.asarray(ds.targets)                                 # (N, 1, 32, 32); (N,)


# ----------------------------------------------------------------------------------------------------
# Files: folders, zips and arrays


def _decode(images: list, names: list) -> np.ndarray:
    """Decode a list of file-like objects with PIL into one (N, C, H, W) uint8 array."""
    from PIL import Image

    pics = []
    for f, name in zip(images, names):
        try:
            pics.append(Image.open(f))
            pics[-1].load()
        except Exception as e:
            raise DataError(f"cannot read image '{name}' ({e})") from None
    grey = all(p.mode in ("L", "1", "I;16", "I") for p in pics)
    arrays = [np.asarray(p.convert("L" if grey else "RGB")) for p in pics]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        first, other = sorted(sizes)[:2]
        raise DataError(f"images have mixed sizes ({first[0]}x{first[1]} and {other[0]}x{other[1]}, ...); "
                        "resize them all to one size first")
    x = np.stack(arrays)
    return x[:, None] if grey else x.transpose(0, 3, 1, 2)


def _folder(path: str) -> np.ndarray:
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder '{path}'")
    return _decode([os.path.join(path, n) for n in names], names)


def _zip(path: str) -> np.ndarray:
    try:
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if n.lower().endswith(IMAGE_EXTENSIONS))
            if not names:
                raise DataError(f"no image files in zip '{path}'")
            return _decode([io.BytesIO(z.read(n)) for n in names], names)
    except zipfile.BadZipFile:
        raise DataError(f"'{path}' is not a valid zip file") from None


def _array(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read array file '{path}' ({e})") from None
    labels = None
    if isinstance(x, np.lib.npyio.NpzFile):
        keys = [k for k in ("images", "x") if k in x.files] or (x.files if len(x.files) == 1 else [])
        if not keys:
            raise DataError(f"'{path}' holds arrays {x.files}; name the image array 'images'")
        label_keys = [k for k in ("labels", "y") if k in x.files]
        labels = x[label_keys[0]] if label_keys else None
        x = x[keys[0]]
    if x.dtype != np.uint8:
        raise DataError(f"'{path}' holds {x.dtype} values; expected uint8 images in 0..255")
    if x.ndim == 3:  # (N, H, W): greyscale
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"'{path}' has shape {x.shape}; expected (N, C, H, W) or (N, H, W, C)")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):  # NHWC -> NCHW
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise DataError(f"'{path}' has shape {x.shape}; expected 1 or 3 channels in NCHW or NHWC layout")
    if labels is not None and (labels.shape != (len(x),) or labels.dtype.kind not in "iu" or labels.min() < 0):
        raise DataError(f"'{path}': labels of shape {labels.shape} and type {labels.dtype}; expected {len(x)} "
                        "non-negative integer class indices")
    return x, labels


# ----------------------------------------------------------------------------------------------------


def load_labelled(spec: str, root: str = "data", n: int | None = None,
                  split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dataset `spec` (see the module docstring) and its labels: (uint8 (N, C, H, W), int64 (N,) or None).

    The first `n` images (and labels) if given; the images are exactly those of load_images. split: "train",
    or "test" for a named dataset (files have one split)."""
    labels = None
    if split not in SPLITS:
        raise DataError(f"split '{split}': choose from {', '.join(SPLITS)}")
    if split == "test" and spec not in NAMED:
        raise DataError(f"'{spec}' has no test split: only {', '.join(NAMED)} have one")
    if spec == "cifar10":
        x, labels = _cifar10(root, split == "train")
    elif spec == "digits":
        x, labels = _digits(split == "train")
    elif spec in ("mnist", "fashion-mnist"):
        x, labels = _mnist_like(spec, root, split == "train")
    elif not os.path.exists(spec):
        raise DataError(f"data '{spec}' not found: give {', '.join(NAMED)}, a folder of images, a .zip, "
                        "or a .npy/.npz file")
    elif os.path.isdir(spec):
        x = _folder(spec)
    elif spec.lower().endswith(".zip"):
        x = _zip(spec)
    elif spec.lower().endswith((".npy", ".npz")):
        x, labels = _array(spec)
    else:
        raise DataError(f"cannot tell the format of '{spec}': use a folder, a .zip, or a .npy/.npz file")
    images = torch.from_numpy(np.ascontiguousarray(x))
    return first(spec, images, None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64)), n)


def first(spec: str, images: torch.Tensor, labels: torch.Tensor | None, n: int | None = None):
    """The first `n` images (and labels) of data set `spec` as load_labelled gave them, all if n is None;
    DataError unless at least 2 remain."""
    if n is not None:
        if n < 1:
            raise DataError(f"asked for {n} images; give a positive count")
        images, labels = images[:n], None if labels is None else labels[:n]
    if len(images) < 2:
        raise DataError(f"data '{spec}' holds {len(images)} image(s); need at least 2")
    return images, labels


def load_images(spec: str, root: str = "data", n: int | None = None, split: str = "train") -> torch.Tensor:
    """Dataset `spec` (see the module docstring) as a uint8 tensor (N, C, H, W); the first `n` if given."""
    return load_labelled(spec, root, n, split)[0]


# ----------------------------------------------------------------------------------------------------
# Command line: what a spec loads

if __name__ == "__main__":
    import argparse
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", help="cifar10 | digits | mnist | fashion-mnist | DIR | FILE.zip | FILE.npy/.npz")
    p.add_argument("--root", default="data", help="download folder of the named datasets")
    args = p.parse_args()
    for split in SPLITS if args.spec in NAMED else SPLITS[:1]:
        try:
            images, labels = load_labelled(args.spec, args.root, split=split)
        except DataError as e:
            sys.exit(f"data.py: error: {e}")
        print(f"{args.spec} {split}: {tuple(images.shape)} {images.dtype}, "
              + ("no labels" if labels is None else f"images per label {labels.bincount().tolist()}"))
