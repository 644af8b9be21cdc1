"""The experiments' harness: the cell store (round trip, resume only when asked, refusal of cells made otherwise,
naming what differs), the protocol check that a merged table was made the same way, the list flags' parsing, the
flags made from a config's fields and the command that runs an experiment from its flags."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Optional

import pytest

from lorakit.experiments import config_from_args
from lorakit.experiments.harness import (CellStore, add_config_flags, check_same_protocol, flag, parse_names,
                                       parse_rates, parse_seeds, protocol_differences, run_experiment)

PROTOCOL = {"settings": {"max_length": 12, "rank": 2}, "train_config": {"lr": 0.01, "epochs": 2.0}}


def test_a_saved_cell_reads_back_as_saved(tmp_path):
    store = CellStore(tmp_path / "cells", PROTOCOL, resume=True)
    record = {"key": "a", "accuracy": 91.25, "losses": [0.7, 0.5], "rank": (1, 2), **PROTOCOL}
    returned = store.save("a", record)
    assert returned == json.loads(json.dumps(record)) and returned["rank"] == [1, 2]  # as a resumed run sees it
    assert store.load("a") == returned
    assert [p.name for p in (tmp_path / "cells").iterdir()] == ["a.json"]  # no temporary file left behind
    assert store.load("b") is None


def test_a_fresh_run_reads_nothing_back(tmp_path):
    CellStore(tmp_path, PROTOCOL, resume=True).save("a", {"accuracy": 1.0, **PROTOCOL})
    assert CellStore(tmp_path, PROTOCOL, resume=False).load("a") is None


def test_save_without_write_writes_nothing(tmp_path):  # the ranks other than 0 under torchrun
    assert CellStore(tmp_path, PROTOCOL, resume=True).save("a", {"x": 1}, write=False) == {"x": 1}
    assert not list(tmp_path.iterdir())


def test_a_cell_made_otherwise_is_refused_naming_the_fields(tmp_path):
    CellStore(tmp_path, PROTOCOL, resume=True).save("a", {"accuracy": 1.0, **PROTOCOL})
    other = {"settings": {"max_length": 10, "rank": 2}, "train_config": {"lr": 0.01, "epochs": 2.0}}
    with pytest.raises(ValueError, match=r"a\.json was made with other options: settings\.max_length=12 \(now 10\)"):
        CellStore(tmp_path, other, resume=True).load("a")


def test_protocol_differences_both_ways_and_defaults():
    saved = {"protocol": {"steps": 7, "lr": 0.1, "removed": 1}, "rank": 2, "other": "not compared"}
    expected = {"protocol": {"steps": 10, "lr": 0.1}, "rank": 2, "added": "x"}
    assert protocol_differences(saved, expected, defaults={"added": "x"}) == [
        "protocol.steps=7 (now 10)", "protocol.removed=1 (now absent)"]
    assert protocol_differences(saved, expected) == [
        "protocol.steps=7 (now 10)", "protocol.removed=1 (now absent)", "added=None (now 'x')"]


def test_check_same_protocol_compares_as_json(tmp_path):
    check_same_protocol(tmp_path / "results.json", {"ranks": [16, 32]}, {"ranks": (16, 32)})  # a tuple is a list
    with pytest.raises(ValueError, match=r"ranks=\[16\] \(now \[16, 32\]\)"):
        check_same_protocol(tmp_path / "results.json", {"ranks": [16]}, {"ranks": [16, 32]})


def test_parse_names_keeps_the_order_and_names_the_unknown():
    assert parse_names(" lora, full ,", ("full", "lora", "prompt"), "methods") == ["lora", "full"]
    with pytest.raises(ValueError, match=r"unknown or no methods \['prune'\]; choose from full, lora"):
        parse_names("lora,prune", ("full", "lora"), "methods")
    with pytest.raises(ValueError, match="unknown or no methods"):
        parse_names(",", ("full",), "methods")


@pytest.mark.parametrize("text, message", [("1e-3,x", "--lr-lora must be comma-separated numbers"),
                                           ("1e-3,0", "--lr-lora needs positive learning rates"),
                                           ("", "--lr-lora needs positive learning rates")])
def test_parse_rates(text, message):
    assert parse_rates("1e-3, 3e-3", "lora") == [1e-3, 3e-3]
    with pytest.raises(ValueError, match=message):
        parse_rates(text, "lora")


def test_run_experiment_runs_the_config_of_the_flags_into_out(tmp_path, capsys):
    @dataclass
    class Config:
        rank: int = 2

    seen = []
    args = argparse.Namespace(rank=4, out=str(tmp_path / "out"), handler=None)  # flags that are no field are left out
    assert run_experiment(args, Config, "demo", lambda cfg, out: seen.append((cfg, out)) or {}, "results.json") == 0
    assert seen == [(Config(rank=4), tmp_path / "out")]
    assert capsys.readouterr().out == f"wrote {tmp_path / 'out'}/results.json\n"


@dataclass
class _Flags:
    steps: int = 3
    lr: float = 1e-3
    name: str = "a"
    ranks: list[int] = dataclasses.field(default_factory=lambda: [4, 8])
    angles: list[float] = dataclasses.field(default_factory=lambda: [0.0])
    test_size: Optional[int] = None
    data_dir: Optional[str] = None
    resume: bool = False
    train_head: bool = True


@pytest.mark.parametrize("argv, expected", [
    ([], {}),
    (["--steps", "5", "--lr", "0.5", "--name", "b"], {"steps": 5, "lr": 0.5, "name": "b"}),
    (["--ranks", "16,32,", "--angles", "0,22.5"], {"ranks": [16, 32], "angles": [0.0, 22.5]}),
    (["--test-size", "7", "--data-dir", "d"], {"test_size": 7, "data_dir": "d"}),
    (["--resume", "--no-train-head"], {"resume": True, "train_head": False}),
])
def test_config_flags_follow_the_fields_types_and_defaults(argv, expected):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, _Flags(), *[f.name for f in dataclasses.fields(_Flags)])
    assert vars(parser.parse_args(argv)) == {**dataclasses.asdict(_Flags()), **expected}


@pytest.mark.parametrize("argv", [["--steps", "2.5"], ["--ranks", "4,x"], ["--train-head", "1"]])
def test_a_config_flag_of_the_wrong_type_is_refused(argv, capsys):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, _Flags(), "steps", "ranks", "train_head")
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_a_config_flag_for_no_field_is_an_error():
    with pytest.raises(ValueError, match="_Flags has no field 'epochs'"):
        add_config_flags(argparse.ArgumentParser(), _Flags(), "steps", "epochs")


@dataclass
class _Described:
    mode: str = flag("a", "which mode", choices=["a", "b"])
    note: list[str] = flag([], "a line (repeatable)", action="append")
    depth: int = flag(2)


def test_flag_metadata_gives_help_choices_and_actions(capsys):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, _Described())
    assert vars(parser.parse_args(["--note", "x", "--note", "y,z"])) == {"mode": "a", "note": ["x", "y,z"], "depth": 2}
    assert _Described().note == [] and _Described().note is not _Described().note  # one list per config
    assert "which mode" in parser.format_help() and "a line (repeatable)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    assert "invalid choice: 'c'" in capsys.readouterr().err


@dataclass
class _Grids:
    lr: dict[str, str] = flag({"full": "1e-4", "lora": "1e-3,3e-3"}, "{}: rates to sweep")
    out: Optional[str] = None


@pytest.mark.parametrize("argv, expected", [
    ([], {"full": "1e-4", "lora": "1e-3,3e-3"}),
    (["--lr-lora", "0.1"], {"full": "1e-4", "lora": "0.1"}),
    (["--lr-full", "2e-5", "--lr-lora", "1e-2,3e-2"], {"full": "2e-5", "lora": "1e-2,3e-2"}),
])
def test_a_dict_field_is_a_flag_per_key_and_comes_back_as_the_dict(argv, expected, capsys):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, _Grids())
    cfg = config_from_args(_Grids, parser.parse_args(argv))
    assert cfg == _Grids(lr=expected)
    assert _Grids().lr is not _Grids().lr  # one dict per config
    assert "full: rates to sweep" in parser.format_help() and "lora: rates to sweep" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr-prompt", "1"])  # a key the field does not have
    assert "unrecognized arguments: --lr-prompt" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("0,1,2", [0, 1, 2]), ("3", [3]), ("2, 0,", [2, 0])])
def test_parse_seeds_keeps_the_order(text, expected):
    assert parse_seeds(text) == expected


@pytest.mark.parametrize("text, message", [("0,a", "--seeds must be comma-separated integers, got '0,a'"),
                                           ("", "at least one seed"), ("1,1", "none twice")])
def test_parse_seeds_refuses_what_is_not_a_seed_list(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_seeds(text)
