"""``lorakit run llm-compare`` on a tiny random Llama folder and real WordNet glosses (two classes, a few examples):
it runs end to end and writes its report, resume trains nothing again, lorakit's and PEFT's loss traces agree from
the same start, a changed setting is refused on resume, and the score is exact match of the generation."""
import json

import pytest

from lorakit.cli import main
from lorakit.data.text import WORDNET_NOUNS
from lorakit.experiments import finetune, llm_compare_cells, llm_compare_timing
from lorakit.experiments.llm_compare_task import (common_prefix, exact_match, generate_answers, instruction,
                                                  stratified_subset)
from tiny_llama import write_tiny_llama

pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(not WORDNET_NOUNS.is_file(), reason="WordNet (wordnet-base) is not installed")
SIZE = dict(hidden_size=64, intermediate_size=128, initializer_range=0.2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llmc") / "llama", seed=3, **SIZE)


def args(llama, out, *extra):
    return ["run", "llm-compare", "--model", str(llama), "--classes", "noun.animal,noun.plant", "--per-class-train",
            "6", "--per-class-val", "2", "--test-size", "4", "--seeds", "0,1", "--steps", "3", "--batch-size", "2",
            "--max-length", "128", "--threads", "1", "--lr-lora", "1e-3,1e-2", "--lr-dora", "1e-3", "--lr-qlora", "1e-3",
            "--lr-prompt", "1e-2", "--lr-adapter", "1e-3", "--lr-full", "1e-4", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def run(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("llmc") / "run"
    assert main(args(llama, out)) == 0
    return out


def test_the_whole_experiment_writes_its_report_with_every_row(run):
    results = json.loads((run / "results.json").read_text())
    rows = {(s["method"], s["implementation"]) for s in results["summary"]}
    assert rows == set(llm_compare_cells.ROWS)
    assert {p.name for p in run.iterdir()} >= {"results.json", "report.md", "accuracy_vs_params.png",
                                               "loss_traces.png"}
    assert results["test_size"] == 4 and results["data"]["test_per_class"] == [2, 2]
    assert [s["chosen"] for s in results["sweep"] if s["method"] == "lora"].count(True) == 1
    assert all(len(s["examples"]) == 4 for s in results["summary"])  # five at most; four test examples here
    assert next(s for s in results["summary"] if s["method"] == "lora" and s["implementation"] == "lorakit")[
        "step_time_ratio"] == pytest.approx(1.0)
    timed = results["step_times"]
    assert timed["rounds"] == 5 and {(t["method"], t["implementation"]) for t in timed["rows"]} == rows - {
        ("zero-shot", "base")}
    assert all(t["median_seconds"] > 0 and t["ratio"] > 0 for t in timed["rows"])
    report = (run / "report.md").read_text()
    assert "AdapterHub" in report and "Seed 004's ordering" in report
    assert {(d["method"], d["n"]) for d in results["differences"]} == {("lora", 2), ("dora", 2), ("qlora", 2),
                                                                         ("prompt", 2)}
    assert [(c["method"], c["against"], c["n"]) for c in results["contrasts"]] == [("dora", "lora", 2)]
    assert "dora - lora:" in report


def test_lorakit_and_peft_follow_the_same_loss_trace_from_the_same_start(run):
    results = json.loads((run / "results.json").read_text())
    found = {e["method"]: e for e in results["equivalence"]}
    assert found["lora"]["steps"] == 3 and found["lora"]["seeds"] == [0, 1]
    assert found["lora"]["max_abs_loss_diff"] <= 1e-4
    assert found["prompt"]["max_abs_loss_diff"] <= 1e-4
    assert found["qlora"]["max_rel_loss_diff"] <= 1e-3


def test_resume_trains_and_scores_nothing_again(run, llama, monkeypatch):
    calls = []
    monkeypatch.setattr(finetune, "run_finetune", lambda cfg: calls.append(cfg) or {})
    monkeypatch.setattr(llm_compare_cells, "train_peft", lambda cfg: calls.append(cfg) or {})
    monkeypatch.setattr(llm_compare_cells, "score", lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(llm_compare_timing, "step_times", lambda *a: calls.append(a) or {})
    before = (run / "results.json").read_text()
    assert main(args(llama, run, "--resume")) == 0
    assert calls == []
    assert json.loads((run / "results.json").read_text())["summary"] == json.loads(before)["summary"]


def test_resume_with_a_changed_setting_is_refused_naming_it(run, llama, capsys):
    assert main([*args(llama, run, "--resume"), "--steps", "4"]) == 1
    assert "steps=3 (now 4)" in capsys.readouterr().err


def test_negative_timing_rounds_are_refused_before_anything_runs(llama, tmp_path, capsys):
    assert main([*args(llama, tmp_path / "out"), "--timing-rounds", "-1"]) == 1
    assert "--timing-rounds must be 0" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_second_run_into_a_finished_folder_needs_resume(run, llama, capsys):
    assert main(args(llama, run)) == 1
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("generated, answer, right", [
    ("noun.animal", "noun.animal", True), ("  noun.animal\n", "noun.animal", True),
    ("noun.animals", "noun.animal", False), ("Noun.animal", "noun.animal", False),
    ("noun.animal.", "noun.animal", False), ("noun.animal noun.plant", "noun.animal", False),
    ("", "noun.animal", False),
])
def test_the_score_is_exact_match_after_stripping_white_space(generated, answer, right):
    assert exact_match(generated, answer) is right


def test_the_instruction_gives_the_word_its_definition_and_only_the_zero_shot_row_the_categories():
    example = 'cat: feline mammal usually having thick soft fur; "cats purr"'
    for choices in (False, True):
        text = instruction(example, ["noun.animal", "noun.plant"], choices)
        assert "Word: cat\nGloss: feline mammal usually having thick soft fur" in text and "cats purr" not in text
        assert ("noun.animal, noun.plant" in text) is choices


@pytest.mark.parametrize("sequences, prefix", [
    ([[1, 2, 3, 4], [1, 2, 3, 5, 6]], [1, 2]),  # one token less than shared: the shorter still has two of its own
    ([[1, 2, 3], [1, 2, 3]], [1, 2]),
    ([[1, 2], [3, 4]], []),
    ([[7]], []),
])
def test_the_shared_prefix_leaves_every_prompt_a_token_of_its_own(sequences, prefix):
    assert common_prefix(sequences) == prefix


@pytest.mark.parametrize("implementation", ["base", "lorakit", "peft"])
def test_generation_from_a_shared_prefix_equals_generation_of_each_whole_prompt(implementation):
    """Prompts of different lengths after a common start, in a batch: the cached start, middle padding and the
    positions counted from the mask give each prompt the greedy answer it gets alone (and left-padded)."""
    import torch

    import lorakit as lk
    from tiny_llama import tiny_llama, tiny_tokenizer

    model, tokenizer = tiny_llama(seed=5, initializer_range=0.5), tiny_tokenizer()
    if implementation == "lorakit":
        model = lk.inject(model, lk.LoRAConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    elif implementation == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                           init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    prompts = ["w1 w2 w3 w4", "w1 w2 w3 w9 w10 w11 w12", "w1 w2 w3 w20 w21", "w1 w2 w3 w30"]
    alone = [generate_answers(model, tokenizer, [p], 5, share_prefix=False)[0] for p in prompts]
    assert len(set(alone)) > 1  # the prompts' own tokens matter, so a wrong position or mask would show
    assert generate_answers(model, tokenizer, prompts, 5, batch_size=3, share_prefix=False) == alone
    assert generate_answers(model, tokenizer, prompts, 5, batch_size=3, share_prefix=True) == alone


def test_the_test_subset_is_stratified_and_in_data_order():
    from lorakit.data.text import TextDataset

    data = TextDataset([f"t{i}" for i in range(9)], [0, 1, 0, 0, 1, 1, 0, 1, 1], ["a", "b"])
    assert stratified_subset(data, 4).texts == ["t0", "t1", "t2", "t4"]
    assert stratified_subset(data, None) is data
    with pytest.raises(ValueError, match="one example per class"):
        stratified_subset(data, 1)
