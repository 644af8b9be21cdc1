"""Soft prompt tuning: ``num_tokens`` trainable embeddings prepended to a Hugging Face model's input.

A call ``model(input_ids=..., attention_mask=..., labels=...)`` becomes, inside a forward pre-hook,
``model(inputs_embeds=cat(P, E[input_ids]), attention_mask=cat(1, mask), ...)`` with ``P`` the active
prompt, of shape (num_tokens, d). Along the sequence axis it also extends ``token_type_ids`` (zeros),
``position_ids`` (the prompt takes positions 0..n-1, the text is shifted by n) and, for token-level labels
of a decoder or encoder model, ``labels`` (-100, ignored by the loss). Encoder-decoder models get the prompt
on the encoder side only; their ``labels`` belong to the decoder and are left alone.

The prompts live in one :class:`SoftPrompt` module attached to the model as ``model.lorakit_prompt``; it
follows the same adapter protocol as the wrapper layers (named adapters, ``set_active``, ``disabled``,
``adapter_parameters``), so counting, saving, loading and deleting work as for LoRA. Only direct forward
calls are prompted (``generate`` of an encoder-decoder calls the encoder on its own and is not covered).

Under a decoder's ``generate()`` the first call (its cache empty) gets the prompt; later calls find the prompt's
n positions in the KV cache, so they get no prompt, and their positions (``position_ids``, ``cache_position``)
move n places right and their attention mask gains n leading ones. With the cache, without it, and a
full-sequence loop then give the same tokens, and a left-padded batch gives each row's tokens alone.
Checkpoints are PEFT's prompt-tuning files (``peft_type: PROMPT_TUNING``, one ``prompt_embeddings`` tensor),
read and written; lorakit's own layout (``LORAKIT_PROMPTCONFIG``) remains for what PEFT would compute otherwise
(``modules_to_save``, encoder-decoder models).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..config import PromptConfig

ATTRIBUTE = "lorakit_prompt"
# Arguments whose second axis is the input sequence, and the value the prompt positions get.
_SEQUENCE_ARGUMENTS = {"attention_mask": 1, "token_type_ids": 0}


class SoftPrompt(nn.Module):
    """Named soft prompts (num_tokens, d) and the pre-hook that prepends the active one."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.prompts = nn.ParameterDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self._handle = None
        self._signature: inspect.Signature | None = None

    # -- the adapter protocol ---------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.prompts)

    def add_adapter(self, name: str, cfg: PromptConfig, embedding: nn.Embedding) -> None:
        weight = embedding.weight.detach()
        prompt = torch.empty(cfg.num_tokens, self.embedding_dim, device=weight.device, dtype=weight.dtype)
        if weight.is_meta:  # a meta twin (checking a file against the model): shapes only, no values
            pass
        elif cfg.init == "vocab":  # copies of randomly drawn vocabulary rows (PEFT's SAMPLE_VOCAB)
            rows = torch.randint(0, weight.shape[0], (cfg.num_tokens,), device=weight.device)
            prompt.copy_(weight[rows])
        elif cfg.init == "text":  # the text's token embeddings, repeated or cut to num_tokens (PEFT's TEXT)
            prompt.copy_(weight[text_token_ids(cfg).to(weight.device)])
        else:  # Gaussian at the vocabulary's scale, so the prompt looks like embedded text to layer 0
            prompt.normal_(0.0, float(weight.float().std()))
        self.prompts[name] = nn.Parameter(prompt)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        del self.prompts[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        return list(self.prompts.values()) if name is None else [self.prompts[name]]

    def check_mergeable(self) -> None:
        if self.active_adapter is not None:
            raise ValueError("a soft prompt cannot be merged into weights: it adds input positions, not a weight "
                             "change. Keep it, or take it out with lorakit.unload(model, merge=False)")

    def merge(self) -> None:
        self.check_mergeable()

    def unmerge(self) -> None:
        pass

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompts[name]}

    # -- attaching to a model -----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self._signature = inspect.signature(model.forward)
        self._handle = model.register_forward_pre_hook(self.prepend, with_kwargs=True)

    def detach_from(self, model: nn.Module, path: str) -> None:
        """Take the hook and this module off ``model`` (when its last prompt is deleted or unloaded)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        delattr(model, path)

    def prepend(self, model: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook: ``input_ids`` (B, T) -> ``inputs_embeds`` (B, n + T, d) with the prompt first."""
        if self.active_adapter is None or self.disabled:
            return None
        if args:  # positional arguments: name them, so every input is handled the same way
            names = [p.name for p in self._signature.parameters.values()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if len(args) > len(names):
                raise TypeError(f"{type(model).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
            kwargs = {**dict(zip(names, args)), **kwargs}
            args = ()
        n = self.prompts[self.active_adapter].shape[0]
        if cached_length(kwargs) > 0:  # a decoding step: the prompt's n positions are already in the cache
            _shift_positions(kwargs, n, prefix=False)
            mask = kwargs.get("attention_mask")
            if mask is not None:  # the caller's mask covers its own tokens only, the cache also holds the prompt
                kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
            return (args, kwargs)
        embeds = kwargs.pop("inputs_embeds", None)
        input_ids = kwargs.pop("input_ids", None)
        if embeds is None:
            if input_ids is None:
                raise ValueError("a soft-prompted model needs input_ids or inputs_embeds")
            embeds = model.get_input_embeddings()(input_ids)  # (B, T, d)
        batch, length = embeds.shape[:2]
        prompt = self.prompts[self.active_adapter]
        kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
        for key, fill in _SEQUENCE_ARGUMENTS.items():
            value = kwargs.get(key)  # no attention_mask stays none: every position, the prompt's too, is attended
            if value is not None:
                kwargs[key] = torch.cat([value.new_full((batch, n), fill), value], dim=1)
        _shift_positions(kwargs, n, prefix=True)
        labels = kwargs.get("labels")
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        if labels is not None and not encoder_decoder and labels.dim() >= 2 and labels.shape[1] == length:
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        return (args, kwargs)

    def extra_repr(self) -> str:
        shapes = {name: tuple(p.shape) for name, p in self.prompts.items()}
        return f"prompts={shapes}, active={self.active_adapter}"


def text_token_ids(cfg: PromptConfig) -> torch.Tensor:
    """``cfg.init_text`` tokenized by ``cfg.tokenizer`` (transformers' AutoTokenizer, special tokens included, as
    PEFT does), repeated or cut to ``cfg.num_tokens`` ids."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("PromptConfig(init='text') tokenizes init_text with transformers: "
                          "pip install transformers") from None
    ids = AutoTokenizer.from_pretrained(cfg.tokenizer)(cfg.init_text)["input_ids"]
    if not ids:
        raise ValueError(f"init_text={cfg.init_text!r} gives no tokens; expected a text with at least one token")
    repeats = -(-cfg.num_tokens // len(ids))
    return torch.tensor((ids * repeats)[: cfg.num_tokens], dtype=torch.long)


def cached_length(kwargs: dict) -> int:
    """How many positions the KV cache of this call already holds (0: the first step, or no cache).

    transformers passes the cache as ``past_key_values`` (older versions, a tuple of per-layer (k, v)) or as
    ``cache`` (5.x); an empty cache object comes with the first step of ``generate()``, so a cached step is one
    whose cache is non-empty, not one that has a cache argument.
    """
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])  # legacy tuple: (batch, heads, length, head_dim) keys
    return 0


def _shift_positions(kwargs: dict, n: int, prefix: bool) -> None:
    """Text positions move n places right; with ``prefix`` the prompt takes positions 0..n-1 before them."""
    for key in ("position_ids", "cache_position"):
        positions = kwargs.get(key)
        if positions is None:
            continue
        shifted = positions + n
        if prefix:
            start = torch.arange(n, device=positions.device, dtype=positions.dtype)
            shifted = torch.cat([start.expand(*positions.shape[:-1], n), shifted], dim=-1)
        kwargs[key] = shifted


def inject_prompt(model: nn.Module, cfg: PromptConfig, name: str) -> None:
    """``inject`` hook for :class:`PromptConfig`: checks the model takes ``inputs_embeds``, then adds a prompt."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    embedding = getattr(embedding, "base_layer", embedding)  # a LoRA-wrapped embedding: its table gives d and inits
    try:
        takes_embeds = "inputs_embeds" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_embeds = False
    if not takes_embeds or not isinstance(embedding, nn.Embedding):
        raise ValueError(
            f"a soft prompt needs a model whose forward takes inputs_embeds and which has get_input_embeddings() "
            f"(a Hugging Face model); {type(model).__name__} "
            + ("has no inputs_embeds argument" if not takes_embeds else "has no input embedding layer"))
    prompt = getattr(model, ATTRIBUTE, None)
    if prompt is None:
        prompt = SoftPrompt(embedding.embedding_dim)
        prompt.add_adapter(name, cfg, embedding)
        setattr(model, ATTRIBUTE, prompt)
        prompt.attach(model)
    else:
        prompt.add_adapter(name, cfg, embedding)
