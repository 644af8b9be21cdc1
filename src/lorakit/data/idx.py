"""IDX files, the format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/).

Layout: two zero bytes, a dtype code, the number of dimensions ``ndim``, then ``ndim`` big-endian uint32
sizes, then the values in C order, big-endian. Files are often gzipped; gzip is recognised by its magic
bytes ``1f 8b``, not by the file name.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

from lorakit._io import atomic_write

GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype code -> big-endian numpy dtype as stored in the file
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TORCH_TO_CODE = {
    torch.uint8: 0x08,
    torch.int8: 0x09,
    torch.int16: 0x0B,
    torch.int32: 0x0C,
    torch.float32: 0x0D,
    torch.float64: 0x0E,
}


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (raw or gzipped) into a tensor with the file's shape and dtype.

    A malformed file is a ``ValueError`` naming the file and what was wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such IDX file: {path}")
    return parse_idx(path.read_bytes(), source=str(path))


def parse_idx(data: bytes, source: str = "<bytes>") -> torch.Tensor:
    """Decode the bytes of an IDX file (raw or gzipped); ``source`` names it in error messages."""
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{source}: starts like a gzip file but cannot be decompressed: {err}") from err
    if len(data) < 4:
        raise ValueError(f"{source}: {len(data)} bytes is too short for an IDX header (at least 4 bytes)")
    zero0, zero1, code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"{source}: not an IDX file: magic number should start with two zero bytes, found {data[:4].hex(' ')}"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{source}: unknown IDX dtype code 0x{code:02X}; valid codes are {known}")
    if ndim == 0:
        raise ValueError(f"{source}: IDX header says 0 dimensions; expected at least 1")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{source}: header of a {ndim}-dimensional IDX file needs {header_len} bytes, file has {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_DTYPES[code]
    if math.prod(max(size, 1) for size in shape) * dtype.itemsize > sys.maxsize:  # strides would overflow
        raise ValueError(f"{source}: IDX shape {shape} is too large to address")
    expected = math.prod(shape) * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        hint = "truncated" if found < expected else "trailing bytes"
        raise ValueError(
            f"{source}: shape {shape} of {dtype.name} needs {expected} data bytes, found {found} ({hint})"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header_len)
    # astype copies into native byte order, giving torch a writable array it may own
    return torch.from_numpy(values.astype(dtype.newbyteorder("="))).reshape(shape)


def open_maybe_gzip(path: str | os.PathLike):
    """Open ``path`` for binary reading, through gzip if it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        is_gzip = f.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if is_gzip else open(path, "rb")


def write_idx(path: str | os.PathLike, tensor: torch.Tensor) -> Path:
    """Write ``tensor`` as an IDX file, atomically; gzipped when ``path`` ends in ``.gz``."""
    if tensor.dtype not in _TORCH_TO_CODE:
        allowed = ", ".join(str(d) for d in _TORCH_TO_CODE)
        raise ValueError(f"IDX cannot store {tensor.dtype}; use one of {allowed}")
    if tensor.ndim == 0 or tensor.ndim > 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, tensor has {tensor.ndim}")
    if any(size >= 2**32 for size in tensor.shape):
        raise ValueError(f"IDX dimension sizes must be < 2**32, got shape {tuple(tensor.shape)}")
    code = _TORCH_TO_CODE[tensor.dtype]
    header = bytes([0, 0, code, tensor.ndim]) + struct.pack(f">{tensor.ndim}I", *tensor.shape)
    body = tensor.detach().cpu().contiguous().numpy().astype(IDX_DTYPES[code]).tobytes()
    data = header + body
    path = Path(path)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime=0: same tensor, same bytes
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
