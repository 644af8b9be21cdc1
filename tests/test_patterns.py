"""Per-layer ranks and alphas (``rank_pattern`` / ``alpha_pattern``) and block selection (``layers_to_transform`` /
``layers_pattern``), checked against PEFT's own matching functions on tables of module paths; PEFT's files with
these settings load both ways in tests/test_peft_fields.py."""
from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

import lorakit as lk
from lorakit.targets import in_blocks
from tiny_llama import tiny_llama, token_batch

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]

PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
         "model.layers.11.mlp.down_proj", "model.layers.1.mlp.experts.0.down_proj", "lm_head", "q_proj",
         "encoder.h.2.attn.c_attn", "decoder.block.3.layer.0.q"]
PATTERNS = [{"q_proj": 4}, {"layers.0.self_attn.q_proj": 2}, {r"model\.layers\.1\..*": 3}, {"proj": 5},
            {"down_proj": 6, "layers.11.mlp.down_proj": 7}, {"^q_proj": 8}, {"c_attn|q": 9}, {}]


@pytest.mark.parametrize("pattern", PATTERNS, ids=[str(p) for p in PATTERNS])
@pytest.mark.parametrize("path", PATHS)
def test_a_layer_s_rank_and_alpha_follow_peft_s_pattern_rule(pattern, path):
    cfg = lk.LoRAConfig(rank=1, alpha=1.0, rank_pattern=pattern, alpha_pattern=pattern)
    key = get_pattern_key(pattern.keys(), path)
    assert cfg.for_layer(path).rank == pattern.get(key, 1)
    assert cfg.for_layer(path).alpha == pattern.get(key, 1.0)


BLOCKS = [(0, None), ([1, 11], None), ([0], "layers"), (2, ["h", "layers"]), ([3], "block"), ([1], "experts")]


@pytest.mark.parametrize("layers, layers_pattern", BLOCKS, ids=[str(b) for b in BLOCKS])
@pytest.mark.parametrize("targets", [["q_proj", "down_proj", "c_attn", "q"], ["lm_head", "model.layers.1.self_attn.q_proj", "q_proj"]])
def test_block_selection_keeps_what_peft_keeps(layers, layers_pattern, targets):
    reference = peft.LoraConfig(target_modules=targets, layers_to_transform=layers, layers_pattern=layers_pattern)
    cfg = lk.LoRAConfig(targets=targets, layers_to_transform=layers, layers_pattern=layers_pattern)
    named = [p for p in PATHS if any(p == t or p.endswith("." + t) for t in targets)]
    peft_kept = [p for p in named if check_target_module_exists(reference, p)]
    if not peft_kept:
        with pytest.raises(ValueError, match="keeps none of the"):
            in_blocks(named, cfg)
        return
    assert in_blocks(named, cfg) == peft_kept


def test_inject_gives_each_layer_its_pattern_s_rank_and_scale():
    model = lk.inject(tiny_llama(), lk.LoRAConfig(rank=2, alpha=4.0, targets=["q_proj", "v_proj"],
                                                  rank_pattern={"v_proj": 6}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 1.0},
                                                  layers_to_transform=[1]))
    layers = model.model.layers
    assert not hasattr(layers[0].self_attn.q_proj, "lora_A"), "block 0 is left out"
    assert layers[1].self_attn.v_proj.lora_A["default"].weight.shape[0] == 6
    assert layers[1].self_attn.q_proj.lora_A["default"].weight.shape[0] == 2
    assert layers[1].self_attn.q_proj.scaling["default"] == 0.5 and layers[1].self_attn.v_proj.scaling["default"] == 4 / 6
    count = lk.count_parameters(model).adapter
    assert count == lk.params.lora_added_parameters(tiny_llama(), model.lorakit_configs["default"])


def assert_rows_match_alone(model, names: list) -> None:
    """Random factors; then each row of a mixed batch equals that row alone with its adapter (None: the base)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    ids = token_batch(len(names), 5)
    with torch.no_grad(), lk.mixed_batch(model, names):
        mixed = model(ids).logits
    with torch.no_grad():
        for i, name in enumerate(names):
            if name is None:
                with lk.disabled(model):
                    alone = model(ids[i:i + 1]).logits
            else:
                lk.set_active(model, name)
                alone = model(ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=0)


def test_adapters_of_other_ranks_per_layer_share_a_mixed_batch():
    model = tiny_llama()
    lk.inject(model, lk.LoRAConfig(rank=2, targets="all-linear", rank_pattern={"o_proj": 5}), name="a")
    lk.inject(model, lk.LoRAConfig(rank=3, targets=["o_proj"], rank_pattern={"layers.0.self_attn.o_proj": 1}), name="b")
    assert_rows_match_alone(model, ["a", "b", None])


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(rank_pattern={"q": 0}), ValueError, r"rank_pattern\['q'\]=0 is out of range"),
    (dict(rank_pattern=["q"]), TypeError, "is not a pattern dict"),
    (dict(rank_pattern={"(": 2}), ValueError, "is not a valid regular expression"),
    (dict(alpha_pattern={"q": "8"}), TypeError, r"alpha_pattern\['q'\]='8' is not a number"),
    (dict(layers_to_transform=[-1]), TypeError, "is not a block index"),
    (dict(layers_to_transform=True), TypeError, "is not a block index"),
    (dict(layers_pattern="layers"), ValueError, "without layers_to_transform selects nothing"),
    (dict(layers_to_transform=0, layers_pattern=3), TypeError, "is not a name or a list of names"),
    (dict(layers_to_transform=0, targets=r".*q_proj"), ValueError, "a regex already says which blocks"),
])
def test_bad_patterns_are_refused_by_name(kwargs, error, words):
    with pytest.raises(error, match=words):
        lk.LoRAConfig(**kwargs)


def test_lora_bias_merges_into_the_layer_bias_and_runs_in_mixed_batches():
    model = tiny_llama()
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["o_proj"], lora_bias=True), name="b")
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["o_proj"]), name="plain")
    with pytest.raises(ValueError, match="lora_bias=True, but its layer has no bias"):
        lk.set_active(model, "b")
        lk.merge(model)  # Llama's projections have no bias
    assert_rows_match_alone(model, ["b", "plain", None])
    net = lk.inject(torch.nn.Sequential(torch.nn.Linear(4, 3)), lk.LoRAConfig(rank=1, targets=["0"], lora_bias=True))
    with torch.no_grad():
        net[0].lora_B["default"].bias.fill_(0.5)
        x = torch.randn(2, 4)
        adapted, bias = net(x), net[0].base_layer.bias.clone()
        lk.merge(net)
        torch.testing.assert_close(net[0].base_layer.bias, bias + 0.5 * net[0].scaling["default"])
        torch.testing.assert_close(net(x), adapted)
        lk.unmerge(net)
        torch.testing.assert_close(net[0].base_layer.bias, bias)
