"""Tests of classifier.py and of data.py's labelled sets: the digits' labels, MNIST and Fashion-MNIST
read offline from idx files the test writes (and padded to 32 x 32), the classifier's accuracy,
determinism and cache, and what its feature space sees (two real halves close; corruptions and a lost
class far, with fid.py's metrics).

    OMP_NUM_THREADS=1 pytest -q tests/test_classifier.py
"""

import dataclasses
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import classifier
import data
import fid

TINY = classifier.Config(steps=10)  # enough to test determinism and the cache, in a tenth of a second


@pytest.fixture(scope="module")
def digits():
    """All 1,797 digits: the training split (1,198), then the test split (599)."""
    (x, y), (x_test, y_test) = data.load_labelled("digits"), data.load_labelled("digits", split="test")
    return torch.cat([x, x_test]), torch.cat([y, y_test])


@pytest.fixture(scope="module")
def trained(digits_classifier):
    """The classifier with the default Config, trained once for the test process (conftest.py; ~6 s on one thread)."""
    return digits_classifier


@pytest.fixture(scope="module")
def halves(digits):
    """noise_floor's halves of the digits (seed 0): 898 real ones (A), 898 to corrupt (B)."""
    perm = np.random.default_rng(0).permutation(len(digits[0]))
    return perm[:898], perm[898:1796]


# ----------------------------------------------------------------------------------------------------
# Labelled data


def test_digits_labels_and_images_as_before(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for split, rows in (("train", np.arange(1797) % 3 != 2), ("test", np.arange(1797) % 3 == 2)):  # every third: test
        images, labels = data.load_labelled("digits", split=split)
        assert images.dtype == torch.uint8 and images.shape == (rows.sum(), 1, 8, 8)
        assert np.array_equal(images[:, 0].numpy(), np.round(bunch.images[rows] * (255 / 16)).astype(np.uint8))  # 17 levels
        assert labels.dtype == torch.int64 and np.array_equal(labels.numpy(), bunch.target[rows])
        assert torch.equal(data.load_images("digits", split=split), images)
        assert np.bincount(labels.numpy()).min() >= (50 if split == "test" else 110)  # every digit in both splits
    x, y = data.load_labelled("digits", n=10)
    assert torch.equal(x, images[:0].new_tensor(np.round(bunch.images[[0, 1, 3, 4, 6, 7, 9, 10, 12, 13]] * (255 / 16))
                                                  .astype(np.uint8))[:, None]) and y.tolist() == [0, 1, 3, 4, 6, 7, 9, 0, 2, 3]


def test_digits_read_from_scikit_learns_file_equal_load_digits(digits, monkeypatch):
    """data.py reads the digits' CSV file where scikit-learn keeps it, and falls back on load_digits without it."""
    read, loadtxt = [], np.loadtxt
    monkeypatch.setattr(data.np, "loadtxt", lambda path, **kw: read.append(path) or loadtxt(path, **kw))
    fast = data._digits(True)
    assert len(read) == 1 and read[0].endswith("digits.csv.gz")
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    slow = data._digits(True)
    for x, y in (fast, slow):
        assert np.array_equal(x, digits[0][:1198].numpy()) and np.array_equal(y, digits[1][:1198].numpy())


def write_idx(path, array: np.ndarray):
    """An idx file as MNIST's (LeCun's format): magic 0x0000 08 <dims>, big-endian sizes, then the bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("spec,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like_read_offline_and_padded(tmp_path, spec, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    train_x, train_y = rng.integers(1, 256, size=(12, 28, 28)), rng.integers(0, 10, size=12)  # no black pixel
    write_idx(raw / "train-images-idx3-ubyte", train_x)
    write_idx(raw / "train-labels-idx1-ubyte", train_y)
    test_x, test_y = rng.integers(0, 256, size=(3, 28, 28)), rng.integers(0, 10, size=3)
    write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_y)
    images, labels = data.load_labelled(spec, root=str(tmp_path))
    assert images.dtype == torch.uint8 and images.shape == (12, 1, 32, 32)
    assert np.array_equal(images[:, 0, 2:30, 2:30].numpy(), train_x)              # the image, centred
    border = images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.max()) == 0                                                   # 2 black pixels on every side
    assert labels.dtype == torch.int64 and np.array_equal(labels.numpy(), train_y)
    assert torch.equal(data.load_images(spec, root=str(tmp_path), n=5), images[:5])
    images, labels = data.load_labelled(spec, root=str(tmp_path), split="test")             # the t10k files
    assert np.array_equal(images[:, 0, 2:30, 2:30].numpy(), test_x) and np.array_equal(labels.numpy(), test_y)


def test_mnist_without_files_or_internet_is_a_data_error(tmp_path, monkeypatch):
    import torchvision

    def no_internet(self):
        raise RuntimeError("no route to host")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_internet)  # FashionMNIST inherits it
    for spec in ("mnist", "fashion-mnist"):
        with pytest.raises(data.DataError, match="idx files") as e:
            data.load_images(spec, root=str(tmp_path))
        assert "\n" not in str(e.value)


def test_only_named_datasets_have_a_test_split(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(data.DataError, match="has no test split"):
        data.load_images(str(tmp_path / "a.npy"), split="test")
    with pytest.raises(data.DataError, match="split 'val'"):
        data.load_images("digits", split="val")


def test_npz_labels(tmp_path):
    x = np.zeros((4, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "a.npz", images=x, labels=np.array([0, 1, 1, 2]))
    images, labels = data.load_labelled(str(tmp_path / "a.npz"))
    assert images.shape == (4, 1, 8, 8) and labels.tolist() == [0, 1, 1, 2]
    np.save(tmp_path / "b.npy", x)
    assert data.load_labelled(str(tmp_path / "b.npy"))[1] is None
    np.savez(tmp_path / "c.npz", images=x, labels=np.array([0.5, 1, 1, 2]))
    with pytest.raises(data.DataError, match="labels"):
        data.load_labelled(str(tmp_path / "c.npz"))


# ----------------------------------------------------------------------------------------------------
# The classifier: split, accuracy, determinism, cache


def test_split_is_stratified_and_seeded(digits):
    labels = digits[1].numpy()
    train, test = classifier.split(labels, 0.2, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(labels)
    counts = np.bincount(labels)
    assert np.array_equal(np.bincount(labels[test], minlength=10), np.round(0.2 * counts).astype(int))
    again, other = classifier.split(labels, 0.2, seed=0)[1], classifier.split(labels, 0.2, seed=1)[1]
    assert np.array_equal(again, test) and not np.array_equal(other, test)


def test_accuracy_on_the_held_out_digits(trained, digits):
    net, info = trained
    assert info["accuracy"] >= 0.97
    assert info["n_train"] == 958 and info["n_test"] == 240 and info["n_classes"] == 10 and not info["cached"]
    x, y = digits[0][:1198], digits[1][:1198].numpy()  # the training split, which the classifier is given
    _, test = classifier.split(y, 0.2, 0)
    assert info["accuracy"] == pytest.approx((classifier.predict(net, x[test]) == y[test]).mean())
    assert (classifier.predict(net, digits[0][1198:]) == digits[1][1198:].numpy()).mean() >= 0.97  # the test split


def test_same_seed_same_weights(digits):
    before = torch.random.get_rng_state()
    a, info_a = classifier.train(*digits, TINY)
    assert torch.equal(torch.random.get_rng_state(), before)                      # the global RNG is untouched
    torch.manual_seed(12345)                                                      # another global state: no effect
    b, info_b = classifier.train(*digits, TINY)
    torch.random.set_rng_state(before)
    c, _ = classifier.train(*digits, dataclasses.replace(TINY, seed=1))
    for name, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[name]), name                        # bit-identical
    assert info_a["accuracy"] == info_b["accuracy"] and info_a["hash"] == info_b["hash"]
    assert not torch.equal(a.state_dict()["fc.weight"], c.state_dict()["fc.weight"])


def test_the_callers_thread_count_does_not_change_the_weights(digits, monkeypatch):
    """Training runs on Config.threads threads (1) whatever the caller set, and gives the caller its count back."""
    seen, forward = [], classifier.Net.forward
    monkeypatch.setattr(classifier.Net, "forward",
                        lambda self, x: seen.append(torch.get_num_threads()) or forward(self, x))
    before = torch.get_num_threads()
    try:
        nets = []
        for caller in (2, 1):
            torch.set_num_threads(caller)
            nets.append(classifier.train(*digits, TINY)[0])
            assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(before)
    assert seen[:TINY.steps] == [1] * TINY.steps and seen[TINY.steps] == 2  # trained on 1, held out on the caller's 2
    for name, v in nets[0].state_dict().items():
        assert torch.equal(v, nets[1].state_dict()[name]), name


def test_cache_used_when_nothing_changed_and_refused_otherwise(digits, tmp_path, monkeypatch):
    images, labels = digits
    net, info = classifier.get(images, labels, str(tmp_path), TINY)
    assert not info["cached"] and [p.name for p in tmp_path.iterdir()] == [f"classifier-{info['hash'][:16]}.pt"]
    real_train, calls = classifier.train, []

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(classifier, "train", counting_train)
    again, info2 = classifier.get(images, labels, str(tmp_path), TINY)
    assert not calls and info2["cached"] and info2["accuracy"] == info["accuracy"] and info2["hash"] == info["hash"]
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    other_image, other_label = images.clone(), labels.clone()
    other_image[0, 0, 3, 3] ^= 1                                                    # one grey level in one pixel
    other_label[0] = (other_label[0] + 1) % 10
    changes = [(other_image, labels, TINY), (images, other_label, TINY),
               (images, labels, dataclasses.replace(TINY, lr=TINY.lr / 2)), (images, labels, dataclasses.replace(TINY, seed=5))]
    hashes = {info["hash"]}
    for i, (x, y, cfg) in enumerate(changes):
        _, changed = classifier.get(x, y, str(tmp_path), cfg)
        assert len(calls) == i + 1 and not changed["cached"]                     # retrained
        hashes.add(changed["hash"])
    assert len(hashes) == 1 + len(changes)
    path = tmp_path / f"classifier-{info['hash'][:16]}.pt"                        # a file under the right name,
    torch.save({"state_dict": net.state_dict(), "info": {**info, "hash": "0" * 64}}, path)  # made from other data
    _, refused = classifier.get(images, labels, str(tmp_path), TINY)
    assert len(calls) == len(changes) + 1 and not refused["cached"]
    assert classifier.get(images, labels, str(tmp_path), TINY)[1]["cached"]      # rewritten, then used


def test_features_predictions_and_log_probs(trained, digits):
    net, _ = trained
    images = digits[0][:300]
    f = classifier.features(net, images)
    assert f.dtype == np.float64 and f.shape == (300, classifier.Config.feature_dim) and f.min() >= 0  # after a ReLU
    assert np.allclose(classifier.features(net, images, batch_size=7), f, atol=1e-5)
    assert np.allclose(classifier.features(net, images.float() / 127.5 - 1), f)  # uint8 or floats in [-1, 1]
    lp = classifier.log_probs(net, images)
    assert lp.shape == (300, 10) and np.allclose(np.exp(lp).sum(1), 1)
    pred = classifier.predict(net, images)
    assert pred.dtype == np.int64 and np.array_equal(pred, lp.argmax(1))
    assert (pred == digits[1][:300].numpy()).mean() > 0.97
    with pytest.raises(ValueError, match="images must be"):
        classifier.features(net, torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


def test_a_32px_set_trains_and_gives_features():
    """The MNIST path: 32 x 32 images, four conv stages; 3 classes told apart by where a bright square is."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    images = torch.randint(0, 40, (60, 1, 32, 32), generator=g, dtype=torch.uint8)
    for c in range(3):
        images[labels == c, :, 4 + 8 * c:12 + 8 * c, 4:12] = 255
    net, info = classifier.train(images, labels, dataclasses.replace(TINY, steps=25, batch_size=16))
    assert len([m for m in net.body if isinstance(m, torch.nn.MaxPool2d)]) == 4    # 32 -> 16 -> 8 -> 4 -> 2
    assert info["n_test"] == 12 and info["accuracy"] == 1.0
    assert classifier.features(net, images).shape == (60, classifier.Config.feature_dim)


# ----------------------------------------------------------------------------------------------------
# The feature space: what it sees


def add_noise(images: torch.Tensor, std: float) -> torch.Tensor:
    """Gaussian noise of `std` in [-1, 1] units, quantized back to uint8 as the loop's samples are."""
    z = images.float() / 127.5 - 1 + std * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    return ((z.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `sigma` pixels (separable 7-tap kernel, edges replicated), quantized to uint8."""
    if sigma == 0:
        return images
    t = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()                                                                 # (7,)
    x = F.conv2d(F.pad(images.float(), (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7))
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1))
    return x.round().clamp(0, 255).to(torch.uint8)


def test_two_real_halves_are_close(trained, digits):
    net, _ = trained
    feats = classifier.features(net, digits[0])
    floor = fid.noise_floor(feats, splits=10, seed=0, labels=digits[1].numpy())
    assert floor["n_half"] == 898 and 1.5 < floor["fd"][0] < 4 and 0.3 < floor["fd"][1] < 2  # measured: 2.9 +- 1.0
    assert min(floor["precision"][0], floor["recall"][0]) > 0.88 and abs(floor["density"][0] - 1) < 0.1
    assert abs(floor["coverage"][0] - fid.expected_coverage(898, 898)) < 0.03          # 0.883 vs 0.875
    assert 0.01 < floor["class_tv"][0] < 0.06   # 898 labels drawn from the real shares: ~0.03


def test_the_floors_fd_shrinks_as_one_over_n(trained, digits):
    """noise_floor scales FD from its halves' size to the sizes asked for as 1/n1 + 1/n2: real splits of a quarter
    of the digits score twice the FD of halves (over 40 splits each, the ratio's standard error is ~8%)."""
    net, _ = trained
    feats = classifier.features(net, digits[0])
    halves, quarters = fid.noise_floor(feats, splits=40), fid.noise_floor(feats[:898], splits=40)
    assert quarters["n_half"] == 449 and 1.5 < quarters["fd"][0] / halves["fd"][0] < 2.5  # measured: 2.08
    assert fid.noise_floor(feats[:898], 898, 898, splits=40)["fd"][0] == pytest.approx(quarters["fd"][0] / 2)


@pytest.mark.parametrize("corrupt,strengths", [(add_noise, (0, 0.15, 0.3, 0.6)), (blur, (0, 0.5, 1.0, 1.5))])
def test_fd_grows_with_the_strength_of_a_corruption(trained, digits, halves, corrupt, strengths):
    net, _ = trained
    a, b = halves
    real = classifier.features(net, digits[0][a])
    metrics = [fid.feature_metrics(real, classifier.features(net, corrupt(digits[0][b], s))) for s in strengths]
    fds = [m["fd"] for m in metrics]
    assert all(later > 1.1 * earlier for earlier, later in zip(fds, fds[1:])), fds
    assert fds[-1] > 10 * fds[0]
    for name in ("precision", "recall", "density", "coverage"):
        assert metrics[-1][name] < metrics[0][name] - 0.1, name


@pytest.mark.parametrize("lost", [3, 8])
def test_a_lost_class_is_seen(trained, digits, halves, lost):
    """The generated half without one digit: FD rises far above the floor, recall and coverage fall by
    about the class's share, the class histogram's TV distance rises to about it, one class is gone."""
    net, _ = trained
    images, labels = digits[0], digits[1].numpy()
    a, b = halves
    kept = b[labels[b] != lost]
    real = classifier.features(net, images[a])
    whole, missing = fid.feature_metrics(real, classifier.features(net, images[b])), \
        fid.feature_metrics(real, classifier.features(net, images[kept]))
    assert missing["fd"] > 4 * whole["fd"]                                           # measured: 12-16 vs 2.1
    assert missing["recall"] < whole["recall"] - 0.05 and missing["coverage"] < whole["coverage"] - 0.05
    before = fid.class_metrics(classifier.predict(net, images[b]), labels[a], 10)
    after = fid.class_metrics(classifier.predict(net, images[kept]), labels[a], 10)
    assert before["classes"] == 10 and after["classes"] == 9 and after["class_hist"][lost] <= 3
    assert after["class_tv"] > max(0.09, before["class_tv"] + 0.04)                # measured 0.11-0.12 vs 0.056


def test_noise_raises_pixel_recall_but_not_the_classifiers(trained, digits, halves):
    """README's EDM anomaly in miniature: noisy samples have wide k-NN balls, so in pixel space they 'recall'
    every real digit; in the classifier's space recall falls."""
    net, _ = trained
    a, b = halves
    clean, noisy = digits[0][b], add_noise(digits[0][b], 0.8)
    pixel = [fid.prdc(fid.pixel_features(digits[0][a]), fid.pixel_features(x), device="cpu")["recall"] for x in (clean, noisy)]
    learned = [fid.prdc(classifier.features(net, digits[0][a]), classifier.features(net, x), device="cpu")["recall"]
               for x in (clean, noisy)]
    assert pixel[1] > max(0.99, pixel[0] + 0.05) and learned[1] < learned[0] - 0.15
