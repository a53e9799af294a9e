"""MODEL's tokenizer, checked before the weights load: a damaged one is an error naming its file, a
missing one an error only where text must be turned into tokens (a weights-only folder is still
prunable)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from ..errors import UsageError, first_line
from .formats import _own_config
from .sources import local_folder


# Files a Hugging Face tokenizer is saved as; one of them present means the folder has a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "special_tokens_map.json", "added_tokens.json")


def check_tokenizer(source: str, trust_remote_code: bool = False, needed: bool = False) -> bool:
    """Before the model loads: MODEL's tokenizer reads (a damaged one is an error naming its file) and,
    when ``needed`` (text to tokenize), exists. Returns whether MODEL has one; True where that is known
    only once loaded (a GGUF's, a hub repo's, a shortcut not built yet)."""
    folder = local_folder(source)
    if folder is None:
        return True
    if _try_tokenizer(folder, trust_remote_code) is not None:
        return True
    if needed:
        raise UsageError(
            f"{source} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}), so no text can be turned into "
            "tokens; copy the tokenizer files of the model it came from into it"
        )
    return False


def _try_tokenizer(folder: Path, trust_remote_code: bool = False):
    """The folder's tokenizer, or None when it has none (a weights-only folder is still prunable).

    A tokenizer whose files are there but do not read is an error, never None: saving OUT without it,
    or calling it missing, would hide a damaged input.
    """
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    for name in present:
        if name.endswith(".json"):
            try:
                json.loads((folder / name).read_bytes())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UsageError(
                    f"the tokenizer of {folder} is damaged: {name} is not valid JSON ({first_line(exc)}); restore "
                    "it, or copy the tokenizer files of the model it came from"
                ) from None
    own = _own_config(folder)
    given = {"config": own} if own is not None else {}  # a config transformers cannot read alone (block_configs)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **given)
    except Exception as exc:
        if not present:
            return None
        raise UsageError(
            f"the tokenizer of {folder} could not be read ({first_line(exc)}); restore its files, or copy the "
            "tokenizer files of the model it came from"
        ) from exc
