"""Synthetic long-context text for calibration and evaluation: a deterministic English-ish corpus from the
standard library's docstrings, and passkey-retrieval prompts with the needle at a chosen depth."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidRequestError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"
# context tokens a passkey sample's answer takes after its prompt (" 71432." and more), which is at most its length
ANSWER_ROOM = 16

# Prose-rich standard-library modules, in a fixed order: their docstrings make a long English-ish text.
CORPUS_MODULES = (
    "argparse", "collections", "difflib", "json", "logging", "email", "decimal", "doctest", "unittest",
    "pickle", "threading", "subprocess", "pathlib", "typing", "dataclasses", "functools", "itertools", "re",
    "string", "random", "statistics", "heapq", "bisect", "contextlib", "abc", "asyncio", "calendar",
    "datetime", "fractions", "shutil", "tarfile", "zipfile", "csv", "configparser", "sqlite3",
    "urllib.parse", "socket", "ssl", "tempfile", "glob", "fnmatch", "inspect", "pdb", "enum", "copy",
    "pprint", "weakref", "queue", "sched", "struct", "codecs", "locale", "gettext", "optparse", "getopt",
    "io", "time", "uuid", "hashlib", "hmac", "secrets", "base64", "zlib", "gzip", "bz2", "lzma",
    "traceback", "warnings", "ast", "dis", "tokenize", "operator", "numbers", "math", "types", "mailbox",
    "mimetypes", "smtplib", "imaplib", "ftplib", "poplib", "wave", "colorsys", "cmd", "shlex",
)  # fmt: skip


def corpus_text(min_chars: int = 0) -> str:
    """Deterministic long English-ish text: module docstrings of the standard library, then its LICENSE.

    The same Python version gives the same text; stops once `min_chars` characters are reached (0: all).
    """
    parts: list[str] = []
    n = 0
    for name in CORPUS_MODULES:
        try:
            doc = inspect.getdoc(importlib.import_module(name))
        except Exception:  # noqa: BLE001 - a missing optional module just contributes nothing
            doc = None
        if doc:
            parts.append(doc.strip() + "\n\n")
            n += len(parts[-1])
            if min_chars and n >= min_chars:
                return "".join(parts)
    lic = Path(inspect.getfile(inspect)).with_name("LICENSE.txt")
    if lic.is_file():
        parts.append(lic.read_text(errors="replace"))
    return "".join(parts)


@dataclass
class PasskeySample:
    """A passkey prompt (token ids), the expected answer tokens and where the needle sits."""

    prompt_ids: list[int]
    answer_ids: list[int]
    passkey: str
    depth: float
    needle_pos: int  # token index of the needle's first token

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)


def _sentence_cuts(tokenizer, ids: list[int]) -> np.ndarray:
    """Token indices just after a sentence or line end (good places to cut or insert)."""
    ends = [i + 1 for i, t in enumerate(ids) if tokenizer.decode([t]).rstrip(" ").endswith((".", "\n"))]
    return np.asarray(ends or [len(ids)])


def passkey_sample(
    tokenizer,
    num_tokens: int,
    depth: float,
    passkey: str,
    filler: str = "classic",
    offset: int = 0,
) -> PasskeySample:
    """A passkey-retrieval prompt of about `num_tokens` tokens with the needle at `depth` of the filler.

    filler "classic" repeats the grass/sky/sun sentences (the usual passkey test); "corpus" takes
    `corpus_text()` from character `offset`. Cuts happen after sentence ends, so lengths are approximate
    (within a sentence). The answer is " <passkey>." (the period too: stopping after the key is part of
    retrieving it).
    """
    intro = tokenizer.encode(INTRO)
    needle = tokenizer.encode(f" The pass key is {passkey}. Remember it. {passkey} is the pass key.", False)
    question = tokenizer.encode(QUESTION, False)
    answer = tokenizer.encode(f" {passkey}.", False)
    budget = num_tokens - len(intro) - len(needle) - len(question)
    if budget < 16:
        raise InvalidRequestError(f"passkey sample of {num_tokens} tokens is too short")
    if filler == "classic":
        text = FILLER * (budget // 8 + 2)
    elif filler == "corpus":
        corpus = corpus_text()
        need = budget * 6 + 1000
        text = (corpus * (1 + (offset + need) // max(1, len(corpus))))[offset : offset + need]
        text = text[text.find(" ") + 1 :]  # start at a word
    else:
        raise ValueError(f"unknown filler {filler!r}")
    fill = tokenizer.encode(text, False)
    cuts = _sentence_cuts(tokenizer, fill[: budget + 64])
    end = int(cuts[cuts <= budget].max()) if np.any(cuts <= budget) else budget
    if end < budget - 32:  # no sentence end near the budget: cut at a token
        end = budget
    fill = fill[:end]
    cuts = np.r_[cuts[cuts <= end], 0, end]
    at = int(cuts[np.abs(cuts - depth * end).argmin()]) if depth > 0 else 0
    prompt = intro + fill[:at] + needle + fill[at:] + question
    return PasskeySample(prompt, answer, passkey, depth, len(intro) + at)
