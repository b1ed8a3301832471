"""RULER-style synthetic long-context tasks (Hsieh et al. 2024), generated offline from a seed.

Each task builds prompts of about `num_tokens` tokens for any tokenizer: filler text (the classic
grass/sky/sun lines, or `corpus_text()`), the items to find inserted at sentence ends at chosen depths, and
a question that ends where the answer starts (completion style, so base and instruct models answer
alike). A sample's score is the fraction of its expected strings found in the generated text (whole
words, case-insensitive: RULER's string_match_all); it is correct when that fraction is 1.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidRequestError
from .synthetic import FILLER, _sentence_cuts, corpus_text

WORDS = (
    "apple river candle forest window garden silver pepper marble rocket violin thunder ladder castle "
    "pencil orange jacket harbor meadow lantern falcon copper blanket canyon dragon engine feather glacier "
    "hammer island jungle kettle lemon magnet needle oyster parrot quartz rabbit saddle tiger umbrella "
    "valley walnut yellow zebra anchor basket cactus dolphin emerald fountain guitar helmet igloo jasmine "
    "koala ladle mirror nutmeg orchid panda quiver raven spider tulip unicorn velvet wagon beacon cobalt "
    "desert ember fabric goblet hazel ivory juniper kernel lobster mango nectar olive pebble quill ribbon "
    "sapphire timber urchin vessel willow badger cherry donkey eagle ferret gopher heron iguana jaguar "
    "lizard mantis newt otter pelican salmon turtle walrus bamboo clover daisy fern ginger hemlock iris"
).split()

SYLLABLES = "ka lo mi ra ven tor sel da bri nor fa gel hu pim qua ros tal vek wyn zor ba cel dun".split()
EXPORTS = "copper wool salt timber glass silk amber coffee iron tea cotton marble".split()
RIVERS = "Aldra Brenn Corvus Dalmer Esk Fallow Garrow Hesper Isen Jorva Kell Lune".split()

INTRO = (
    "Read the following text carefully and remember the facts hidden in it. You will be asked about them.\n"
)


@dataclass
class Sample:
    """One prompt: token ids, the strings a correct answer contains, and a decode budget."""

    task: str
    prompt_ids: list[int]
    expected: list[str]
    max_new: int
    info: dict = field(default_factory=dict)
    stop: tuple[str, ...] = (".", "\n")  # generation ends at a token that is one of these

    def score(self, text: str) -> float:
        """Fraction of expected strings present in `text` as whole words (case-insensitive)."""
        return float(np.mean([_found(e, text) for e in self.expected]))

    def correct(self, text: str) -> bool:
        return self.score(text) == 1.0


def _found(needle: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(needle)}(?![\w-])", text, re.IGNORECASE) is not None


# values ---------------------------------------------------------------------------------------------------
def _value(kind: str, rng: np.random.Generator) -> str:
    if kind == "numbers":
        return str(rng.integers(1_000_000, 10_000_000))
    if kind == "words":
        a, b = rng.choice(len(WORDS), 2, replace=False)
        return f"{WORDS[a]}-{WORDS[b]}"
    if kind == "uuids":
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    raise ValueError(f"unknown value kind {kind!r}")


def _name(rng: np.random.Generator, syllables: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES, syllables)).capitalize()


def _keys(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct word keys (e.g. 'silver-falcon')."""
    keys: set[str] = set()
    while len(keys) < n:
        keys.add(_value("words", rng))
    ordered = sorted(keys)  # a set's order follows the process's string hashing: fix it before shuffling
    return [ordered[i] for i in rng.permutation(n)]


# haystack -------------------------------------------------------------------------------------------------
def _filler_ids(tok, budget: int, filler: str, rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
    """About `budget` filler tokens cut at a sentence end, and the sentence-end cut points in them."""
    if filler == "classic":
        text = FILLER * (budget // 8 + 2)
    elif filler == "corpus":
        corpus = corpus_text()
        off = int(rng.integers(0, len(corpus)))
        need = budget * 6 + 1000
        text = (corpus * (2 + need // max(1, len(corpus))))[off : off + need]
        text = text[text.find(" ") + 1 :]
    else:
        raise ValueError(f"unknown filler {filler!r}")
    ids = tok.encode(text, False)[: budget + 64]
    cuts = _sentence_cuts(tok, ids)
    end = int(cuts[cuts <= budget].max()) if np.any(cuts <= budget) else budget
    end = budget if end < budget - 32 else end
    return ids[:end], np.r_[0, cuts[cuts <= end]]


def _assemble(tok, num_tokens: int, items: list[str], depths, question: str, filler, rng) -> list[int]:
    """INTRO + filler with `items` inserted at the sentence ends nearest `depths` + question."""
    intro, q = tok.encode(INTRO), tok.encode(question, False)
    pieces = [tok.encode(" " + it, False) for it in items]
    budget = num_tokens - len(intro) - len(q) - sum(map(len, pieces))
    if budget < 16:
        need = num_tokens - budget + 16
        raise InvalidRequestError(
            f"a prompt of {num_tokens} tokens is too short for this task (this one needs {need})"
        )
    fill, cuts = _filler_ids(tok, budget, filler, rng)
    at = [int(cuts[np.abs(cuts - d * len(fill)).argmin()]) for d in depths]
    out, prev = list(intro), 0
    for pos, piece in sorted(zip(at, pieces), key=lambda t: t[0]):
        out += fill[prev:pos] + piece
        prev = pos
    return out + fill[prev:] + q


def _depths(rng: np.random.Generator, n: int, depth: float | None) -> list[float]:
    """The first item at `depth` (random in [0.05, 0.95] if None), the others uniformly at random."""
    first = float(rng.uniform(0.05, 0.95)) if depth is None else depth
    return [first, *rng.uniform(0.02, 0.98, n - 1).tolist()]


# tasks ----------------------------------------------------------------------------------------------------
def _niah(kind: str, num_keys: int, num_values: int):
    """Needle retrieval: `num_keys` keys (one asked, the rest distractors), `num_values` values each."""

    def make(tok, n: int, rng, depth: float | None, filler: str) -> Sample:
        keys = _keys(rng, num_keys)
        vals = {k: [_value(kind, rng) for _ in range(num_values)] for k in keys}
        noun = {"numbers": "number", "words": "word", "uuids": "uuid"}[kind]
        items = [f"One of the special magic {noun}s for {k} is: {v}." for k in keys for v in vals[k]]
        order = rng.permutation(len(items))
        items = [items[i] for i in order]
        depths = _depths(rng, len(items), depth)
        if num_values == 1:
            q = f"\nWhat is the special magic {noun} for {keys[0]} mentioned in the provided text? " \
                f"The special magic {noun} for {keys[0]} mentioned in the provided text is"  # fmt: skip
        else:
            q = f"\nWhat are all the special magic {noun}s for {keys[0]} mentioned in the provided text? " \
                f"The special magic {noun}s for {keys[0]} mentioned in the provided text are"  # fmt: skip
        per = {"numbers": 10, "words": 9, "uuids": 40}[kind]  # SmolLM2 spells numbers digit by digit
        ids = _assemble(tok, n, items, depths, q, filler, rng)
        return Sample("", ids, vals[keys[0]], per * num_values + 4, {"depth": depths[0]})

    return make


def _variable_tracking(num_chains: int = 1, hops: int = 4):
    """RULER's variable tracking: a chain of `hops` assignments from a value; name every variable in it."""

    def make(tok, n: int, rng, depth: float | None, filler: str) -> Sample:
        names = list(dict.fromkeys(_name(rng, 2).upper()[:5] for _ in range(4 * num_chains * (hops + 1))))
        rng.shuffle(names)
        items, depths, first_chain = [], [], []
        for c in range(num_chains):
            chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
            value = str(rng.integers(10000, 100000))
            stmts = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            d = np.sort(rng.uniform(0.02, 0.98, len(stmts)))
            if c == 0:
                first_chain, first_value = chain, value
                if depth is not None:
                    d = np.sort(np.clip(depth + rng.uniform(-0.1, 0.1, len(stmts)), 0.01, 0.99))
            items += stmts
            depths += d.tolist()
        q = f"\nFind all variables that are assigned the value {first_value} in the text above. " \
            f"Answer: According to the chain(s) of variable assignment in the text above, {len(first_chain)} " \
            f"variables are assigned the value {first_value}, they are:"  # fmt: skip
        ids = _assemble(tok, n, items, depths, q, filler, rng)
        info = {"depth": float(min(depths[: hops + 1]))}
        return Sample("", ids, first_chain, 6 * len(first_chain) + 4, info, stop=())

    return make


def _common_words(top: int = 10, top_freq: int = 30, rare_freq: int = 3):
    """RULER's common-word extraction: a numbered word list; `top` words occur `top_freq` times each,
    the rest `rare_freq` times; name the `top` most common ones."""

    def make(tok, n: int, rng, depth: float | None, filler: str) -> Sample:
        q = f"\nQuestion: What are the {top} most common words in the above list? Answer: The top {top} " \
            "words that appear most often in the list are:"  # fmt: skip
        head = tok.encode("Below is a numbered list of words. In these words, some appear more often than "
                          "others. Memorize the ones that appear most often.\n")  # fmt: skip
        room = n - len(head) - len(tok.encode(q, False))
        perm = rng.permutation(len(WORDS))
        common = [WORDS[i] for i in perm[:top]]
        rare_pool = [WORDS[i] for i in perm[top:]]
        n_rare, freq = len(rare_pool), top_freq
        for _ in range(6):  # shrink the list until it fits
            words = common * freq + [w for w in rare_pool[:n_rare] for _ in range(rare_freq)]
            words = [words[i] for i in rng.permutation(len(words))]
            body = tok.encode(" ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), False)
            if len(body) <= room:
                break
            scale = room / len(body)
            freq = max(rare_freq + 1, int(freq * scale))
            n_rare = int(n_rare * scale)
        else:
            raise InvalidRequestError(f"a prompt of {n} tokens is too short for common-word extraction")
        return Sample(
            "", head + body + tok.encode(q, False), common, 4 * top + 4, {"top_freq": freq}, stop=()
        )

    return make


def _qa(num_docs_max: int = 400):
    """Question answering over synthetic documents (towns with a founding year, river and export); one
    document answers the question, the others are distractors about other towns."""

    def make(tok, n: int, rng, depth: float | None, filler: str) -> Sample:
        towns = list(dict.fromkeys(_name(rng, 3) for _ in range(num_docs_max)))
        docs = []
        for t in towns:
            year, river, exp = int(rng.integers(1100, 1900)), rng.choice(RIVERS), rng.choice(EXPORTS)
            docs.append((t, year, exp, f"The town of {t} was founded in {year} on the banks of the river "
                         f"{river}. Its main export is {exp}, and its market opens every {_name(rng, 2)}day."))  # fmt: skip
        gold = docs[0]
        attr = int(rng.integers(0, 2))
        question = [
            f"In which year was the town of {gold[0]} founded?",
            f"What is the main export of {gold[0]}?",
        ]
        answer = [str(gold[1]), gold[2]]
        q = f"\n\nAnswer the question based on the documents above. Question: {question[attr]} Answer:"
        intro = tok.encode("Answer the question based on the given documents.\n\n")
        room = n - len(intro) - len(tok.encode(q, False))
        bodies = [tok.encode(f"Document {{}}: {d[3]}\n", False) for d in docs]
        count, used = 0, 0
        while count < len(docs) and used + len(bodies[count]) + 2 <= room:
            used += len(bodies[count]) + 2
            count += 1
        if count < 2:
            raise InvalidRequestError(f"a prompt of {n} tokens is too short for QA")
        d = float(rng.uniform(0.05, 0.95)) if depth is None else depth
        chosen = docs[1:count]
        chosen.insert(min(count - 1, int(round(d * (count - 1)))), gold)
        text = "".join(f"Document {i + 1}: {doc[3]}\n" for i, doc in enumerate(chosen))
        return Sample("", intro + tok.encode(text, False) + tok.encode(q, False), [answer[attr]], 8,
                      {"depth": d, "documents": count})  # fmt: skip

    return make


TASKS: dict[str, Callable] = {
    "niah_single_numbers": _niah("numbers", 1, 1),
    "niah_single_words": _niah("words", 1, 1),
    "niah_single_uuids": _niah("uuids", 1, 1),
    "niah_multikey_numbers": _niah("numbers", 4, 1),
    "niah_multikey_words": _niah("words", 4, 1),
    "niah_multikey_uuids": _niah("uuids", 4, 1),
    "niah_multivalue": _niah("numbers", 1, 4),
    "variable_tracking": _variable_tracking(),
    "common_words": _common_words(),
    "qa": _qa(),
}


def generate(
    task: str, tokenizer, num_tokens: int, num_samples: int, seed: int = 0, filler: str = "classic"
) -> list[Sample]:
    """`num_samples` prompts of task `task`, about `num_tokens` tokens each (all of `samples`' at once)."""
    return list(samples(task, tokenizer, num_tokens, num_samples, seed, filler))


def samples(
    task: str, tokenizer, num_tokens: int, num_samples: int, seed: int = 0, filler: str = "classic"
) -> Iterator[Sample]:
    """`num_samples` prompts of task `task`, about `num_tokens` tokens each, each built when asked for (a long
    run holds one at a time, not the task's all); needle depths stratified over [0.05, 0.95]. The same (task,
    length, seed, tokenizer) always gives the same samples. An unknown task is refused here, before any."""
    if task not in TASKS:
        raise InvalidRequestError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
    key = sum(ord(c) * 31**i for i, c in enumerate(task)) % (1 << 31)
    rng = np.random.default_rng([seed, num_tokens, key])
    edges = np.linspace(0.05, 0.95, num_samples + 1)

    def build() -> Iterator[Sample]:
        for i in range(num_samples):
            depth = float(edges[i] + rng.random() * (edges[1] - edges[0]))
            try:
                s = TASKS[task](tokenizer, num_tokens, rng, depth, filler)
            except InvalidRequestError as e:
                raise InvalidRequestError(f"task {task}: {e}") from None
            s.task = task
            yield s

    return build()
