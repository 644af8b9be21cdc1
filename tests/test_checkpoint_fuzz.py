"""Fuzzing the loader (issue 11): corrupted copies of one valid adapter folder either fail with a documented error
(``lorakit.AdapterLoadError``, naming the folder) and leave the model bit-identical (tensors, buffers,
``requires_grad``, module structure, ``lorakit_configs``), or load with the outputs of the uncorrupted adapter.

The folder: LoRA (rank 2, alpha 3) on an Embedding, a Conv2d and a Linear, plus a ``modules_to_save`` head with a
BatchNorm (an int64 buffer). Its values are multiples of 1/64 in [-2, 2], exact in float16, bfloat16, float32 and
float64, so a lossless dtype change must load with identical outputs. A different *valid* ``lora_alpha`` or
``use_rslora`` is another adapter, not a detectable corruption, so the fuzz never draws one.

Hypothesis is seeded (``derandomize=True``); ``LORAKIT_FUZZ_EXAMPLES`` raises the number of cases per strategy.
"""
from __future__ import annotations

import collections
import functools
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from conftest import assert_same_state, state_snapshot

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore:.*ignoring keys lorakit does not know")]

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
EXAMPLES = int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", "40"))
FUZZ = settings(derandomize=True, max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OUTCOMES: collections.Counter = collections.Counter()  # (strategy, outcome) -> cases; printed at the end


class FuzzNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(4, 3, kernel_size=3, padding=1)
        self.proj = nn.Linear(27, 5)
        self.head = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))

    def forward(self, ids):  # ids (B, 3, 3) -> (B, 3, 3, 4) -> (B, 4, 3, 3) -> (B, 27) -> (B, 4)
        x = self.conv(self.embed(ids).permute(0, 3, 1, 2))
        return self.head(torch.tanh(self.proj(torch.tanh(x).flatten(1))))


def base() -> FuzzNet:
    torch.manual_seed(0)
    return FuzzNet().eval()


IDS = torch.randint(0, 10, (2, 3, 3), generator=torch.Generator().manual_seed(1))


@functools.lru_cache(maxsize=1)
def valid_folder() -> tuple[bytes, bytes, torch.Tensor]:
    """(config bytes, safetensors bytes, the loaded adapter's outputs on IDS)."""
    model = lk.inject(base(), lk.LoRAConfig(rank=2, alpha=3.0, rslora=False, targets=["embed", "conv", "proj"],
                                            modules_to_save=["head"]))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randint(-128, 129, p.shape, generator=gen) / 64)  # exact in every float dtype
        model.head.modules_to_save["default"][1].running_var.fill_(1.5)
    with tempfile.TemporaryDirectory() as tmp:
        lk.save_adapter(model, tmp)
        files = (Path(tmp, CONFIG).read_bytes(), Path(tmp, WEIGHTS).read_bytes())
        expected = lk.load_adapter(base(), tmp)(IDS).detach()
    torch.testing.assert_close(expected, model(IDS))
    assert not torch.allclose(expected, base()(IDS), atol=1e-3)
    return (*files, expected)


def check_case(strategy: str, corrupt) -> None:
    """Write the valid folder, apply ``corrupt(folder)``, load into a fresh base, assert one of the two outcomes."""
    config, weights, expected = valid_folder()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / CONFIG).write_bytes(config)
        (folder / WEIGHTS).write_bytes(weights)
        corrupt(folder)
        model = base()
        before = state_snapshot(model)
        try:
            lk.load_adapter(model, folder)
        except lk.AdapterLoadError as err:
            assert str(folder) in str(err), f"the message does not name the folder: {err}"
            assert_same_state(model, before)
            OUTCOMES[strategy, "refused"] += 1
            return
        torch.testing.assert_close(model(IDS), expected, atol=1e-6, rtol=1e-5)
        OUTCOMES[strategy, "loaded, same outputs"] += 1


# -- corruptions of the files' bytes ----------------------------------------------------------------
@FUZZ
@given(which=st.sampled_from([CONFIG, WEIGHTS]), fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_files(which, fraction):
    def corrupt(folder):
        data = (folder / which).read_bytes()
        (folder / which).write_bytes(data[: int(len(data) * fraction)])
    check_case("truncated file", corrupt)


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


@FUZZ
@given(position=st.floats(0, 1, exclude_max=True), byte=st.integers(0, 255))
def test_changed_byte_in_the_safetensors_header(position, byte):
    def corrupt(folder):
        data = bytearray((folder / WEIGHTS).read_bytes())
        data[8 + int(position * header_length(data))] = byte
        (folder / WEIGHTS).write_bytes(bytes(data))
    check_case("header byte", corrupt)


@FUZZ
@given(length=st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(0, 4096)))
def test_impossible_header_length(length):
    def corrupt(folder):
        data = (folder / WEIGHTS).read_bytes()
        if length != header_length(data):
            (folder / WEIGHTS).write_bytes(struct.pack("<Q", length) + data[8:])
    check_case("header length", corrupt)


@FUZZ
@given(text=st.one_of(st.binary(max_size=64).map(lambda b: b.decode("latin-1")), st.text(max_size=64),
                      st.sampled_from(["[]", "null", "3", '"LORA"', "{", "[" * 100_000, '{"peft_type": "LORA"}',
                                       '{"peft_type": "LORA", "r": 2, "lora_alpha": 3.0, "target_modules": ["conv"], '
                                       '"use_rslora": true}'])))
def test_garbage_json(text):
    def corrupt(folder):
        (folder / CONFIG).write_text(text, encoding="utf-8", errors="surrogatepass")
    check_case("garbage JSON", corrupt)


# -- corruptions of the tensors (the file rewritten) ------------------------------------------------------
def rewrite(folder: Path, change) -> None:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


TENSOR_CHANGES = st.one_of(
    st.tuples(st.just("rename"), st.integers(0, 99), st.sampled_from(["lora_A", "lora_B", ".default", "x", "", "base_model.model."])),
    st.tuples(st.just("reshape"), st.integers(0, 99), st.sampled_from(["transpose", "flatten", "unsqueeze", "grow", "shrink"])),
    st.tuples(st.just("dtype"), st.integers(0, 99), st.sampled_from([torch.float16, torch.bfloat16, torch.float64,
                                                                     torch.int32, torch.int64, torch.uint8, torch.bool,
                                                                     torch.float8_e4m3fn])),
    st.tuples(st.just("drop"), st.integers(0, 99), st.none()),
    st.tuples(st.just("add"), st.integers(0, 99), st.sampled_from(["lora_C.weight", "extra"])),
)


def apply_tensor_change(tensors: dict, kind: str, index: int, arg) -> None:
    key = sorted(tensors)[index % len(tensors)]
    value = tensors[key]
    if kind == "rename":
        new = key.replace("lora_A", "lora_B") if arg == "lora_A" else key.replace("lora_B", "lora_A") \
            if arg == "lora_B" else key.replace("base_model.model.", "") if arg == "base_model.model." \
            else key + arg if arg else key[:-1]
        tensors[new] = tensors.pop(key)
    elif kind == "reshape":
        tensors[key] = {"transpose": lambda v: v.t().contiguous() if v.dim() == 2 else v.flatten(),
                        "flatten": lambda v: v.flatten(), "unsqueeze": lambda v: v.unsqueeze(0),
                        "grow": lambda v: torch.cat([v, v[:1]]) if v.dim() else v.reshape(1),
                        "shrink": lambda v: v[1:] if v.dim() and len(v) > 1 else v.flatten()[:0]}[arg](value)
    elif kind == "dtype":
        tensors[key] = value.to(arg)
    elif kind == "drop":
        del tensors[key]
    else:
        tensors[f"{key.rpartition('.')[0]}.{arg}"] = torch.zeros(2)


@FUZZ
@given(changes=st.lists(TENSOR_CHANGES, min_size=1, max_size=2))
def test_tensors_renamed_reshaped_retyped_dropped_or_added(changes):
    def corrupt(folder):
        def change(tensors):
            for kind, index, arg in changes:
                apply_tensor_change(tensors, kind, index, arg)
        rewrite(folder, change)
    check_case("tensor " + "+".join(c[0] for c in changes), corrupt)


# -- corruptions of the config's values and keys ------------------------------------------------------
JSON_VALUES = st.one_of(
    st.sampled_from([None, True, False, 0, 1, -1, 2, 3, 8, 0.5, 1.0, -0.1, 1e308, math.nan, math.inf, -math.inf,
                     "", "yes", "true", "LORA", "all-linear", ".*", "(", "conv", "pissa", "olora", "gaussian",
                     [], [1], ["conv"], ["head"], ["embed", "conv", "proj", "head"], {}, {"conv": 4}, [[]]]),
    st.integers(), st.floats(allow_nan=True), st.text(max_size=8),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def is_another_valid_adapter(key: str, value, original) -> bool:
    """A different but valid alpha or rsLoRA flag: another adapter, indistinguishable from a corruption."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "lora_alpha":
        return number and math.isfinite(value) and value != original
    return key == "use_rslora" and isinstance(value, bool) and value != original


@FUZZ
@given(index=st.integers(0, 99), value=JSON_VALUES)
def test_config_values_of_the_wrong_type_or_out_of_range(index, value):
    config = json.loads(valid_folder()[0])
    key = sorted(config)[index % len(config)]
    if is_another_valid_adapter(key, value, config[key]):
        return

    def corrupt(folder):
        (folder / CONFIG).write_text(json.dumps({**config, key: value}))
    check_case("config value", corrupt)


@FUZZ
@given(drop=st.lists(st.integers(0, 99), min_size=1, max_size=3),
       extra=st.one_of(st.none(), st.tuples(st.text(min_size=1, max_size=6), JSON_VALUES)))
def test_missing_and_unknown_config_keys(drop, extra):
    config = json.loads(valid_folder()[0])
    names = sorted(config)
    for index in drop:
        config.pop(names[index % len(names)], None)
    if extra is not None and extra[0] not in json.loads(valid_folder()[0]):
        config[extra[0]] = extra[1]

    def corrupt(folder):
        (folder / CONFIG).write_text(json.dumps(config))
    check_case("missing/unknown key", corrupt)


@pytest.mark.parametrize("missing", [[CONFIG], [WEIGHTS], [CONFIG, WEIGHTS]])
def test_missing_files(missing):
    def corrupt(folder):
        for name in missing:
            (folder / name).unlink()
    check_case("missing file", corrupt)


def test_zz_report():
    """Print what the fuzz found (run with -s); every case above passed one of the two outcomes."""
    total = sum(OUTCOMES.values())
    print(f"\nfuzz: {total} corrupted folders")
    for (strategy, outcome), count in sorted(OUTCOMES.items()):
        print(f"  {strategy:40s} {outcome:22s} {count}")
