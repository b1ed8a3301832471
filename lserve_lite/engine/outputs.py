"""What a step gives back for each request: a sampled token taken into its text (detokenized, with stop ids,
stop strings, vLLM's min_tokens and include_stop_str_in_output checked), the text delta held back while a stop
string may still be forming, and the line of a request whose logits could not be sampled."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..sequence import Sequence, TokenLogprob
from ..tokenizer import IncrementalDecoder
from .structured import advance, failure


@dataclass
class StepOutput:
    """What one step produced for one request: new text and ids, and whether it ended."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of `token_ids`, when asked for
    seq: Sequence | None = field(default=None, repr=False)
    error: str | None = None  # the one line that says why the request failed (logits it could not sample)


def take_token(
    seq: Sequence, tok: int, dec: IncrementalDecoder, eos_ids: set[int], max_len: int
) -> str | None:
    """Append sampled `tok` to `seq` and its text (through `dec`), cut at a stop string: the reason it finishes
    ("stop", "length", "error" where its grammar gave up), or None while it goes on."""
    if seq.first_token_time is None:
        seq.first_token_time = time.monotonic()
    p = seq.params
    seq.output_ids.append(tok)
    stop_tok = (tok in eos_ids and not p.ignore_eos) or tok in p.stop_token_ids
    complete = advance(seq, tok)  # a constrained request ends where its grammar does
    at_length = len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= max_len
    # vLLM's: a stop token's text is taken only where the stop's is kept (include_stop_str_in_output)
    if not stop_tok or p.include_stop_str_in_output:
        seq.text += dec.push(tok)
        if stop_tok or complete or at_length:  # its last text: the stop strings below see all of it
            seq.text += dec.flush()
    # vLLM's min_tokens (its PR 22014): no stop string ends the reply in its first min_tokens tokens' text
    early = len(seq.output_ids) <= p.min_tokens
    if early:
        seq.stops_from = len(seq.text)
    reason = "stop" if stop_tok or complete else None
    if stop_tok and (tok not in eos_ids or p.ignore_eos):  # vLLM's stop_reason: a stop id, not EOS
        seq.stop_reason = tok
    if reason == "stop" and failure(seq):  # the grammar gave up: the reply is cut, not whole
        reason = "error"
    if not stop_tok and p.stop and not early:
        hit = min(
            (i for i in (seq.text.find(s, _search_from(seq, s)) for s in p.stop) if i >= 0),
            default=-1,
        )
        if hit >= 0:
            seq.stop_reason = next(s for s in p.stop if seq.text.startswith(s, hit))
            cut = hit + len(seq.stop_reason) if p.include_stop_str_in_output else hit  # vLLM's cut
            seq.text, reason = seq.text[:cut], "stop"
    if reason is None and at_length:
        reason = "length"
    return reason


def new_text(seq: Sequence, reason: str | None) -> str:
    """The text `seq` has not returned yet; while it goes on (`reason` None), less what may be a stop string's
    beginning, unless the text keeps the stop (include_stop_str_in_output: it is cut past what was returned)."""
    p = seq.params
    going = reason is None and not p.include_stop_str_in_output
    held = max((len(s) - 1 for s in p.stop), default=0) if going else 0
    upto = max(seq.emitted, len(seq.text) - held)
    delta, seq.emitted = seq.text[seq.emitted : upto], upto
    return delta


def step_output(seq: Sequence, text: str, ids: list[int]) -> StepOutput:
    """`seq`'s output of this step: `text` and `ids` new, the logprob of its token when asked for."""
    lps = seq.logprobs[-1:] if ids and seq.params.logprobs is not None else []
    return StepOutput(
        seq.request_id, text, ids, seq.is_finished, seq.finish_reason,
        len(seq.prompt_ids), len(seq.output_ids), seq.num_prefix_cached or 0, lps, seq, seq.error,
    )  # fmt: skip


def overflowed(seq: Sequence) -> str:
    """Why a request whose logits could not be sampled (Ops.sample_async's flags) failed: said, not sampled into garbage."""
    return (
        f"non-finite activations at step {len(seq.output_ids) + 1} of request {seq.request_id}: its logits are NaN, "
        f"inf or all equal, as float32 gives them once the activations overflow; likely overflowing weights (values "
        f"too large in a norm, embedding or projection weight of the model)"
    )


def _search_from(seq: Sequence, stop: str) -> int:
    """Where stop string `stop` is searched in seq.text: past the text already returned (less the stop's length,
    for one the last token completed) and ending past the text of the first min_tokens tokens (vLLM's rule)."""
    return max(0, seq.emitted - len(stop), seq.stops_from - len(stop) + 1)
