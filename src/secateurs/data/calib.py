"""Seeded calibration windows: ``n_samples`` sequences of exactly ``seq_len`` tokens.

As in SparseGPT and Wanda, each window starts at a random offset of the tokenized training text;
the offsets come from a generator seeded with ``seed``, so the same arguments give the same tokens.
``source='self'`` asks the model to write its own calibration text (data-free, as in LLM-QAT),
also seeded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import UsageError
from ..progress import track
from .config import CalibConfig
from .sources import load_text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a long text as one 1-D tensor (no length warning: we cut windows ourselves)."""
    if tokenizer is None:
        raise UsageError("this model folder has no tokenizer; add one to use text data")
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def random_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int, what: str) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at seeded random offsets of ``ids``: shape (n, seq_len)."""
    if ids.numel() < seq_len + 1:
        raise UsageError(
            f"{what} has {ids.numel()} tokens, fewer than --seq-len {seq_len} + 1; "
            "use a shorter --seq-len or more text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def self_generated(model, tokenizer, n: int, seq_len: int, seed: int, batch_size: int = 16) -> torch.Tensor:
    """Text the model samples itself from a random first token (seeded): shape (n, seq_len)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    bos = getattr(model.config, "bos_token_id", None)
    out = []
    for start in track(range(0, n, batch_size), "generating calibration text", total=-(-n // batch_size)):
        size = min(batch_size, n - start)
        first = torch.randint(0, vocab, (size, 1), generator=generator)
        prompt = first if bos is None else torch.cat([torch.full((size, 1), bos), first], dim=1)
        torch.manual_seed(seed + start)
        with torch.no_grad():
            tokens = model.generate(
                prompt.to(device),
                attention_mask=torch.ones_like(prompt, device=device),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                min_new_tokens=seq_len - prompt.shape[1],
                max_new_tokens=seq_len - prompt.shape[1],
                pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0,
            )
        out.append(tokens[:, :seq_len].cpu())
    return torch.cat(out)


def calibration_ids(
    config: CalibConfig, tokenizer, model=None
) -> torch.Tensor:
    """The calibration token windows described by ``config``: shape (n_samples, seq_len)."""
    config.validate()
    if config.source == "self":
        if model is None:
            raise UsageError("calibration source 'self' needs the model to generate text")
        return self_generated(model, tokenizer, config.n_samples, config.seq_len, config.seed)
    text = load_text(config.source, "train", config.data_dir)
    ids = tokenize(tokenizer, text)
    name = config.source if not Path(config.source).suffix else f"data file {config.source}"
    return random_windows(ids, config.n_samples, config.seq_len, config.seed, name)
