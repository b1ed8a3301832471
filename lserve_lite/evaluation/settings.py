"""Engine settings for the evaluation tools: parsing `dense;lserve;NAME:knob=v,...` and running prompts
under many settings with as few LLMs and prefills as possible (shared by run_eval and tools/eval_*.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..config import EngineConfig, SparseConfig
from ..errors import InvalidRequestError
from ..llm import LLM
from ..sparse.patterns import resolve_pattern
from ..weights.loader import applied_quantize, load_config, load_tokenizer, resolve_model_dir
from .harness import SparseHarness

PRESETS: dict[str, dict | None] = {
    "dense": None,
    "lserve": {},
    "lserve-b512": {"token_budget": 512},
    "lserve-b1024": {"token_budget": 1024},
    "lserve-b2048": {"token_budget": 2048},
}
KIND_NAMES = {int: "an integer", float: "a number", str: "a name"}


def context_limit(model_dir: Path, max_model_len: int | None) -> int:
    """The context a tool's run may fill: `max_model_len` where given (bounded as EngineConfig bounds it; past the
    trained positions too, as chat's --max-model-len), else the model's trained one, or the one assumed for it."""
    if max_model_len is not None:
        return EngineConfig(max_model_len=max_model_len).max_model_len
    return load_config(model_dir).max_position_embeddings


def context_record(model_dir: Path, max_model_len: int | None) -> dict:
    """What a results JSON says of the context its run could fill, so a run past the trained positions says so:
    --max-model-len (None: not given), the limit and its source ("max_model_len", the model's "stated" trained
    context, or the one "assumed" where it names none), and the model's own context."""
    cfg = load_config(model_dir)
    own = "assumed" if cfg.context_assumed else "stated"
    return {
        "max_model_len": max_model_len,
        "context": {
            "limit": context_limit(model_dir, max_model_len),
            "source": own if max_model_len is None else "max_model_len",
            "model": cfg.max_position_embeddings,
            "model_assumed": cfg.context_assumed,
        },
    }


def refuse_past_context(
    model_dir: Path, tokens: int, what: str, max_model_len: int | None = None, answer: int = 0
) -> None:
    """Refuses, before any prompt is built, a run past the context limit: --max-model-len's, the engine's, which the
    `answer` tokens generated after `tokens` must fit too; else the model's trained positions, which `tokens` must
    fit (past them it measures nothing it was trained for; a few answer tokens past them extrapolate). Where the model
    names none, the message says the limit was assumed and how to set another (it read as the model's)."""
    context = context_limit(model_dir, max_model_len)
    if max_model_len is not None:
        if tokens + answer > context:
            room = f" + {answer} tokens of answer" if answer else ""
            raise InvalidRequestError(f"{what}{room} exceeds --max-model-len {context}")
        return
    if tokens <= context:
        return
    cfg = load_config(model_dir)
    if cfg.context_assumed:
        raise InvalidRequestError(
            f"{what} exceeds {context} tokens, the context assumed for this model: it names no trained context "
            f"length (config.json's max_position_embeddings, a GGUF's context_length) and {context} is transformers' "
            f"default for {cfg.arch}; --max-model-len sets the limit, or, if it was trained longer, write that length "
            "as max_position_embeddings into its config.json (a GGUF: `lserve-lite convert` it to a directory first)"
        )
    raise InvalidRequestError(f"{what} exceeds the model's context {context} (--max-model-len runs past it)")


def parse_configs(spec: str) -> dict[str, SparseConfig | None]:
    """'dense;lserve;name:knob=v,...' -> name -> SparseConfig (None: dense); always includes dense.

    Items are separated by ';' (or ',' when no item has knobs); knobs as in SparseConfig; weight
    quantization and the KV format are per run (`--quantize`, `--kv-dtype`), not per setting."""
    out: dict[str, SparseConfig | None] = {}
    items = spec.split(";") if ";" in spec else [spec] if ":" in spec else spec.split(",")
    for item in filter(None, (s.strip() for s in items)):
        name, _, knobs = (s.strip() for s in item.partition(":"))
        if not name or any(c in name for c in ",="):
            raise InvalidRequestError(f"config {item!r}: expected a preset or NAME:knob=v,... (';' between)")
        if name in out:
            raise InvalidRequestError(f"config {name!r} given twice")
        if name == "dense" and knobs:
            raise InvalidRequestError("config 'dense' is the dense baseline: it takes no knobs")
        if not knobs:
            if name not in PRESETS:
                raise InvalidRequestError(f"unknown config {name!r} (presets: {', '.join(PRESETS)})")
            kw = PRESETS[name]
            out[name] = None if kw is None else SparseConfig(enabled=True).with_updates(**kw)
            continue
        pairs = [_knob(name, kv) for kv in knobs.split(",")]
        kw = dict(pairs)
        if len(kw) < len(pairs):
            raise InvalidRequestError(f"config {name!r}: a knob is given twice ({knobs})")
        try:
            out[name] = SparseConfig(enabled=True).with_knobs(kw)
        except InvalidRequestError as e:  # a value out of range: say which setting holds it
            raise InvalidRequestError(f"config {name!r}: {e}") from None
    return {"dense": None, **out} if "dense" not in out else out


def _knob(name: str, kv: str) -> tuple[str, int | float | str]:
    """One 'knob=value' of config `name`, typed as SparseConfig's field, so a bad one is a one-line error."""
    k, eq, v = (s.strip() for s in kv.partition("="))
    if k in ("quantize", "kv_dtype"):
        flag = "--" + k.replace("_", "-")
        raise InvalidRequestError(f"{k} is per run, not per setting: pass {flag} {v or 'MODE'}")
    if not (k and eq and v):
        raise InvalidRequestError(f"config {name!r}: {kv.strip()!r} is not knob=value")
    if k not in SparseConfig.__dataclass_fields__ or k in ("enabled", "pattern_path"):
        raise InvalidRequestError(f"config {name!r}: unknown sparse knob {k!r}")
    kind = type(getattr(SparseConfig, k))
    try:
        return k, kind(v)
    except ValueError:
        raise InvalidRequestError(f"config {name!r}: {k}={v!r} is not {KIND_NAMES[kind]}") from None


def config_dict(c: SparseConfig | None) -> dict | None:
    return None if c is None else {k: v for k, v in asdict(c).items() if k != "pattern_path"}


class Runner:
    """Runs prompts under every config: one LLM per group of configs that share a KV layout, per-request
    knobs for the rest. Configs whose prefill is identical share one prefill per prompt.

    `shared_dense`: run `dense` on the first LServe group's LLM as a request whose windows and token
    budget cover the whole context (every head sees every token), so it shares that group's prefill
    too; tests/test_eval_suite.py checks that this equals the dense engine. `max_model_len`: the engine's context
    limit where the user set one (refuse_past_context checked the run against it), else `max_len`."""

    def __init__(self, model: str | None, configs: dict, max_len: int, pattern: str | None,
                 shared_dense: bool = False, backend: str = "auto", quantize: str | None = None,
                 kv_dtype: str = "auto", max_model_len: int | None = None):  # fmt: skip
        self.configs, self.model, self.backend = dict(configs), model, backend
        self.model_dir = resolve_model_dir(model)
        self.pattern = self._checked_pattern(pattern)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.quantize = applied_quantize(self.model_dir, quantize)  # what results record
        self.max_len = max_len  # the run's longest sequence: the pools hold one
        self.ecfg = dict(
            max_model_len=max_len if max_model_len is None else max_model_len,  # the tool's --max-model-len
            max_num_batched_tokens=2048,
            quantize=self.quantize,
            kv_dtype=kv_dtype,
        )
        self.full: SparseConfig | None = None
        if shared_dense and any(c is not None for c in configs.values()):
            first = next(c for c in configs.values() if c is not None)
            w = -(-max_len // first.page_size) * first.page_size
            self.full = first.with_updates(prefill_local=w, decode_local=w, token_budget=w)

    def _checked_pattern(self, pattern: str | None) -> str | None:
        """`pattern` (None: the bundled one) read now, not when the first sparse group starts after the dense
        prompts ran; refused when no setting has streaming heads to pick with it."""
        users = [c for c in self.configs.values() if c is not None and c.static_sparsity > 0]
        if pattern and not users:
            raise InvalidRequestError(
                f"--pattern {pattern}: no setting uses a head pattern (none has streaming heads)"
            )
        if users:
            cfg = load_config(self.model_dir)
            resolve_pattern(self.model_dir, cfg.num_layers, cfg.num_kv_heads, pattern)
        return pattern

    def _config(self, name: str) -> SparseConfig | None:
        sc = self.configs[name]
        return self.full if sc is None and self.full is not None else sc

    def group_names(self) -> list[list[str]]:
        """Config names per LLM (the order `groups` runs them): configs of one KV layout share one."""
        fixed = ("static_sparsity", "page_size", "sub_pages", "group_reduce")
        keyed: dict = {}
        for name in self.configs:
            sc = self._config(name)
            keyed.setdefault(None if sc is None else tuple(getattr(sc, k) for k in fixed), []).append(name)
        return list(keyed.values())

    def groups(self) -> Iterator[tuple[SparseHarness, list[str]]]:
        """Yield (harness, config names); the previous group's LLM is dropped first."""
        for names in self.group_names():
            scs = [self._config(n) for n in names]
            if scs[0] is None:
                sparse = SparseConfig(enabled=False)
            else:
                widest = {k: max(getattr(c, k) for c in scs) for k in
                          ("prefill_sink", "prefill_local", "decode_sink", "decode_local", "token_budget")}  # fmt: skip
                sparse = scs[0].with_updates(pattern_path=self.pattern, **widest)
            ps = sparse.page_size  # the pool holds one prompt of max_len tokens in this group's pages
            pages = -(-(self.max_len + ps) // ps) + 2
            ecfg = EngineConfig(**self.ecfg, num_kv_pages=pages, sparse=sparse, page_size=ps)
            llm = LLM(self.model, backend=self.backend, config=ecfg)
            yield SparseHarness(llm), names
            del llm

    def prefill_key(self, name: str, n: int) -> str | tuple[int, int]:
        """Configs with equal keys have identical prefills of an n-token prompt."""
        sc = self._config(name)
        if sc is None or sc.static_sparsity == 0 or sc.prefill_local >= n:
            return "dense"
        return (sc.prefill_sink, sc.prefill_local)

    def order(self, names: list[str], n: int) -> list[str]:
        return sorted(names, key=lambda k: (self.prefill_key(k, n) != "dense", str(self.prefill_key(k, n))))

    def prepare(self, h: SparseHarness, seq, name: str, phase: str) -> None:
        """Apply config `name` for the prefill or decode phase of `seq`."""
        sc = self._config(name)
        if sc is not None and phase == "prefill":
            h.set_request_sparse(seq, sc)

    def greedy_all(
        self, h: SparseHarness, names: list[str], ids: list[int], max_new: int, stop_ids=()
    ) -> dict[str, list[int]]:
        """Greedy output ids of configs `names` for prompt `ids` on harness h."""
        out, key, first = {}, None, None
        seq = h.begin(ids, reserve=max_new + 1)
        try:
            for name in self.order(names, len(ids)):
                self.prepare(h, seq, name, "prefill")
                if self.prefill_key(name, len(ids)) != key or not h.can_rewind(seq, len(ids)):
                    h.rewind(seq, 0, keep_outputs=False)
                    first = np.asarray(h.forward(seq, len(ids), logits="last")[-1])
                    key = self.prefill_key(name, len(ids))
                self.prepare(h, seq, name, "decode")
                out[name] = h.greedy(seq, max_new, first, stop_ids)
        finally:
            h.end(seq)
        return out
