"""peft-compare's models: each row's model, and the shared starting point with PEFT (the data, the split and the
pretrained classifier are :mod:`.text_task`'s).

**Same start.** A lorakit LoRA or prompt row starts from exactly PEFT's initial weights for that seed: PEFT's
freshly initialised model is built, its adapter is saved with ``save_pretrained`` and loaded into the lorakit
model with :func:`lorakit.load_adapter` (LoRA), or its initial prompt (``get_prompt_embedding_to_save``) is
written into a lorakit adapter folder and loaded the same way (prompt). The classifier head is the same in
both because both models are built after ``torch.manual_seed(seed)``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from .. import AdapterConfig, CLoRAConfig, LoRAConfig, PromptConfig, inject, load_adapter, save_adapter
from .._io import save_tensors
from .text_task import BERT_TARGETS, HEAD, pretrained_classifier

ROWS = [("full", "lorakit"), ("lora", "lorakit"), ("lora", "peft"), ("adapter", "lorakit"), ("adapter", "adapters"),
        ("prompt", "lorakit"), ("prompt", "peft"), ("clora", "lorakit")]
IMPLEMENTATIONS = ("lorakit", "peft", "adapters")
LIBRARY = {"lora": "peft", "prompt": "peft", "adapter": "adapters"}  # the library row each method is paired with
# Seed 004 (T5-small on IMDB, 10 epochs, best validation accuracy): hand-written and library numbers.
REFERENCE_004 = {"full": (90.0, None, None), "prompt": (86.8, 87.1, "OpenDelta"), "adapter": (90.6, 90.3, "AdapterHub"),
            "lora": (88.9, 89.0, "PEFT"), "clora": (None, None, None)}
REFERENCE_004_PARAMS = {"full": 60_506_624, "prompt": 5_120, "adapter": 104_544, "lora": 294_912}


# -- one row's model --------------------------------------------------------------------------------
def method_config(method: str, settings: dict):
    """lorakit's config for ``method`` (None for full fine-tuning); the classifier head always trains."""
    if method == "full":
        return None
    if method == "lora":
        return LoRAConfig(rank=settings["rank"], alpha=2.0 * settings["rank"], targets=BERT_TARGETS["lora"],
                          modules_to_save=HEAD)
    if method == "adapter":
        return AdapterConfig(bottleneck=settings["bottleneck"], targets=BERT_TARGETS["adapter"], modules_to_save=HEAD)
    if method == "prompt":
        return PromptConfig(num_tokens=settings["num_tokens"], init="vocab", modules_to_save=HEAD)
    if method == "clora":
        return CLoRAConfig(rank=settings["clora_rank"], alpha=2.0 * settings["clora_rank"],
                           targets=BERT_TARGETS["clora"], modules_to_save=HEAD)
    raise ValueError(f"unknown method {method!r}; known: full, lora, adapter, prompt, clora")


def peft_config(method: str, settings: dict):
    """PEFT's config with the same hyperparameters as :func:`method_config` (SEQ_CLS trains the classifier)."""
    import peft

    if method == "lora":
        return peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=settings["rank"], lora_alpha=2.0 * settings["rank"],
                               lora_dropout=0.0, target_modules=BERT_TARGETS["lora"])
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=settings["num_tokens"],
                                       prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)
    raise ValueError(f"PEFT has no {method!r} row here; PEFT rows: lora, prompt")


def build(method: str, implementation: str, settings: dict, seed: int, *, same_start: bool = False):
    """``(model, tokenizer)`` for one row: the pretrained model, a head seeded by ``seed``, the method applied.

    ``same_start=True`` (lorakit LoRA and prompt rows only): the adapter starts from PEFT's initial weights
    for this seed instead of lorakit's own initialisation (see the module docstring).
    """
    if implementation == "adapters":
        raise ValueError("AdapterHub's row runs in its own environment (peft_compare_adapterhub), not in this process")
    model, tokenizer = pretrained_classifier(settings["model"], settings["num_labels"], seed)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif implementation == "lorakit" and same_start and method in ("lora", "prompt"):
        start_from_peft(model, build(method, "peft", settings, seed)[0], method, settings)
    elif implementation == "lorakit":
        inject(model, method_config(method, settings))
    elif implementation == "peft":
        import peft

        model = peft.get_peft_model(model, peft_config(method, settings))
    else:
        raise ValueError(f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")
    return model, tokenizer


def start_from_peft(model, peft_model, method: str, settings: dict) -> None:
    """Give lorakit's plain ``model`` PEFT's initial adapter and head (the module docstring's *same start*); for
    LoRA, PEFT's config names a 'score' head too, which BERT lacks, so only 'classifier' is wrapped."""
    with tempfile.TemporaryDirectory() as folder:
        if method == "lora":
            peft_model.save_pretrained(folder)
            load_adapter(model, folder)
            return
        if method != "prompt":
            raise ValueError(f"same start is defined for lora and prompt, not {method!r}")
        inject(model, method_config(method, settings))
        save_adapter(model, folder, is_main_process=True)  # lorakit's prompt layout, in this process's own folder
        weights = Path(folder) / "adapter_model.safetensors"
        tensors = load_file(weights)
        key = next(k for k in tensors if k.endswith("prompt_embeddings"))
        initial = peft_model.get_prompt_embedding_to_save("default").detach()
        if initial.shape != tensors[key].shape:
            raise ValueError(f"PEFT's prompt has shape {tuple(initial.shape)}, lorakit's {tuple(tensors[key].shape)}")
        tensors[key] = initial.to(tensors[key].dtype).contiguous()
        save_file(tensors, weights, metadata={"format": "pt"})
        load_adapter(model, folder)


def checkpoint_bytes(model, method: str, implementation: str) -> int:
    """Bytes on disk of what this row must store: the adapter (+ head), or the whole model for full fine-tuning."""
    with tempfile.TemporaryDirectory() as folder:
        if method == "full":
            save_tensors(Path(folder) / "model.safetensors", dict(model.state_dict()))
        elif implementation == "lorakit":
            save_adapter(model, folder, is_main_process=True)  # this process's own folder
        else:
            model.save_pretrained(folder)
        return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
