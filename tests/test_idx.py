"""IDX reader/writer: round trips, hand-made files, malformed files, and fuzzing (ValueError or a valid tensor)."""
import gzip
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.data.idx import GZIP_MAGIC, IDX_DTYPES, parse_idx, read_idx, write_idx

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64]


def idx_bytes(code: int, shape, body: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + body


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path, dtype, suffix):
    values = torch.arange(60, dtype=torch.float64).reshape(3, 4, 5) * 2 + (0.25 if dtype.is_floating_point else 0)
    tensor = values.to(dtype)
    path = write_idx(tmp_path / f"x-idx3-ubyte{suffix}", tensor)
    assert (path.read_bytes()[:2] == GZIP_MAGIC) == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == dtype and torch.equal(back, tensor)


def test_reads_hand_made_big_endian_file():
    # int16 values 0x0102 = 258 and 0xFFFE = -2, stored big-endian as the IDX format requires
    assert parse_idx(idx_bytes(0x0B, (2,), b"\x01\x02\xff\xfe")).tolist() == [258, -2]
    labels = parse_idx(idx_bytes(0x08, (3,), bytes([5, 0, 4])))
    assert labels.dtype == torch.uint8 and labels.tolist() == [5, 0, 4]


def test_gzip_is_detected_by_content_not_name(tmp_path):
    tensor = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    gz_without_suffix = tmp_path / "images"
    gz_without_suffix.write_bytes(gzip.compress(idx_bytes(0x08, (2, 2), bytes([1, 2, 3, 4]))))
    raw_with_suffix = tmp_path / "images.gz"
    raw_with_suffix.write_bytes(idx_bytes(0x08, (2, 2), bytes([1, 2, 3, 4])))
    assert torch.equal(read_idx(gz_without_suffix), tensor)
    assert torch.equal(read_idx(raw_with_suffix), tensor)


@pytest.mark.parametrize("data, message", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "two zero bytes"),
    (idx_bytes(0x0A, (1,), b"\x07"), "unknown IDX dtype code 0x0A"),
    (idx_bytes(0x08, (), b""), "0 dimensions"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", "needs 16 bytes"),
    (b"\x00\x00", "too short"),
    (idx_bytes(0x08, (2, 3), bytes(5)), "needs 6 data bytes, found 5 (truncated)"),
    (idx_bytes(0x0C, (2,), bytes(9)), "needs 8 data bytes, found 9 (trailing bytes)"),
    (GZIP_MAGIC + b"\x08\x00garbage", "cannot be decompressed"),
])
def test_malformed_file_is_a_value_error_naming_the_file(tmp_path, data, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="bad-idx") as info:
        read_idx(path)
    assert message in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="IDX cannot store torch.int64"):
        write_idx(tmp_path / "x", torch.zeros(2, dtype=torch.int64))


def assert_parses_consistently_or_value_error(data: bytes) -> None:
    """The fuzz invariant: a tensor whose shape and size agree with the header, or a ValueError."""
    try:
        tensor = parse_idx(data)
    except ValueError:
        return
    raw = gzip.decompress(data) if data[:2] == GZIP_MAGIC else data
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    assert tuple(tensor.shape) == shape
    assert tensor.numel() * IDX_DTYPES[raw[2]].itemsize == len(raw) - 4 - 4 * ndim


@settings(deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_arbitrary_bytes(data):
    assert_parses_consistently_or_value_error(data)


@settings(deadline=None)
@given(code=st.sampled_from([*IDX_DTYPES, 0x00, 0x0A, 0xFF]),
       shape=st.lists(st.sampled_from([0, 1, 2, 3, 2**32 - 1]), max_size=4),
       body=st.binary(max_size=40))
def test_fuzz_plausible_headers(code, shape, body):
    assert_parses_consistently_or_value_error(idx_bytes(code, shape, body))


VALID = idx_bytes(0x0B, (2, 3), bytes(range(12)))


@settings(deadline=None)
@given(compress=st.booleans(), cut=st.integers(0, 80), extra=st.binary(max_size=4),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_fuzz_mutations_of_a_valid_file(compress, cut, extra, flips):
    data = bytearray(gzip.compress(VALID, mtime=0) if compress else VALID)
    for position, value in flips:
        data[position % len(data)] = value
    assert_parses_consistently_or_value_error(bytes(data[:len(data) - cut % len(data)]) + extra)
