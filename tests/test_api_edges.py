"""The Python API's edge: token ids and engine options that make no sense get one clear InvalidRequestError
(never a NumPy traceback, a silent acceptance or an allocation sized by them)."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from lserve_lite import LLM, EngineConfig, InvalidRequestError, LServeError, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16))


@pytest.mark.parametrize(
    "ids,match",
    [
        ([], "empty"),
        ([5, 99999], "must be in"),
        ([5, -1], "must be in"),
        ([True, 5], "integers"),
        ([5, 2.0], "integers"),
        ("text", "list of token ids"),
    ],
)
def test_logits_refuses_bad_ids(llm, ids, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.logits(ids)
    assert llm.engine.blocks.num_used == 0


@pytest.mark.parametrize("ids", [[5, 99999], [True], [-3]])
def test_generate_refuses_bad_prompt_ids(llm, ids):
    with pytest.raises(InvalidRequestError):
        llm.generate([ids], SamplingParams(max_new_tokens=2))
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("rid", [[1], 7, b"id", ""])
def test_request_ids_must_be_strings(llm, rid):
    """add_request and abort refuse an id that is not a non-empty str in one line (a list was a TypeError; an
    abort of one failed only inside the next step)."""
    with pytest.raises(InvalidRequestError, match="request_id must be a non-empty str"):
        llm.engine.add_request([1, 2], SamplingParams(max_new_tokens=1), request_id=rid)
    with pytest.raises(InvalidRequestError, match="request_id must be a non-empty str"):
        llm.engine.abort(rid)
    assert not llm.engine.has_unfinished()
    assert llm.engine.add_request([1, 2], SamplingParams(max_new_tokens=1), request_id="mine") == "mine"
    llm.engine.abort("mine")
    while llm.engine.has_unfinished():
        llm.engine.step()


def test_get_tokenizer_is_vllms_accessor(llm):
    tok = llm.get_tokenizer()
    assert tok is llm.tokenizer and tok.decode(tok.encode("hello", add_special_tokens=False)) == "hello"


def test_tokenizers_apply_chat_template_as_transformers(llm):
    """Code ported from vLLM renders with llm.get_tokenizer().apply_chat_template(...) (transformers' call), which
    was an AttributeError: ids by default, text with tokenize=False, transformers' defaults (no generation
    prompt), other keywords as template variables; its tensor options are one line."""
    tok, msgs = llm.get_tokenizer(), [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == tok.render_chat(msgs) and tok.apply_chat_template(
        msgs, add_generation_prompt=True
    ) == tok.encode_chat(msgs)
    assert tok.apply_chat_template(msgs, tokenize=False) == tok.render_chat(msgs, add_generation_prompt=False)
    assert tok.apply_chat_template(msgs, tokenize=False, chat_template="{{ x }}|", x=7) == "7|"
    with pytest.raises(InvalidRequestError, match=r"^apply_chat_template: return_tensors is not supported"):
        tok.apply_chat_template(msgs, return_tensors="pt")


def test_logits_of_valid_ids(llm):
    out = llm.logits([1, 2, 3])
    assert out.shape == (3, llm.engine.cfg.vocab_size) and np.isfinite(out).all()


def test_huge_max_model_len_is_clipped_to_the_pool(tiny_llama):
    """A context limit of ten million tokens does not size anything: the KV pool bounds it (and the RoPE
    tables are built for the clipped limit); a billion is refused by EngineConfig itself."""
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        EngineConfig(max_model_len=1_000_000_000)
    ecfg = EngineConfig(num_kv_pages=8, max_model_len=10_000_000)
    llm = LLM(str(tiny_llama), backend="cpu", config=ecfg)
    assert llm.engine.max_len == 8 * 64
    assert llm.engine.runner.model.rope[0].shape[0] == 8 * 64


@pytest.mark.parametrize("pen", [0.0, 1e-300, 1e6, float("nan")])
def test_repetition_penalty_outside_its_range_is_refused(pen):
    """Beyond [0.01, 100] a penalty makes float32 logits infinite (NaN probabilities): refused up front."""
    with pytest.raises(InvalidRequestError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=pen)


def test_max_tokens_is_vllms_name_of_max_new_tokens(llm):
    """Code ported from vLLM says SamplingParams(max_tokens=...): it was a TypeError. It is max_new_tokens by
    another name (n > 1 and replace keep it; None, as in vLLM, is up to the context limit); both given, and
    different, is one ValueError naming both."""
    from dataclasses import replace

    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, n=2)
    assert sp.max_new_tokens == 3 and SamplingParams().max_new_tokens == 256
    assert [len(o.token_ids) for o in llm.generate([[5, 6, 7]], sp)] == [3, 3]
    assert replace(sp, max_new_tokens=5).max_new_tokens == 5
    assert SamplingParams(max_tokens=4, max_new_tokens=4).max_new_tokens == 4
    with pytest.raises(ValueError, match=r"^max_tokens is another name of max_new_tokens: give one, got "
                       r"max_new_tokens=256 and max_tokens=8$"):  # fmt: skip
        SamplingParams(max_new_tokens=256, max_tokens=8)
    with pytest.raises(InvalidRequestError, match="max_new_tokens must be an integer >= 1, got 0"):
        SamplingParams(max_tokens=0)
    # explicit max_new_tokens=256 is given (conflicts), explicit None still refused; vLLM's max_tokens=None: up to
    # the context limit
    with pytest.raises(ValueError, match="give one"):
        SamplingParams(max_new_tokens=256, max_tokens=8)
    with pytest.raises(InvalidRequestError, match="got None"):
        SamplingParams(max_new_tokens=None)
    near = [5] * (llm.engine.max_len - 3)
    out = llm.generate([near], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert (len(out.token_ids), out.finish_reason) == (3, "length")


def test_max_tokens_reads_and_sets_max_new_tokens(llm):
    """vLLM's code reads and sets sp.max_tokens: reading gave a sentinel object and setting it changed nothing (the
    request still ran to max_new_tokens). It is max_new_tokens, read and set (None: up to the context limit, read
    back as None, as vLLM keeps it: it read 2147483647, a limit nobody gave)."""
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert sp.max_tokens == 16 and SamplingParams().max_tokens == 256
    sp.max_tokens = 2
    assert sp.max_new_tokens == 2 and len(llm.generate([[5, 6]], sp)[0].token_ids) == 2
    sp.max_tokens = None
    assert sp.max_tokens is None and sp.max_new_tokens > llm.engine.max_len
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_sampling_params_clone_is_vllms_deep_copy():
    """vLLM's SamplingParams.clone() (ported code clones a base and sets a field per request) was an
    AttributeError: it is a deep copy, so changing the clone's lists leaves the original as it was."""
    sp = SamplingParams(stop=["x"], seed=1, logit_bias={3: 1.0})
    c = sp.clone()
    c.stop.append("y")
    c.logit_bias[4] = 2.0
    c.seed = 2
    assert (sp.stop, sp.logit_bias, sp.seed) == (["x"], {3: 1.0}, 1)
    assert c == SamplingParams(stop=["x", "y"], seed=2, logit_bias={3: 1.0, 4: 2.0})


def test_top_k_minus_one_is_off_as_in_vllm(llm):
    """vLLM (and this server) spell "no top-k filter" -1 as well as 0: SamplingParams(top_k=-1), from code ported
    from vLLM, was refused. It is 0; below -1 is still refused."""
    sp = SamplingParams(top_k=-1, max_new_tokens=3, seed=1)
    assert sp.top_k == 0
    assert (
        llm.generate("hi", sp)[0].token_ids
        == llm.generate("hi", SamplingParams(max_new_tokens=3, seed=1))[0].token_ids
    )
    with pytest.raises(InvalidRequestError, match="top_k must be an integer >= 0"):
        SamplingParams(top_k=-2)


def test_none_is_no_stop_strings_ids_or_bias_as_in_vllm():
    """vLLM's SamplingParams default stop, stop_token_ids and logit_bias to None, and code ported from it passes
    None for "none": each was refused as not a list (dict). None is empty; other non-lists are still refused."""
    sp = SamplingParams(stop=None, stop_token_ids=None, logit_bias=None)
    assert (sp.stop, sp.stop_token_ids, sp.logit_bias) == ([], [], {})
    with pytest.raises(InvalidRequestError, match="stop must be a list"):
        SamplingParams(stop=5)
    with pytest.raises(
        InvalidRequestError, match=r"^logit_bias must be a dict of token ids to numbers, got list$"
    ):
        SamplingParams(logit_bias=[5, 1.0])  # it read "logit_bias must map at most 1024 token ids to numbers"


def test_vllm_spellings_set_after_construction_are_taken(llm):
    """SamplingParams(top_k=-1, stop="x", stop=None, min_p=None, ...) are taken, but the same values set on the
    object afterwards were refused by add_request's second validation ("top_k must be an integer >= 0")."""
    for name, value in (("top_k", -1), ("stop", "zz"), ("stop", None), ("stop_token_ids", None),
                        ("logit_bias", None), ("min_p", None)):  # fmt: skip
        sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        setattr(sp, name, value)
        assert len(llm.generate([[5, 6]], sp)[0].token_ids) == 2, name
        assert sp == SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, **{name: value}), name


def test_n_set_after_construction_is_checked(llm):
    """`sp.n = 100` after construction ran 100 candidates past the limit of 16: generate split it into requests of
    n=1 before any validation saw n. It is refused in one line, and nothing is queued."""
    sp = SamplingParams(max_tokens=1)
    sp.n = 100
    with pytest.raises(InvalidRequestError, match=r"^n must be an integer in \[1, 16\], got 100$"):
        llm.generate("hi", sp)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(min_tokens=3), r"^min_tokens must be an integer in \[0, max_tokens \(2\)\], got 3$"),
        (dict(min_tokens=2, response_format={"type": "json_object"}), r"^min_tokens cannot be combined"),
        # the format's shape first: a string with min_tokens was an AttributeError ('str' object has no 'get')
        (dict(min_tokens=1, response_format="json"), r"^response_format must be \{'type': 'text'"),
        (dict(best_of=4, n=2), r"^best_of must equal n \(candidates are not ranked\)$"),
        (
            dict(spaces_between_special_tokens="no"),
            r"^spaces_between_special_tokens must be true or false, got 'no'$",
        ),
        (dict(skip_special_tokens=0), r"^skip_special_tokens must be true or false, got 0$"),
        (
            dict(include_stop_str_in_output="yes"),
            r"^include_stop_str_in_output must be true or false, got 'yes'$",
        ),
        (dict(use_beam_search=True), r"^use_beam_search is not supported \(no beam search\)$"),
        (dict(guided_decoding=object()), r"^guided_decoding is not supported \(use response_format"),
        (dict(allowed_token_ids=[5]), r"^allowed_token_ids is not supported \(use logit_bias\)$"),
    ],
)
def test_vllms_unimplemented_sampling_options_are_named(kw, match):
    """vLLM's SamplingParams options not implemented here were a bare TypeError ("unexpected keyword argument"):
    set, each is one InvalidRequestError naming it and what to use instead (the server's hints)."""
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(max_tokens=2, **kw)


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("use_beam_search", True, r"^use_beam_search is not supported \(no beam search\)$"),
        ("best_of", 3, r"^best_of must equal n \(candidates are not ranked\)$"),
    ],
)
def test_vllms_unimplemented_sampling_options_set_later_are_refused(llm, name, value, match):
    """The same options set on the object after construction (as vLLM's code sets fields) were stored and ignored:
    `sp.use_beam_search = True` ran without it. They are refused in the constructor's line; their "off"
    values pass, as there."""
    sp = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(InvalidRequestError, match=match):
        setattr(sp, name, value)
    setattr(
        sp,
        name,
        {"use_beam_search": False, "best_of": 1}.get(name, True),
    )
    assert sp == SamplingParams(max_tokens=2, temperature=0)
    assert len(llm.generate([[5, 6]], sp)[0].token_ids) == 2


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.1", True])
def test_min_p_outside_0_1_is_refused(bad):
    with pytest.raises(InvalidRequestError, match=r"^min_p must be in \[0, 1\] \(0 disables it\), got "):
        SamplingParams(min_p=bad)
    assert SamplingParams(min_p=None) == SamplingParams(min_p=0)  # off, as before min_p was implemented


def test_min_p_leaves_the_other_fields_positions():
    """min_p was added before repetition_penalty: a positional SamplingParams(..., 1.2) became min_p=1.2, refused."""
    sp = SamplingParams(8, 0.5, 3, 0.9, 1.2, 7)
    assert (
        sp.max_new_tokens,
        sp.temperature,
        sp.top_k,
        sp.top_p,
        sp.repetition_penalty,
        sp.seed,
        sp.min_p,
    ) == (8, 0.5, 3, 0.9, 1.2, 7, 0.0)


def test_min_p_is_taken(llm):
    """vLLM's min_p (refused as not implemented until 2026-12-07) runs in the sampler: min_p=1 keeps the most
    probable token only, so a hot temperature still gives the greedy reply (the GPU's min_p_mask: the kernel
    harness's `sample (min_p)` row and tools/sampling_host_check.py)."""
    greedy = llm.generate([[5, 6]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    hot = SamplingParams(max_tokens=6, temperature=50.0, min_p=1.0, seed=3, ignore_eos=True)
    assert llm.generate([[5, 6]], hot)[0].token_ids == greedy.token_ids
    assert (
        llm.generate([[5, 6]], SamplingParams(max_tokens=6, temperature=50.0, seed=3, ignore_eos=True))[
            0
        ].token_ids
        != greedy.token_ids
    )  # without min_p that temperature leaves the greedy reply


def test_min_tokens_refused_with_max_tokens_none_names_it():
    """With vLLM's max_tokens=None (up to the context limit) the bound read "max_tokens (2147483647)", a number
    the caller never gave (the internal no-limit value)."""
    with pytest.raises(
        InvalidRequestError, match=r"^min_tokens must be .* max_tokens \(None: up to the context"
    ):
        SamplingParams(max_tokens=None, min_tokens=-1)


def test_vllms_unimplemented_sampling_options_at_their_off_values_pass(llm):
    """vLLM code that spells out an option's default (min_p=0.0, skip_special_tokens=True, best_of=n) asks for what
    happens here: accepted, and so is an empty list of logits processors or dict of extra_args (no effect; they were
    refused, where an empty bad_words passed), and output_kind 0, vLLM's CUMULATIVE (refused until 2026-12-07); a name neither class knows is still a TypeError, named as
    SamplingParams."""
    off = dict(min_p=0.0, min_tokens=0, best_of=2, skip_special_tokens=True, spaces_between_special_tokens=True,
               include_stop_str_in_output=False, detokenize=True, guided_decoding=None, bad_words=[],
               logits_processors=[], extra_args={}, output_kind=0)  # fmt: skip
    sp = SamplingParams(max_tokens=2, n=2, temperature=0, ignore_eos=True, **off)
    assert sp == SamplingParams(max_tokens=2, n=2, temperature=0, ignore_eos=True)
    assert [len(o.token_ids) for o in llm.generate([[5, 6]], sp)] == [2, 2]
    # detokenize=False only spares vLLM work (lm-evaluation-harness's vLLM backend scores with it): taken, ignored
    assert SamplingParams(max_tokens=2, detokenize=False) == SamplingParams(max_tokens=2)
    with pytest.raises(TypeError, match="^SamplingParams got an unexpected keyword argument 'min_pp'$"):
        SamplingParams(min_pp=0.1)


def test_spaces_between_special_tokens_false_is_taken_as_vllms_fast_detokenizer(llm, smollm2_dir):
    """vLLM's spaces_between_special_tokens=False was refused. vLLM's fast (tokenizers) detokenizer with it drops a
    space the decoder puts between two added tokens' texts; the byte-level decoder of the bundled SmolLM2 puts none
    (as SentencePiece's), so the text is the same either way: taken, and the reply is that of True."""
    from lserve_lite.tokenizer import IncrementalDecoder, Tokenizer

    tok = Tokenizer(smollm2_dir)
    text = "<|im_start|><|im_end|>hi<|im_end|><|endoftext|><|im_start|> x"
    ids = tok.encode(text, add_special_tokens=False)
    assert sum(tok.is_special(t) for t in ids) == 5
    dec = IncrementalDecoder(tok, skip_special=False)
    assert "".join(dec.push(t) for t in ids) + dec.flush() == text  # no space to drop between special tokens
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, skip_special_tokens=False)
    spaced = llm.generate([[5, 6]], sp)[0]
    sp.spaces_between_special_tokens = False
    assert sp.spaces_between_special_tokens is False
    out = llm.generate([[5, 6]], sp)[0]
    assert (out.text, out.token_ids) == (spaced.text, spaced.token_ids)


def test_sampling_values_may_be_numpy_numbers(llm):
    """A count, seed or temperature computed with NumPy (np.int64(16), np.float32(0.7)) was refused as "must be an
    integer >= 1, got 16": NumPy's integers and reals are numbers (booleans, NumPy's too, are still refused)."""
    sp = SamplingParams(max_new_tokens=np.int64(4), temperature=np.float32(0.5), top_k=np.int32(5), seed=np.int64(3),
                        n=np.int64(2), logprobs=np.int64(1), ignore_eos=True)  # fmt: skip
    outs = llm.generate([[5, 6, 7]], sp)
    assert [len(o.token_ids) for o in outs] == [4, 4] and all(len(o.logprobs) == 4 for o in outs)
    with pytest.raises(InvalidRequestError, match="max_new_tokens must be an integer"):
        SamplingParams(max_new_tokens=np.bool_(True))


def test_kv_budget_that_holds_no_page_is_an_error():
    from lserve_lite.config import ModelConfig
    from lserve_lite.kv.layout import pool_pages

    cfg = ModelConfig("LlamaForCausalLM", 64, 128, 2, 4, 2, 16, 100)
    assert pool_pages(cfg, 64, 2 * 16 * 4, 10 * 2**20, None, 4, stat_itemsize=4) == (
        10 * 2**20 // (2 * 2 * 2 * 16 * 64 * 4),
        0,
    )
    with pytest.raises(InvalidRequestError, match="holds no KV page"):
        pool_pages(cfg, 64, 2 * 16 * 4, 100, None, 4, stat_itemsize=4)


def test_explicit_page_count_beyond_the_memory_limit_is_an_error():
    """num_kv_pages is checked against the backend's limit (Ops.kv_limit_bytes) before anything is allocated."""
    from lserve_lite.config import ModelConfig
    from lserve_lite.kv.layout import pool_pages

    cfg = ModelConfig("LlamaForCausalLM", 64, 128, 2, 4, 2, 16, 100)
    page = 2 * 2 * 2 * 16 * 64 * 4  # layers x K/V x KV heads x head_dim x tokens x float32
    assert pool_pages(cfg, 64, 2 * 16 * 4, 0, None, 4, 10, stat_itemsize=4, limit=10 * page) == (10, 0)
    with pytest.raises(InvalidRequestError, match=r"num_kv_pages=11 needs .* GiB of KV memory") as e:
        pool_pages(cfg, 64, 2 * 16 * 4, 0, None, 4, 11, stat_itemsize=4, limit=10 * page + page // 2)
    assert e.value.fits == 10  # the pages that fit, for a caller to name in its terms (calibrate: --samples)


@pytest.mark.parametrize(
    "knob", ["token_budget", "prefill_local", "decode_local", "prefill_sink", "decode_sink"]
)
def test_sparse_windows_and_budget_have_upper_bounds(knob):
    """Before: token_budget 64e12 tried a 698 TiB selection-slot allocation, prefill_local 64e12 an int32
    overflow at the first step; now bounded like max_model_len."""
    with pytest.raises(InvalidRequestError, match=rf"{knob} must be a multiple of page_size \(64\) in \["):
        EngineConfig(sparse={"enabled": True, knob: 64_000_000_000_000})
    EngineConfig(sparse={"enabled": True, knob: 1 << 24})


@pytest.mark.parametrize("size", [0, 8, 24, 2048, 1 << 40])
def test_sparse_page_size_refused_as_the_kv_page_size(size):
    """SparseConfig had no upper bound: page_size 2048 was refused as 'prefill_sink must be a multiple of page_size
    (2048)', blaming a knob the user never set; now its own range, the same as EngineConfig's."""
    from lserve_lite.config import SparseConfig

    msg = rf"page_size must be a power of two in \[16, 1024\], got {size}"
    with pytest.raises(InvalidRequestError, match=msg):
        SparseConfig(enabled=True, page_size=size).validate()
    with pytest.raises(InvalidRequestError, match=r"page_size must be .* \[16, 1024\]"):
        EngineConfig(page_size=size)


@pytest.mark.parametrize("knob", ["prefill_local", "decode_local"])
def test_empty_local_window_names_the_knob(knob):
    """A local window of 0 was refused as 'local windows must hold at least one page': neither knob nor value."""
    with pytest.raises(
        InvalidRequestError, match=rf"{knob} must be a multiple of page_size \(64\) in \[64, .*got 0$"
    ):
        EngineConfig(sparse={"enabled": True, knob: 0})


def _layout(static_sparsity_classes: int, max_len: int, **knobs):
    """A two-layer, two-KV-head LServe layout whose heads are all of one class (0 dense, 1 streaming)."""
    from lserve_lite.config import ModelConfig, SparseConfig
    from lserve_lite.kv.layout import KVLayout

    cfg = ModelConfig("LlamaForCausalLM", 64, 128, 2, 4, 2, 16, 100)
    classes = [np.full(2, static_sparsity_classes, np.int32)] * 2
    return cfg, KVLayout.sparse(SparseConfig(enabled=True, **knobs), classes, 64, max_len)


def test_page_budget_and_sink_clipped_to_a_whole_context():
    """The selection slots are max_seqs x KV heads x budget pages: a budget beyond the context sizes nothing."""
    _, lay = _layout(0, 1024, token_budget=1 << 24, decode_sink=1 << 24)
    assert lay.select_pages == 16 and lay.sink_pages == 16


def test_sink_and_ring_reserve_a_whole_context_once():
    """A ring clipped to a whole context held the sink pages again: SmolLM2's defaults (an 8192-token context,
    sink 128, local 8192) reserved 2 + 128 streaming pages a sequence for its 128 pages (1.5% over); the ring
    now holds what the context has past the sink, and a per-request window still fits it whole."""
    from lserve_lite.geometry import pages_for, ring_fits

    for max_len in (8192, 8000, 200):
        _, lay = _layout(1, max_len, prefill_sink=128, decode_sink=64)
        assert lay.stream_pages_per_seq == pages_for(max_len, 64)
        assert ring_fits(1 << 20, lay.ring_pages, 64, 64, max_len, lay.sink_pages)
    _, lay = _layout(1, 128, prefill_sink=1024)  # a sink past the context: every page a sink page, no ring
    assert (lay.sink_pages, lay.ring_pages) == (2, 0)


def test_page_selections_are_counted_and_refused_before_allocating():
    """The selections (int32 page ids per sequence slot, KV head and layer, a budget's worth) were not counted: a
    budget as long as a 16M-token context with 4096 sequences allocated 32 GiB arrays after the pools (MemoryError,
    a traceback); now they come out of the KV memory first, and one line refuses what cannot fit."""
    from lserve_lite.kv.layout import page_bytes, pool_pages

    cfg, lay = _layout(0, 1 << 24, token_budget=1 << 24)
    assert lay.selection_bytes(cfg, 4096) == 4 * 2 * 4096 * 2 * ((1 << 18) + 2)  # 17 GB
    msg = r"the page selections \(4096 sequences x 262145 pages a KV head, .* lower the sparse token_budget"
    with pytest.raises(InvalidRequestError, match=msg):
        pool_pages(cfg, 64, 2 * 16 * 4, 2 << 30, lay, 4096, stat_itemsize=4)
    with pytest.raises(InvalidRequestError, match=msg):
        pool_pages(cfg, 64, 2 * 16 * 4, 0, lay, 4096, 8, stat_itemsize=4, limit=8 << 30)
    cfg, lay = _layout(0, 1024)
    dense_b, sel = page_bytes(cfg, 64, 2 * 16 * 4, lay, 4)[0], lay.selection_bytes(cfg, 4)
    assert pool_pages(cfg, 64, 2 * 16 * 4, 10 * dense_b + sel, lay, 4, stat_itemsize=4) == (10, 0)
    assert pool_pages(cfg, 64, 2 * 16 * 4, 10 * dense_b + sel - 1, lay, 4, stat_itemsize=4) == (9, 0)
    with pytest.raises(InvalidRequestError, match="num_kv_pages=10 needs"):
        pool_pages(cfg, 64, 2 * 16 * 4, 0, lay, 4, 10, stat_itemsize=4, limit=10 * dense_b + sel - 1)


def test_page_budget_clipped_to_what_the_pool_holds(tiny_llama):
    """A context limit the KV pool cuts (8 pages here) also cuts the selection slots' page budget."""
    sparse = dict(enabled=True, static_sparsity=0.0, token_budget=1 << 20)
    ecfg = EngineConfig(num_kv_pages=8, max_model_len=10_000_000, sparse=sparse)
    eng = LLM(str(tiny_llama), backend="cpu", config=ecfg).engine
    assert eng.max_len == 8 * 64 and eng.layout.select_pages == 8
    assert eng.runner.cache.sel_idx[0].shape[-1] == 9  # visit capacity: the budget + the newest page


def test_streaming_rings_sized_for_the_context_the_pool_holds(tmp_path):
    """An explicit num_kv_pages bounds the context, so it bounds each streaming ring too: the rings were sized
    for the model's whole context (129 pages a sequence where a 10-page context fits: a streaming pool 12x what
    sequences could ever hold). Outputs equal an engine whose context limit is set to the same length."""
    from tiny_models import make_tiny_numpy

    d = make_tiny_numpy(tmp_path / "m")
    (d / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    sparse = dict(enabled=True, page_size=16, token_budget=64, prefill_sink=16, prefill_local=64, decode_sink=16,
                  decode_local=32)  # fmt: skip
    cfg = dict(page_size=16, max_num_seqs=4, sparse=sparse)
    eng = LLM(str(d), backend="cpu", config=EngineConfig(num_kv_pages=10, **cfg))
    ref = LLM(str(d), backend="cpu", config=EngineConfig(max_model_len=160, **cfg))
    assert eng.engine.max_len == 160 and eng.engine.layout.stream_pages_per_seq == 10  # 1 sink + 9 ring pages
    assert eng.engine.blocks.num_stream_pages == 4 * 10
    sp = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    prompts = [list(range(3, 140)), list(range(7, 60))]
    assert [o.token_ids for o in eng.generate(prompts, sp)] == [
        o.token_ids for o in ref.generate(prompts, sp)
    ]
    assert eng.engine.blocks.num_used == 0


def test_streaming_pool_that_does_not_fit_is_named():
    """Before: 'the KV memory budget (0.0 MiB) holds no KV page', blaming the dense pool."""
    from lserve_lite.kv.layout import pool_pages

    cfg, lay = _layout(1, 1 << 20, decode_sink=1 << 19)
    with pytest.raises(
        InvalidRequestError,
        match=r"the streaming pool \(sink \+ local window, [\d.]+ MiB a sequence\) does not fit",
    ):
        pool_pages(cfg, 64, 2 * 16 * 4, 10 * 2**20, lay, 4, stat_itemsize=4)


def test_streaming_pool_beside_explicit_pages_stays_within_the_kv_budget():
    """Beside an explicit num_kv_pages the streaming pool took 30% of kv_memory_fraction's budget on top of them:
    pages filling most of the budget went past it (up to all the device's memory), and a count that fitted the
    budget was refused as needing more than the device has. It takes only what they leave (a sequence's at least)."""
    from lserve_lite.config import ModelConfig, SparseConfig
    from lserve_lite.kv.layout import KVLayout, page_bytes, pool_pages

    cfg = ModelConfig("LlamaForCausalLM", 64, 128, 2, 4, 2, 16, 100)
    lay = KVLayout.sparse(SparseConfig(enabled=True), [np.array([0, 1], np.int32)] * 2, 64, 4096)
    kv_b, budget, seqs = 2 * 16 * 4, 64 * 2**20, 64
    dense_b, stream_b = page_bytes(cfg, 64, kv_b, lay, 4)
    sel, per_seq = lay.selection_bytes(cfg, seqs), lay.stream_pages_per_seq

    def pools(num_pages: int | None) -> tuple[int, int]:
        return pool_pages(cfg, 64, kv_b, budget, lay, seqs, num_pages, stat_itemsize=4, limit=2 * budget)

    def total(d: int, st: int) -> int:
        return d * dense_b + st * stream_b + sel

    d, st = pools(None)
    assert per_seq < st < seqs * per_seq and total(d, st) <= budget  # the 30% share binds here
    assert pools(d) == (d, st)  # the budget's own page count: the same pools
    fits = (budget - sel) * 9 // 10 // dense_b  # 90% of the budget in dense pages
    d, st = pools(fits)
    assert per_seq < st and total(d, st) <= budget  # it took 30% more: 1.2x the budget
    assert pools(budget // dense_b)[1] == per_seq  # no room left: one sequence's, within the device's limit
    over = r"needs [\d.]+ GiB of KV memory \(the dense pages [\d.]+, the streaming pool [\d.]+, the page selections"
    with pytest.raises(InvalidRequestError, match=over):  # past the limit, the line says what the total holds
        pool_pages(cfg, 64, kv_b, budget, lay, seqs, budget // dense_b, stat_itemsize=4, limit=budget)


def test_no_dense_heads_pool_from_the_streaming_pool():
    """static_sparsity 1: a dense page holds no bytes, so the streaming pool takes the whole budget (before:
    1048576 dense 'pages' from a division by one byte, and 30% of the budget for what is the whole cache)."""
    from lserve_lite.kv.layout import MAX_POOL_PAGES, pool_pages

    cfg, lay = _layout(1, 1 << 20)
    page = 2 * 2 * 2 * 16 * 64 * 4  # layers x K/V x KV heads x head_dim x tokens x float32
    assert lay.streaming_only and lay.stream_pages_per_seq == 2 + 130
    sel = lay.selection_bytes(cfg, 4)  # the page selections come out of the budget first
    assert pool_pages(cfg, 64, 2 * 16 * 4, 200 * page + sel, lay, 4, stat_itemsize=4) == (MAX_POOL_PAGES, 200)
    assert pool_pages(cfg, 64, 2 * 16 * 4, 1000 * page, lay, 4, stat_itemsize=4) == (MAX_POOL_PAGES, 4 * 132)


def test_no_dense_heads_hold_no_page_selections(tmp_path):
    """static_sparsity 1: no head selects pages, yet each sequence slot held a budget's worth of selections in
    every layer (dead memory) and a long budget with many sequences was refused for them; now none are sized."""
    from tiny_models import make_tiny_numpy

    from lserve_lite.kv.layout import pool_pages

    cfg, lay = _layout(1, 1 << 24, token_budget=1 << 24)
    assert lay.select_pages == 0 and lay.selection_bytes(cfg, 4096) == 4 * 2 * 4096 * 2 * 2
    assert pool_pages(cfg, 64, 2 * 16 * 4, 2 << 30, lay, 4096, stat_itemsize=4)[1] > 0
    d = make_tiny_numpy(tmp_path / "m")
    (d / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    sparse = dict(enabled=True, static_sparsity=1.0, token_budget=1 << 20)
    llm = LLM(
        str(d), backend="cpu", config=EngineConfig(max_model_len=1 << 20, max_num_seqs=64, sparse=sparse)
    )
    assert llm.engine.blocks.num_slots == 0 and llm.engine.runner.cache.sel_idx[0].shape[-1] == 1
    out = llm.generate(
        [list(range(3, 200))], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    )
    assert len(out[0].token_ids) == 4


def test_startup_line_names_a_context_limit_past_the_trained_positions(tmp_path):
    """max_model_len past max_position_embeddings is allowed (long-context runs extrapolate on purpose), and said."""
    from tiny_models import make_tiny_numpy

    d = make_tiny_numpy(tmp_path / "m", max_position_embeddings=256)
    within = LLM(str(d), backend="cpu", config=EngineConfig(max_model_len=256, num_kv_pages=64, page_size=16))
    past = LLM(str(d), backend="cpu", config=EngineConfig(max_model_len=512, num_kv_pages=64, page_size=16))
    assert "trained positions" not in within.engine.kv_summary()
    assert past.engine.kv_summary().endswith(
        "context limit 512 past the model's 256 trained positions (extrapolated)"
    )


def test_lserve_startup_line_counts_the_dense_pool_and_the_streaming_sequences(tmp_path):
    """In LServe mode a dense-pool page holds the dense heads only (plus statistics), and the streaming pool
    bounds how many sequences run at once: the line says both (it counted every head, and said nothing of it), and
    the streaming pool's bytes (KV memory beside the dense pool's KiB per token)."""
    from tiny_models import make_tiny_numpy

    from lserve_lite.kv.layout import page_bytes

    d = make_tiny_numpy(tmp_path / "m", hidden=256)  # head_dim 64: 1 KiB a token in dense mode
    (d / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    sparse = dict(enabled=True, page_size=16, sub_pages=4, token_budget=64, prefill_sink=16, prefill_local=64,
                  decode_sink=16, decode_local=32)  # fmt: skip
    cfg = dict(page_size=16, max_num_seqs=4, num_kv_pages=64)
    dense = LLM(str(d), backend="cpu", config=EngineConfig(**cfg)).engine
    eng = LLM(str(d), backend="cpu", config=EngineConfig(**cfg, sparse=sparse)).engine

    def kib(line: str) -> float:
        return float(re.search(r"([\d.]+) KiB per token", line).group(1))

    assert kib(eng.kv_summary()) < kib(dense.kv_summary())  # half the heads stream, statistics added
    per_seq = eng.layout.stream_pages_per_seq
    stream_gib = eng.blocks.num_stream_pages * page_bytes(eng.cfg, 16, eng.kv_bytes, eng.layout, 4)[1] / 2**30
    want = f"streaming pool {eng.blocks.num_stream_pages} pages (sink + local window, {stream_gib:.2f} GiB): "
    assert want + f"{eng.blocks.num_stream_pages // per_seq} sequences at once" in eng.kv_summary()
    assert "streaming pool" not in dense.kv_summary()
    one = LLM(str(d), backend="cpu", config=EngineConfig(**cfg | {"max_num_seqs": 1}, sparse=sparse)).engine
    assert one.blocks.num_stream_pages // per_seq == 1
    assert one.kv_summary().endswith(": 1 sequence at once")  # it said "1 sequences"


@pytest.mark.parametrize("where", ["engine", "request"])
def test_sparse_knobs_named_by_non_strings_are_refused(tiny_llama, where):
    if where == "engine":
        with pytest.raises(InvalidRequestError, match="knobs are named by strings"):
            EngineConfig(sparse={1: 2})
        return
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16, sparse={"enabled": True,
              "static_sparsity": 0.0}))  # fmt: skip
    with pytest.raises(InvalidRequestError, match="knobs are named by strings"):
        llm.engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=2), sparse={1: 2})
    assert not llm.engine.has_unfinished()


def test_no_dense_heads_startup_line_names_the_streaming_pool(tmp_path):
    from tiny_models import make_tiny_numpy

    d = make_tiny_numpy(tmp_path / "m")
    (d / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    sparse = dict(enabled=True, static_sparsity=1.0, page_size=16, sub_pages=4, token_budget=64,
                  prefill_sink=16, prefill_local=64, decode_sink=16, decode_local=32)  # fmt: skip
    llm = LLM(str(d), backend="cpu", config=EngineConfig(page_size=16, max_num_seqs=2, sparse=sparse))
    pages = llm.engine.blocks.num_stream_pages
    assert llm.engine.layout.streaming_only and 0 < pages < 1 << 20
    assert (
        llm.engine.kv_summary().startswith("KV cache fp16 (streaming heads only")
        and f"{pages} pages" in llm.engine.kv_summary()
    )
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0].token_ids) == 4


@pytest.mark.parametrize(
    "kw,match",
    [  # before the bounds: a deque of 10**9 selection slots (a hang), a 21.8 PiB allocation attempt
        (dict(max_num_seqs=10**9), "max_num_seqs must be an integer in"),
        (dict(max_num_batched_tokens=10**12), "max_num_batched_tokens must be an integer in"),
        (dict(num_kv_pages=10**12), "num_kv_pages must be an integer in"),
    ],
)
def test_engine_limits_have_upper_bounds(kw, match):
    with pytest.raises(InvalidRequestError, match=match):
        EngineConfig(**kw)


def test_cpu_kv_limit_is_the_hosts_memory(tmp_path):
    from lserve_lite.backends.cpu import CpuOps, host_memory_bytes

    ops = CpuOps()
    assert 2**28 < ops.kv_limit_bytes() < 2**50 and ops.kv_limit_bytes(2**20) == ops.kv_limit_bytes() - 2**20
    # a container's cgroup limit (v2 "max" is none; a missing file is none) where lower than the host's memory
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    v2.write_text("max\n")
    v1.write_text(f"{2**30}\n")
    assert host_memory_bytes((str(v2), str(tmp_path / "none"))) == host_memory_bytes(())
    assert host_memory_bytes((str(v2), str(v1))) == min(2**30, host_memory_bytes(()))


@pytest.mark.parametrize(
    "messages,match",
    [
        (None, r"a conversation \(a list of message dicts\)"),
        ([], r"a conversation \(a list of message dicts\)"),
        ([[]], "non-empty list of messages"),
        (["hi", "there"], "non-empty list of messages"),
        ([{"content": "hi"}], "string 'role'"),
        ([{"role": "user", "content": 5}], "a string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "a list of text parts"),
    ],
)
def test_chat_refuses_malformed_conversations(llm, messages, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.chat(messages, SamplingParams(max_new_tokens=2))
    assert not llm.engine.has_unfinished()


def test_chat_content_as_text_parts_or_none_renders_as_text(llm):
    """OpenAI's content forms (what the server accepts) render as the plain string would, text parts joined by
    newlines."""
    tok = llm.tokenizer
    plain = tok.render_chat(
        [{"role": "user", "content": "hello\nthere"}, {"role": "assistant", "content": ""}]
    )
    parts = tok.render_chat(
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}],
            },
            {"role": "assistant", "content": None},
        ]
    )
    assert parts == plain and "hello\nthere" in plain


def test_chat_refuses_a_turn_without_content_as_the_server(llm):
    """LLM.chat took a user or tool message with content None (or none) as empty text, while the server refuses it
    with a 400 naming messages[i].content (OpenAI's rule: only an assistant turn may leave its content out).
    It now refuses it in the same line, before anything runs; an assistant turn without content still passes.
    stream, given a conversation, rendered such a turn as empty text too: it refuses it as chat does."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    sp = SamplingParams(max_new_tokens=1)
    for i, m in (
        (2, {"role": "user", "content": None}),
        (1, {"role": "tool", "content": None}),
        (2, {"role": "user"}),
    ):
        for call in (lambda c: llm.chat(c, sp), lambda c: next(llm.stream(c, sp))):
            with pytest.raises(
                InvalidRequestError, match=rf"^messages\[{i}\]\.content: a {m['role']} message needs"
            ):
                call(turns[:i] + [m])
    assert not llm.engine.has_unfinished()
    assert llm.chat(turns + [{"role": "user", "content": "x"}], sp).finish_reason in ("stop", "length")


def test_chat_continues_the_final_message(llm):
    """vLLM's continue_final_message: the prompt ends inside the last message (no end of turn, no new header);
    with the default add_generation_prompt=True it is a clear error and nothing runs."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a b"}]
    sp = SamplingParams(max_new_tokens=2, temperature=0)
    outs = llm.chat([msgs, msgs], sp, add_generation_prompt=False, continue_final_message=True)
    text = llm.tokenizer.decode(outs[0].prompt_token_ids, False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\na b"
    assert outs[1].prompt_token_ids == outs[0].prompt_token_ids
    plain = llm.chat(msgs[:1], sp, add_generation_prompt=False).prompt_token_ids
    assert llm.tokenizer.decode(plain, False) == "<|im_start|>user\nhi<|im_end|>\n"
    with pytest.raises(InvalidRequestError, match="pass add_generation_prompt=False"):
        llm.chat(msgs, sp, continue_final_message=True)
    # a string switch ("no", "false") read as true: the prompt silently got the other shape
    for name in ("add_generation_prompt", "continue_final_message"):
        with pytest.raises(InvalidRequestError, match=rf"^{name} must be True or False, got 'no'$"):
            llm.chat(msgs, sp, **{"add_generation_prompt": False, name: "no"})
        with pytest.raises(InvalidRequestError, match=rf"^{name} must be True or False"):
            llm.tokenizer.apply_chat_template(msgs, **{name: "no"})
    assert not llm.engine.has_unfinished()


def test_chat_of_one_conversation_reads_as_vllms_list_of_one(llm):
    """vLLM's chat returns a list of RequestOutputs; ours returns one conversation's output alone, so vLLM's
    `for output in llm.chat(msgs)` / `llm.chat(msgs)[0]` were a TypeError. The output reads as a list of one
    too (and still as itself: `.text`)."""
    outputs = llm.chat([{"role": "user", "content": "hi"}], sampling_params=SamplingParams(max_tokens=2))
    texts = [output.outputs[0].text for output in outputs]
    assert texts == [outputs.text] and outputs[0] is outputs and outputs[-1] is outputs and len(outputs) == 1
    with pytest.raises(IndexError):
        outputs[1]
    many = llm.chat([[{"role": "user", "content": "hi"}]] * 2, SamplingParams(max_tokens=1))
    assert isinstance(many, list) and len(many) == 2


def test_lora_request_none_passes_as_in_vllm(llm):
    """Code ported from vLLM (lm-evaluation-harness's vLLM backend) passes lora_request=None to generate and chat:
    it was a TypeError. None passes; an adapter is one line (no LoRA)."""
    sp = SamplingParams(max_tokens=1)
    assert len(llm.generate("hi", sp, use_tqdm=False, lora_request=None)) == 1
    assert llm.chat([{"role": "user", "content": "hi"}], sp, lora_request=None).finished
    with pytest.raises(InvalidRequestError, match=r"^lora_request is not supported \(no LoRA adapters\)$"):
        llm.generate("hi", sp, lora_request=object())
    assert not llm.engine.has_unfinished()


def test_generate_takes_older_vllms_prompt_token_ids(llm):
    """Older vLLM's generate(prompt_token_ids=[[...], ...]) (older lm-evaluation-harness's vLLM backend) was a
    TypeError: the prompts as token ids; both given is one line."""
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=[[5, 6], [7]], sampling_params=sp, use_tqdm=False, lora_request=None)
    assert [o.prompt_token_ids for o in outs] == [[5, 6], [7]]
    assert [o.token_ids for o in outs] == [o.token_ids for o in llm.generate([[5, 6], [7]], sp)]
    with pytest.raises(
        InvalidRequestError, match=r"^generate takes prompts or prompt_token_ids \(older vLLM"
    ):
        llm.generate([[5]], sp, prompt_token_ids=[[5]])


def test_chat_names_vllms_positional_use_tqdm(llm):
    """vLLM's chat(messages, sampling_params, use_tqdm): its third argument here is tools, and False there was
    refused as malformed tools; the line says to pass use_tqdm by keyword."""
    with pytest.raises(
        InvalidRequestError, match=r"^chat's third argument is tools, got False: pass use_tqdm by"
    ):
        llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1), False)
    assert not llm.engine.has_unfinished()


def test_chat_takes_vllms_chat_template_and_its_kwargs(llm):
    """vLLM's LLM.chat(chat_template=..., chat_template_kwargs=...) was a TypeError: the caller's template renders
    the prompt (compiled once by its text), with the extra variables; a bad one is one line naming the option."""
    from lserve_lite import tokenizer

    msgs = [{"role": "user", "content": "hi"}]
    sp = SamplingParams(max_tokens=1)
    tmpl = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if think %}<t>{% endif %}:"
    before = tokenizer._caller_template.cache_info().misses
    assert llm.chat(msgs, sp, chat_template=tmpl).prompt == "[user]hi:"
    out = llm.chat(msgs, sp, chat_template=tmpl, chat_template_kwargs={"think": True})
    assert out.prompt == "[user]hi<t>:" and out.prompt_token_ids == llm.tokenizer.encode(
        "[user]hi<t>:", False
    )
    assert tokenizer._caller_template.cache_info().misses == before + 1
    # the model's own template takes extra variables too (Qwen3's enable_thinking), as transformers renders them
    assert llm.chat(
        msgs, sp, chat_template_kwargs={"enable_thinking": False}
    ).prompt == llm.tokenizer.render_chat(msgs)
    for kw, match in [
        (dict(chat_template="{% for %}"), r"^chat_template has a Jinja syntax error at line 1 "),
        (dict(chat_template=5), r"^chat_template must be a non-empty string of Jinja, got 5$"),
        (
            dict(chat_template="x" * (2 << 20)),
            r"^chat_template has 2097152 characters; at most 1048576 allowed$",
        ),
        (
            dict(chat_template_kwargs={"messages": []}),
            r"^chat_template_kwargs may not set 'messages', which the ",
        ),
        (dict(chat_template_kwargs={"range": len}), r"^chat_template_kwargs may not set 'range'"),
        (dict(chat_template_kwargs=["x"]), r"^chat_template_kwargs must be a dict of template variables"),
    ]:
        with pytest.raises(InvalidRequestError, match=match):
            llm.chat(msgs, sp, **kw)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("name", ["continue_final_message", "chat_template", "tokenize"])
def test_chat_template_kwargs_refuse_the_renderings_own_options(llm, name):
    """vLLM's chat reads continue_final_message in chat_template_kwargs as the option (and refuses chat_template and
    tokenize there): here it became a template variable no template reads, and the reply started a new turn."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(InvalidRequestError, match=f"^chat_template_kwargs may not set '{name}', which the "):
        llm.chat(
            msgs, SamplingParams(max_tokens=1), add_generation_prompt=False, chat_template_kwargs={name: True}
        )
    assert not llm.engine.has_unfinished()


def test_stream_refuses_several_candidates(llm):
    with pytest.raises(InvalidRequestError, match="one candidate"):
        next(llm.stream([5, 6, 7], SamplingParams(n=2, max_new_tokens=2)))
    assert not llm.engine.has_unfinished()


def test_generated_request_ids_skip_explicit_ones(llm):
    """A request without an id gets one no request in flight has (an explicit id equal to the next generated
    one made that request fail with 'duplicate request id')."""
    sp = SamplingParams(max_new_tokens=2, temperature=0)
    first = llm.engine.add_request([5, 6], sp)
    ahead = f"req-{int(first.removeprefix('req-')) + 2}"  # two ids on: the next generated one but one
    rids = [first, llm.engine.add_request([5, 6], sp, request_id=ahead)]
    rids += [llm.engine.add_request([5, 6], sp) for _ in range(2)]
    assert len(set(rids)) == 4 and len(llm.generate([[5, 6], [7]], sp)) == 2
    for rid in rids:
        llm.engine.abort(rid)
    llm.engine.step()
    assert not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0


def test_streams_and_generate_interleaved_lose_nothing(llm, monkeypatch):
    """Two open streams, and generate while a stream is open, each get every output of their own requests
    (each dropped the others' outputs: tokens went missing, and a stream whose last output another had taken
    stepped an idle engine forever)."""
    sp = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    a, b = [5, 6, 7, 8], [9, 10, 11]
    want_a, want_b = (llm.generate([p], sp)[0].token_ids for p in (a, b))
    step = llm.engine.step_into  # LLM's steps

    def checked(outs):
        assert llm.engine.has_unfinished(), "an idle engine stepped: a stream lost its last output"
        step(outs)

    monkeypatch.setattr(llm.engine, "step_into", checked)
    got_a, got_b = [], []
    for oa, ob in zip(llm.stream_outputs(a, sp), llm.stream_outputs(b, sp)):
        got_a += oa.token_ids
        got_b += ob.token_ids
    assert (got_a, got_b) == (want_a, want_b)
    s = llm.stream_outputs(a, sp)
    first = next(s).token_ids
    assert llm.generate([b], sp)[0].token_ids == want_b
    assert first + [t for o in s for t in o.token_ids] == want_a
    assert not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0


def test_generate_from_two_threads_takes_turns(llm, monkeypatch):
    """One LLM called from two threads at once: steps take turns and each call gets exactly its own outputs
    (both threads stepped the engine together: wrong tokens, or a scheduler stalled on negative counts)."""
    sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    want = [llm.generate([p], sp)[0].token_ids for p in ([5, 6, 7], [9, 10, 11])]
    got, other_in, running, most = {}, threading.Event(), [0], [0]
    other = threading.Thread(target=lambda: got.update(b=llm.generate([[9, 10, 11]], sp)[0].token_ids))
    step = llm.engine.step_into  # LLM's steps

    def watched(outs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            if threading.current_thread() is other:
                other_in.set()
            elif (
                not other.is_alive() and "b" not in got
            ):  # the main thread's first step: start the other call
                other.start()
                other_in.wait(timeout=2)  # set only if the other thread's step got in beside this one
            step(outs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(llm.engine, "step_into", watched)
    got["a"] = llm.generate([[5, 6, 7]], sp)[0].token_ids
    other.join()
    assert most[0] == 1 and [got["a"], got["b"]] == want
    assert not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0


def test_a_streamed_token_takes_one_turn_of_the_lock(llm, monkeypatch):
    """A step and the read of its outputs share one turn of the LLM's lock: one a token of a stream (it took two,
    the read in a turn of its own: three context managers more in every decode step's host time)."""
    sp = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    turn, turns = llm._turn, [0]

    def counted():
        turns[0] += 1
        return turn()

    monkeypatch.setattr(llm, "_turn", counted)
    outs = list(llm.stream_outputs([5, 6, 7], sp))
    assert [len(o.token_ids) for o in outs] == [1] * 8
    assert turns[0] == 1 + 8  # the request added, then one a token
    assert not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0


def test_grammars_are_built_outside_the_llms_lock(llm, monkeypatch):
    """A response_format's grammar (up to seconds for a large schema) was built inside add_request, under the
    LLM's lock, so every other thread's stream stalled meanwhile: each is built before the lock is taken."""
    pytest.importorskip("llguidance")
    matcher, held = llm.engine.grammars.matcher, []

    def watched(fmt):
        held.append(llm._lock._is_owned())  # a turn (the lock) held
        return matcher(fmt)

    monkeypatch.setattr(llm.engine.grammars, "matcher", watched)
    sp = SamplingParams(max_new_tokens=3, response_format={"type": "json_object"}, n=2)
    assert len(llm.generate(["a", "b"], sp)) == 4
    stream_sp = SamplingParams(max_new_tokens=3, response_format={"type": "json_object"})
    assert isinstance("".join(llm.stream("c", stream_sp)), str)
    assert held == [False] * 5
    assert not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0


def test_a_grammar_for_a_model_without_an_eos_id_is_a_clear_error(llm):
    """A model that names no end id (a Qwen2 config.json without eos_token_id, as transformers reads it, or a GGUF
    without one) made a response_format request raise llguidance's ValueError: now one InvalidRequestError line."""
    pytest.importorskip("llguidance")
    from lserve_lite.engine.structured import Grammars

    grammars = Grammars(llm.engine.tokenizer, llm.engine.cfg.vocab_size, [])
    with pytest.raises(InvalidRequestError, match=r"^structured outputs need the model's end-of-sequence id"):
        grammars.matcher({"type": "json_object"})


def test_stream_closed_inside_a_step_steps_nothing_itself(llm, monkeypatch):
    """A stream dropped while a step runs (garbage collection may close it anywhere) aborts its request for the
    next step to free, without stepping the engine inside that step (it did: a step nested in a step)."""
    sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    s = llm.stream_outputs([5, 6, 7], sp)
    next(s)
    running, most = [0], [0]
    step = llm.engine.step_into  # LLM's steps

    def watched(outs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            s.close()  # as the collector would, in the middle of another call's step
            step(outs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(llm.engine, "step_into", watched)
    assert len(llm.generate([[9, 10, 11]], sp)[0].token_ids) == 6
    assert most[0] == 1 and not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0


@pytest.mark.parametrize(
    "prompts,params,match",
    [
        (None, None, "prompts must be"),
        (5, None, "prompts must be"),
        ({"a": 1}, None, "prompts must be"),
        (["hi", 5], None, "each prompt"),
        ("hi", {"max_new_tokens": 3}, "params must be"),
        (["a", "b"], [SamplingParams()], "1 SamplingParams for 2 prompts"),
    ],
)  # fmt: skip
def test_generate_refuses_wrong_types(llm, prompts, params, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.generate(prompts, params)
    assert not llm.engine.has_unfinished()


def test_stream_and_chat_check_their_params_as_generate_does(llm):
    """stream with a dict for params, and chat with tools, raised AttributeError ("'dict' object has no attribute
    'n'"), and chat with tools took no list of params, one per conversation, as chat without tools does."""
    msgs = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for call in (lambda: next(llm.stream("hi", {"max_new_tokens": 2})),
                 lambda: llm.chat(msgs, {"max_new_tokens": 2}, tools=tools)):  # fmt: skip
        with pytest.raises(InvalidRequestError, match="params must be a SamplingParams"):
            call()
    sp = [SamplingParams(max_new_tokens=2, temperature=0), SamplingParams(max_new_tokens=3, temperature=0)]
    assert [len(o.prompt_token_ids) > 0 for o in llm.chat([msgs, msgs], sp, tools=tools)] == [True, True]
    assert not llm.engine.has_unfinished()


def test_generate_takes_a_sampling_params_per_prompt(llm):
    assert llm.generate([]) == []
    outs = llm.generate(
        ["a", "b"], [SamplingParams(max_new_tokens=2, temperature=0), SamplingParams(max_new_tokens=3)]
    )
    assert len(outs) == 2 and len(outs[0].token_ids) <= 2 and 1 <= len(outs[1].token_ids) <= 3


def test_generate_takes_token_ids_as_numpy_or_tuples(llm):
    """generate accepts the id forms stream and logits take (a NumPy array, NumPy integers, a tuple) as one prompt."""
    ids, sp = [5, 9, 11, 3], SamplingParams(max_new_tokens=3, temperature=0)
    want = llm.generate(ids, sp)[0].token_ids
    for form in (np.array(ids), [np.int32(t) for t in ids], tuple(ids)):
        assert llm.generate(form, sp)[0].token_ids == want
    outs = llm.generate([np.array(ids), tuple(ids), "hi"], sp)
    assert [o.token_ids for o in outs[:2]] == [want, want] and len(outs) == 3


def test_generate_takes_vllms_prompt_dicts(llm):
    """vLLM's prompt dicts (TextPrompt, TokensPrompt) were refused; other keys (multi-modal data) are refused, not
    dropped, and so is a conversation, which goes to chat."""
    ids, sp = [5, 9, 11, 3], SamplingParams(max_new_tokens=3, temperature=0)
    want = [o.token_ids for o in llm.generate([ids, "hi"], sp)]
    outs = llm.generate([{"prompt_token_ids": ids}, {"prompt": "hi"}], sp)
    assert [o.token_ids for o in outs] == want
    assert llm.generate({"prompt_token_ids": ids, "prompt": "x"}, sp)[0].token_ids == want[0]
    assert [t for o in llm.stream_outputs({"prompt": "hi"}, sp) for t in o.token_ids] == want[1]
    for bad in ({"prompt": "hi", "multi_modal_data": {}}, [{"role": "user", "content": "hi"}]):
        with pytest.raises(InvalidRequestError, match=r"vLLM's prompt dicts .* got a dict with the keys \["):
            llm.generate(bad, sp)
    with pytest.raises(InvalidRequestError, match="prompt must be"):
        llm.generate({"prompt": 5}, sp)
    # text under prompt_token_ids (or ids under prompt) ran as the other kind of prompt: a different request
    for bad, match in (
        ({"prompt_token_ids": "hi"}, "a list of token ids, got str"),
        ({"prompt": ids}, "a string, got list"),
    ):
        with pytest.raises(InvalidRequestError, match=rf"^a prompt dict's \w+ must be {match}$"):
            llm.generate([bad], sp)
    assert not llm.engine.has_unfinished()


def test_outputs_read_as_vllms_request_outputs(llm):
    """vLLM's RequestOutput shape (`out.outputs[0].text`, `out.prompt`, `out.request_id`, `out.finished`) was an
    AttributeError: a typical vLLM snippet runs unchanged. Each output is one candidate (n > 1: n outputs in a row,
    each holding itself at its `index`), and keeps its own attributes."""
    prompts = ["Hello, my name is", [5, 6]]
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=3, seed=0, ignore_eos=True)
    outputs = llm.generate(prompts, sampling_params)
    seen = []
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        seen.append((prompt, generated_text, output.outputs[0].token_ids, output.outputs[0].finish_reason))
        assert (
            output.finished
            and output.request_id
            and output.prompt_token_ids == output.outputs[0].prompt_token_ids
        )
    assert seen == [
        (p if isinstance(p, str) else None, o.text, o.token_ids, "length") for p, o in zip(prompts, outputs)
    ]
    assert len({o.request_id for o in outputs}) == 2 and all(len(o.token_ids) == 3 for o in outputs)
    outs = llm.generate("hi", SamplingParams(max_tokens=2, n=3, logprobs=0, ignore_eos=True))
    assert [c.index for o in outs for c in o.outputs] == [0, 1, 2]
    assert outs[1].cumulative_logprob == pytest.approx(sum(t.logprob for t in outs[1].logprobs))
    assert llm.generate("hi", SamplingParams(max_tokens=1))[0].cumulative_logprob is None
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2))
    assert vars(chat.outputs[0]) == vars(chat) and chat.prompt == llm.tokenizer.render_chat(
        [{"role": "user", "content": "hi"}]
    )


def test_num_cached_tokens_counts_the_prompt_served_by_the_prefix_cache(llm):
    """vLLM's RequestOutput.num_cached_tokens was an AttributeError: it is the prompt tokens the prefix cache
    served (none the first time, whole pages of the prompt the second), as the engine's step outputs count them."""
    ids = list(range(5, 5 + 3 * llm.engine.ecfg.page_size + 1))
    sp = SamplingParams(max_tokens=1)
    first, again = (
        llm.generate({"prompt_token_ids": ids}, sp)[0],
        llm.generate({"prompt_token_ids": ids}, sp)[0],
    )
    assert first.num_cached_tokens == 0
    assert 0 < again.num_cached_tokens < len(ids) and again.num_cached_tokens % llm.engine.ecfg.page_size == 0
    assert llm.chat([{"role": "user", "content": "hi"}], sp).outputs[0].num_cached_tokens == 0  # under a page


def test_stop_reason_names_the_stop_as_vllms(llm):
    """vLLM's CompletionOutput.stop_reason (the stop token id or stop string that ended the reply; None for EOS or
    the length limit) was an AttributeError."""
    greedy = dict(max_tokens=6, temperature=0, ignore_eos=True)
    free = llm.generate([[5, 6]], SamplingParams(**greedy))[0]
    assert free.outputs[0].stop_reason is None and free.finish_reason == "length"
    tok = free.token_ids[1]
    by_id = llm.generate([[5, 6]], SamplingParams(**greedy, stop_token_ids=[tok]))[0]
    assert (by_id.finish_reason, by_id.stop_reason, by_id.token_ids[-1]) == ("stop", tok, tok)
    text = llm.generate([[5, 6]], SamplingParams(**greedy, stop=["\x00\x01never", free.text[1:3]]))[0]
    assert (text.finish_reason, text.stop_reason) == ("stop", free.text[1:3])


def test_min_tokens_holds_off_eos_stop_ids_and_stop_strings_as_vllms(llm):
    """vLLM's min_tokens (refused before): until that many tokens EOS and stop_token_ids are masked out and stop
    strings not searched; then each ends the reply as before."""
    eos = min(llm.engine.eos_ids)
    to_eos = dict(max_tokens=8, temperature=0, logit_bias={eos: 100})
    assert llm.generate([[5, 6]], SamplingParams(**to_eos))[0].token_ids == [eos]
    held = llm.generate([[5, 6]], SamplingParams(**to_eos, min_tokens=4))[0]
    assert len(held.token_ids) == 5 and held.token_ids[-1] == eos and eos not in held.token_ids[:4]
    assert held.finish_reason == "stop"
    free = llm.generate([[5, 6]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    tok = free.token_ids[0]
    by_id = dict(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=[tok], logit_bias={tok: 100})
    assert llm.generate([[5, 6]], SamplingParams(**by_id))[0].token_ids == [tok]
    late = llm.generate([[5, 6]], SamplingParams(**by_id, min_tokens=3))[0]
    assert late.token_ids[:3].count(tok) == 0 and late.token_ids[3] == tok and late.stop_reason == tok
    stop = dict(max_tokens=8, temperature=0, ignore_eos=True, stop=[free.text[1:3]])
    assert llm.generate([[5, 6]], SamplingParams(**stop))[0].text == free.text[:1]
    on = llm.generate([[5, 6]], SamplingParams(**stop, min_tokens=8))[0]
    assert len(on.token_ids) == 8 and on.text.startswith(free.text[:3])


def test_min_tokens_keeps_its_tokens_text_whole_from_stop_strings_as_vllms(llm):
    """vLLM (since its PR 22014) searches stop strings once more than min_tokens tokens are out, past those tokens'
    text, as EOS comes after min_tokens tokens at the earliest: a stop in the min_tokens-th token's text cut the
    reply here to fewer tokens' text. Each case against that rule over the unstopped reply's per-token text."""
    greedy = dict(max_tokens=10, temperature=0, ignore_eos=True)
    steps = [o.text for o in llm.stream_outputs([5, 6], SamplingParams(**greedy))]
    full, ends = "".join(steps), np.cumsum([len(s) for s in steps]).tolist()  # text after each token
    cases = [(m, full[ends[m - 1] - 1]) for m in range(1, 10) if steps[m - 1]]  # last character of token m
    assert len(cases) >= 5
    for m, stop in cases:
        out = llm.generate([[5, 6]], SamplingParams(**greedy, stop=[stop], min_tokens=m))[0]
        at = full.find(stop, ends[m - 1])
        assert (out.text, out.finish_reason) == ((full[:at], "stop") if at >= 0 else (full, "length")), m


def test_min_tokens_masks_eos_with_ignore_eos_too_as_vllms(llm):
    """vLLM masks EOS before min_tokens even with ignore_eos (its all_stop_token_ids): EOS, biased to come first,
    was sampled from the first token here; now only after min_tokens, and then it ends nothing."""
    eos = min(llm.engine.eos_ids)
    sp = SamplingParams(max_tokens=6, min_tokens=3, temperature=0, ignore_eos=True, logit_bias={eos: 100})
    out = llm.generate([[5, 6]], sp)[0]
    assert eos not in out.token_ids[:3] and out.token_ids[3:] == [eos] * 3 and out.finish_reason == "length"


def test_logprobs_read_as_vllms_dicts(llm):
    """vLLM's logprobs are a dict per token, {token id: Logprob(logprob, rank, decoded_token)}: ported code
    (`lp[token_id].logprob`, `lp.items()`) was an AttributeError / TypeError on our entries. Each entry reads as
    that dict (the top alternatives ranked from 1, and the chosen token), keeping its own fields."""
    out = llm.generate(
        [[5, 6, 7]], SamplingParams(max_tokens=3, logprobs=2, prompt_logprobs=1, temperature=0)
    )[0]
    for token_id, lp in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        assert lp[token_id].logprob == lp.logprob and lp[token_id].rank == 1  # greedy: the most likely
        assert [r.rank for _, r in lp.items()] == [1, 2] and list(lp) == [t for t, _ in lp.top]
    assert out.prompt_logprobs[0] is None
    assert [(t, e[t].logprob) for e, t in zip(out.prompt_logprobs[1:], [6, 7])] == [
        (e.token_id, e.logprob) for e in out.prompt_logprobs[1:]
    ]
    far = out.logprobs[0].__class__(9, -9.0, [(3, -0.1)])  # a sampled token outside the top: rank unknown
    assert dict(far) == {9: far[9], 3: far[3]} and (far[9].rank, far[3].rank, far[9].logprob) == (
        None,
        1,
        -9.0,
    )


def test_logprob_dicts_name_the_chosen_token_first_as_vllms(llm):
    """vLLM's dict of a position holds the chosen token first, then the top alternatives (ported code reads
    `next(iter(lp))` as the token): a sampled token ranked 2nd or lower came after the tokens ranked above it."""
    sp = SamplingParams(
        max_tokens=16, logprobs=20, prompt_logprobs=20, temperature=0.5, seed=3, ignore_eos=True
    )
    out = llm.generate([[5, 6, 7, 8, 9, 10, 11, 12]], sp)[0]
    assert [next(iter(lp)) for lp in out.logprobs] == out.token_ids
    assert [next(iter(lp)) for lp in out.prompt_logprobs[1:]] == out.prompt_token_ids[1:]
    ranks = [lp[t].rank for lp, t in zip(out.logprobs, out.token_ids)]
    # a chosen token inside the top, below its first: the case the order is about
    assert any(r is not None and r > 1 for r in ranks), ranks
    assert all(list(lp)[1:] == [t for t, _ in lp.top if t != lp.token_id] for lp in out.logprobs)


def test_logprobs_carry_vllms_decoded_token(llm):
    """vLLM's Logprob.decoded_token is each id decoded alone (ported code prints it beside the logprob): it was
    None. generate and chat fill it for every entry, generated and prompt tokens alike."""
    tok = llm.tokenizer
    sp = SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=2, temperature=0, ignore_eos=True)
    out = llm.generate("the quick brown fox", sp)[0]
    entries = [*out.logprobs, *out.prompt_logprobs[1:]]
    assert all(lp.decoded_token == tok.decode([t]) for e in entries for t, lp in e.items())
    assert any(lp.decoded_token for e in entries for lp in e.values())  # not all empty text
    chat = llm.chat([{"role": "user", "content": "hi"}], sp)
    assert [e[t].decoded_token for e, t in zip(chat.logprobs, chat.token_ids)] == [
        tok.decode([t]) for t in chat.token_ids
    ]


def test_seeded_candidates_repeat_alone_and_in_any_batch_as_vllms(llm):
    """vLLM's seed: a seeded request samples the same tokens alone and beside other requests, and candidate i of
    n > 1 runs with seed + i (vLLM's child requests), so the candidates differ and each can be drawn again."""
    sp = SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=3, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate([[5, 6, 7]], sp)]
    others = [SamplingParams(max_tokens=9, temperature=0.7), SamplingParams(max_tokens=2, seed=1)]
    mixed = llm.generate([[9, 9], [5, 6, 7], [4]], [others[0], sp, others[1]])
    assert [o.token_ids for o in mixed[1:4]] == alone and [o.index for o in mixed[1:4]] == [0, 1, 2]
    assert len({tuple(t) for t in alone}) == 3
    one = SamplingParams(max_tokens=6, temperature=1.0, seed=13, ignore_eos=True)
    assert llm.generate([[5, 6, 7]], one)[0].token_ids == alone[2]


def test_sampling_params_keyword_is_vllms(llm):
    """vLLM's generate / chat name their parameters `sampling_params`; code ported from it, which passes them by
    that keyword, got a TypeError (the keyword here was `params`)."""
    sp = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    want = llm.generate("hi", sp)[0].token_ids
    assert llm.generate("hi", sampling_params=sp)[0].token_ids == want
    assert [t for o in llm.stream_outputs("hi", sampling_params=sp) for t in o.token_ids] == want
    assert "".join(llm.stream("hi", sampling_params=sp)) == llm.tokenizer.decode(want)
    chat = [{"role": "user", "content": "hi"}]
    assert llm.chat(chat, sampling_params=sp).token_ids == llm.chat(chat, sp).token_ids
    with pytest.raises(InvalidRequestError, match="^sampling_params must be a SamplingParams"):
        llm.generate("hi", sampling_params={"max_tokens": 3})


def test_use_tqdm_draws_vllms_progress_bar(llm, capsys):
    """vLLM's use_tqdm keyword was a TypeError; it draws a bar of finished sequences on stderr (off by default)."""
    sp = SamplingParams(max_new_tokens=2, temperature=0)
    want = [o.token_ids for o in llm.generate(["a", "b"], sp)]
    assert capsys.readouterr().err == ""
    assert [o.token_ids for o in llm.generate(["a", "b"], sp, use_tqdm=True)] == want
    assert "Processed sequences" in capsys.readouterr().err
    llm.chat([{"role": "user", "content": "hi"}], sp, use_tqdm=True)
    assert "1/1" in capsys.readouterr().err
    with pytest.raises(InvalidRequestError, match="use_tqdm must be True or False"):
        llm.generate("a", sp, use_tqdm="yes")


def test_params_changed_after_construction_are_checked_again(llm):
    sp = SamplingParams(max_new_tokens=4)
    sp.max_new_tokens = 0
    with pytest.raises(InvalidRequestError, match="max_new_tokens must be"):
        llm.generate("hi", sp)
    with pytest.raises(InvalidRequestError, match="stop_token_ids token id 1000000000 is not in"):
        llm.generate("hi", SamplingParams(stop_token_ids=[10**9]))
    assert not llm.engine.has_unfinished()


def test_interrupted_generate_leaves_nothing_running(llm, monkeypatch):
    """Ctrl-C (or any error) inside generate's loop aborts its batch: no orphan keeps decoding or holds pages."""
    calls = []
    step = llm.engine.step_into  # LLM's steps

    def interrupted(outs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        step(outs)

    with monkeypatch.context() as mp:
        mp.setattr(llm.engine, "step_into", interrupted)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(["x", "y"], SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(cuda_graphs="no"), "cuda_graphs must be True or False"),
        (dict(prefix_caching=None), "prefix_caching must be True or False"),
        (dict(sparse="x"), "sparse must be"),
        (dict(sparse={"enabled": True, "token_budget": "x"}), "token_budget must be int"),
        (dict(sparse={"bogus": 1}), "unknown knob"),
    ],
)  # fmt: skip
def test_engine_config_types(kw, match):
    with pytest.raises(InvalidRequestError, match=match):
        EngineConfig(**kw)
    assert EngineConfig(sparse={"enabled": True}).sparse.enabled


def test_llm_refuses_wrong_argument_types(tiny_llama):
    for args, kw, match in (((5,), {}, "model must be"), (("",), {}, "model must be"),
                            ((str(tiny_llama),), {"config": {"max_num_seqs": 2}}, "config must be"),
                            ((str(tiny_llama),), {"bogus": 1}, "bogus"),
                            # vLLM's engine arguments (code ported from it) are told the name here
                            ((str(tiny_llama),), {"max_model_len": 64, "tensor_parallel_size": 2},
                             r"^LLM: got an unexpected keyword argument 'tensor_parallel_size' \(vLLM's name; here: "
                             r"tensor_parallel\)$"),
                            # and those with no counterpart, what to do instead (they were "unexpected" alone)
                            ((str(tiny_llama),), {"trust_remote_code": True},
                             r"^LLM: got an unexpected keyword argument 'trust_remote_code' \(vLLM's; not an option "
                             r"here: no code from the model files is run: leave it out\)$"),
                            ((str(tiny_llama),), {"dtype": "bfloat16"}, r"'dtype' \(vLLM's; not an option here: "),
                            # common in vLLM's examples and benchmarks, "unexpected" alone until 2026-12-07
                            ((str(tiny_llama),), {"disable_log_stats": True}, r"'disable_log_stats' \(vLLM's; not an "
                             r"option here: no stats are logged: leave it out\)$"),
                            ((str(tiny_llama),), {"max_seq_len_to_capture": 8192}, r"\(vLLM's; not an option here: "),
                            ((str(tiny_llama),), {"pipeline_parallel_size": 2}, r"tensor_parallel splits the model"),
                            ((str(tiny_llama),), {"enable_lora": True}, r"\(vLLM's; not an option here: no LoRA"),
                            # the keywords named as such (it read "(got max_model_len=)")
                            ((str(tiny_llama),), {"config": EngineConfig(), "max_model_len": 64, "max_num_seqs": 1},
                             r"or its fields as keywords, not both: got config and max_model_len, max_num_seqs$")):  # fmt: skip
        with pytest.raises(InvalidRequestError, match=match):
            LLM(*args, backend="cpu", **kw)


def test_add_request_refuses_wrong_types(llm):
    with pytest.raises(InvalidRequestError, match="params must be"):
        llm.engine.add_request("hi", {"max_new_tokens": 2})
    with pytest.raises(InvalidRequestError, match="sparse must be"):
        llm.engine.add_request("hi", SamplingParams(), sparse="x")


def test_logits_refuses_bad_ids_in_one_plain_line(llm):
    """LLM.logits / LLMEngine.score name the scored sequence (the messages read "token_ids token ids must be")."""
    for ids, match in (([5, 1.5], r"^scored sequence token ids must be integers, got 1.5$"),
                       ([5, 10**9], r"^scored sequence token ids must be in \[0, \d+\), got 1000000000$"),
                       ([], r"^scored sequence is empty$")):  # fmt: skip
        with pytest.raises(InvalidRequestError, match=match):
            llm.logits(ids)
    assert llm.logits([5, 6]).shape[0] == 2


def test_closed_engine_refuses_every_call(tiny_llama):
    """After LLMEngine.close a one-process LLM went on generating (a tensor-parallel one blamed a worker that
    'died (exit code 0)'): every call, and a stream open at the close, now gets one line naming the close."""
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16))
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    s = llm.stream_outputs([5, 6, 7], sp)
    next(s)
    llm.engine.close()
    for call in (lambda: llm.generate("hi", sp), lambda: llm.logits([5, 6]), lambda: next(s)):
        with pytest.raises(LServeError, match=r"^this engine was closed \(LLMEngine.close\)"):
            call()


def test_llm_close_and_with_block(tiny_llama):
    """LLM had no close() nor `with` use (users reached into llm.engine.close()), and a stream open at the
    close raised from its own clean-up (garbage collection printed "Exception ignored"): close is idempotent,
    every later call gets one line naming it, and open streams close quietly."""
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16)) as llm:
        s, idle = llm.stream_outputs([5, 6, 7], sp), llm.stream_outputs([8, 9], sp)
        next(s), next(idle)
        assert len(llm.generate("hi", sp)[0].token_ids) == 4
    llm.close()
    idle.close()  # its clean-up steps nothing on the closed engine
    calls = (lambda: llm.generate("hi", sp), lambda: llm.chat([{"role": "user", "content": "hi"}], sp),
             lambda: next(llm.stream("hi", sp)), lambda: llm.logits([5, 6]), lambda: next(s))  # fmt: skip
    for call in calls:
        with pytest.raises(
            LServeError, match=r"^this LLM was closed \(LLM.close\): make a new LLM to go on$"
        ):
            call()
    s.close()
    assert llm.engine.closed


def test_llm_close_releases_the_model_and_kv_cache_now(tiny_llama):
    """LLM.close stopped the engine but kept its runner: the weights and KV cache stayed in memory for as long as
    the closed LLM was referenced (a notebook's variable, a server's attribute). They go at the close."""
    import weakref

    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16))
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    s = llm.stream_outputs([5, 6, 7], sp)  # a stream left open at the close holds the LLM
    next(s)
    run = llm.engine.runner
    refs = [weakref.ref(x) for x in (run, run.model, run.cache)]
    del run
    llm.close()
    assert [r() for r in refs] == [None] * 3
    with pytest.raises(LServeError, match=r"^this LLM was closed"):
        next(s)
    llm.engine.blocks.page_ops.append(("clear", [1], []))  # page ops left (the evaluation harness runs them)
    with pytest.raises(LServeError, match=r"^this engine was closed"):
        llm.engine.run_page_ops()


def test_close_inside_a_step_of_the_same_thread_is_done_after_it(tiny_llama, monkeypatch):
    """LLM.close from a signal handler (or a callback) run in the middle of a step, on the thread that steps,
    waited forever on the lock its own thread held. It returns at once and the LLM closes as the step ends (the
    call then raises the closed line); any other call made there is refused in one line instead of hanging."""
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16))
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    real, seen = llm.engine.step_into, []  # LLM's steps

    def step(outs):
        if not seen:  # as a SIGTERM handler that closes the LLM would, mid-step
            with pytest.raises(LServeError, match=r"^this LLM was called inside one of its own steps"):
                llm.logits([5, 6])
            llm.close()
            seen.append(llm.engine.closed)
        real(outs)

    monkeypatch.setattr(llm.engine, "step_into", step)
    err: list[BaseException] = []

    def gen() -> None:
        try:
            llm.generate([[5, 6, 7]], sp)
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=gen, daemon=True)
    t.start()
    t.join(timeout=30)  # only a hang waits this long
    assert not t.is_alive(), "close inside a step waited on the lock its own thread held"
    assert seen == [False] and llm.engine.closed and not hasattr(llm.engine, "runner")
    assert re.match(r"this LLM was closed \(LLM.close\)", str(err[0]))


def test_hold_engine_gives_the_engine_and_refuses_the_llms_own_calls_inside(tiny_llama):
    """LLM.hold_engine takes the turn for direct engine calls; this LLM's own calls inside the block would wait for
    the turn this thread holds: refused in one line that names the block, and the LLM works after it."""
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16))
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    with llm.hold_engine() as engine:
        rid = engine.add_request([5, 6, 7], sp)
        ids = []
        while engine.has_unfinished():
            ids += [t for out in engine.step() if out.request_id == rid for t in out.token_ids]
        with pytest.raises(
            LServeError, match=r"^this LLM was called inside .* hold_engine blocks: call it after$"
        ):
            llm.generate([[5, 6, 7]], sp)
    assert llm.generate([[5, 6, 7]], sp)[0].token_ids == ids
    llm.close()
    with pytest.raises(LServeError, match=r"^this LLM was closed"), llm.hold_engine():
        pass


def test_a_stream_closed_during_another_threads_turn_does_not_wait_for_it(tiny_llama):
    """A stream closed (or collected) in one thread while another holds the turn aborts its request without
    waiting for that turn (the lock taken without blocking): the next step frees its pages."""
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16))
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    s = llm.stream_outputs([5, 6, 7], sp)
    next(s)
    closed = threading.Event()
    with llm.hold_engine():
        threading.Thread(target=lambda: (s.close(), closed.set()), daemon=True).start()
        assert closed.wait(10), "the stream's close waited for another thread's turn"
    assert len(llm.generate([[8, 9]], sp)[0].token_ids) == 4
    assert not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0


def test_a_turn_left_by_an_exception_is_over_and_does_its_pending_close(tiny_llama):
    """A turn that ends by an exception still ends: other threads' calls get the lock, and a close asked for
    inside it (as a signal handler would) is done as it ends."""
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16))
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    with pytest.raises(KeyError), llm.hold_engine():
        raise KeyError("in the block")
    got: list = []
    t = threading.Thread(target=lambda: got.append(llm.generate([[5, 6, 7]], sp)), daemon=True)
    t.start()
    t.join(timeout=30)  # only a lock left held waits this long
    assert not t.is_alive() and len(got[0][0].token_ids) == 4
    with pytest.raises(KeyError), llm.hold_engine():
        llm.close()  # inside the turn: returns at once, the turn's end closes
        assert not llm.engine.closed
        raise KeyError("in the block")
    assert llm.engine.closed and not llm._lock._is_owned()


@pytest.mark.parametrize("call", ["generate", "logits", "stream"])
def test_a_call_that_waited_out_a_close_names_llm_close(tiny_llama, monkeypatch, call):
    """A call past its first check that waited for the lock while another thread's LLM.close ran got the
    engine's "LLMEngine.close" message: the check is made again under the lock."""
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16))
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    s = llm.stream_outputs([5, 6, 7], sp)
    next(s)
    real, armed = llm._lock, [True]

    class ClosedWhileWaiting:
        """The LLM's lock; the first wait for it is where another thread's close runs."""

        def __enter__(self):
            if armed.pop() if armed else False:
                llm.close()
            return real.__enter__()

        def __exit__(self, *exc):
            return real.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(llm, "_lock", ClosedWhileWaiting())
    run = {
        "generate": lambda: llm.generate("hi", sp),
        "logits": lambda: llm.logits([5, 6]),
        "stream": lambda: next(s),
    }
    with pytest.raises(LServeError, match=r"^this LLM was closed \(LLM.close\)"):
        run[call]()
    assert not armed


def test_stream_collected_inside_the_engines_lock_does_not_hang(tiny_llama, monkeypatch):
    """A stream in a reference cycle is closed wherever garbage collection runs, e.g. inside add_request's
    locked block: its abort took the engine's lock again and the thread hung for good."""
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16))  # not the shared one
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    s = llm.stream_outputs([5, 6, 7], sp)
    next(s)
    add = llm.engine.scheduler.add

    def add_then_collect(seq):
        s.close()  # as the collector would, here
        add(seq)

    monkeypatch.setattr(llm.engine.scheduler, "add", add_then_collect)
    got = []
    t = threading.Thread(target=lambda: got.append(llm.generate([[9, 10, 11]], sp)[0]), daemon=True)
    t.start()
    t.join(timeout=30)  # only a hang waits this long
    assert not t.is_alive(), "generate hung: a stream's clean-up waited on the lock its own thread held"
    assert len(got[0].token_ids) == 4
    assert not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0


def test_scoring_refused_for_pages_names_the_pool_short(tiny_llama):
    """A score (LLM.logits) is refused when pages held outside the scheduler (the evaluation harness's) leave the pool
    short; the line says which pool and by how much (it named no pool: a full dense pool and LServe's streaming pool
    read the same). A running request's pages are waited for instead (tests/test_scheduler.py)."""
    from lserve_lite.sequence import Sequence

    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=4))
    page = llm.engine.ecfg.page_size
    held = Sequence(list(range(3, 3 + 2 * page)), SamplingParams(max_new_tokens=1))
    llm.engine.blocks.grow(held, 2 * page, slot=False)
    with pytest.raises(
        InvalidRequestError, match=r"score this sequence now \(dense pool: 3 pages needed, [012] free\)"
    ):
        llm.logits(list(range(3, 3 + 3 * page)))
    llm.engine.blocks.release(held)
    assert llm.logits(list(range(3, 3 + 3 * page))).shape[0] == 3 * page
    llm.close()


def test_include_stop_str_in_output_keeps_the_stop_as_vllms(llm):
    """vLLM's include_stop_str_in_output (refused before): the text, generated or streamed, is cut just past the
    stop string that ended it; a stop token's text (EOS, decoded with its special tokens) is kept too."""
    greedy = dict(max_tokens=8, temperature=0, ignore_eos=True)
    free = llm.generate([[5, 6]], SamplingParams(**greedy))[0]
    stop = free.text[1:3]
    sp = SamplingParams(**greedy, stop=["\x00never", stop], include_stop_str_in_output=True)
    out = llm.generate([[5, 6]], sp)[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (free.text[:3], "stop", stop)
    assert "".join(llm.stream([5, 6], sp)) == free.text[:3]
    # nothing is held back while it streams (vLLM's): text past the stop's start is never cut from the reply
    first = [
        next(o.text for o in llm.stream_outputs([5, 6], p) if o.text) for p in (SamplingParams(**greedy), sp)
    ]
    assert first[1] == first[0] != free.text[:3]
    sp.include_stop_str_in_output = False  # set on the object, as vLLM's code sets it
    assert llm.generate([[5, 6]], sp)[0].text == free.text[:1]
    eos = min(llm.engine.eos_ids)
    to_eos = dict(max_tokens=4, temperature=0, logit_bias={eos: 100}, skip_special_tokens=False)
    assert llm.generate([[5, 6]], SamplingParams(**to_eos))[0].text == ""
    kept = SamplingParams(**to_eos, include_stop_str_in_output=True)
    assert llm.generate([[5, 6]], kept)[0].text == llm.tokenizer.token_text(eos)


def test_skip_special_tokens_false_keeps_their_text_as_vllms(llm):
    """vLLM's skip_special_tokens=False (refused before): every special token's text stays in the output text and
    in its streamed deltas; by default they are dropped."""
    bos = llm.tokenizer.token_id("<|im_start|>")
    assert llm.tokenizer.is_special(bos)
    forced = dict(max_tokens=3, temperature=0, logit_bias={bos: 100}, ignore_eos=True)
    assert llm.generate([[5, 6]], SamplingParams(**forced))[0].text == ""
    sp = SamplingParams(**forced, skip_special_tokens=False)
    assert llm.generate([[5, 6]], sp)[0].text == "<|im_start|>" * 3
    assert list(llm.stream([5, 6], sp)) == ["<|im_start|>"] * 3


def test_candidate_finished_is_vllms_method(llm):
    """vLLM's CompletionOutput.finished() is a method: `out.outputs[0].finished()` raised TypeError ('bool' object is
    not callable) where the candidate was the RequestOutput itself; the RequestOutput's `finished` stays a bool."""
    out = llm.generate([[5, 6]], SamplingParams(max_tokens=2, ignore_eos=True))[0]
    cand = out.outputs[0]
    assert out.finished is True and cand.finished() is True
    assert (cand.text, cand.token_ids, cand.finish_reason, cand.index) == (
        out.text,
        out.token_ids,
        "length",
        0,
    )
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2))
    assert chat.finished is True and chat.outputs[0].finished() is True


def test_generate_priority_and_chat_content_format_as_vllms(llm):
    """vLLM's generate(priority=...) and chat(chat_template_content_format=...) were a bare TypeError: their values
    that mean what happens here are taken; others are refused in one line."""
    sp = SamplingParams(max_tokens=1)
    assert len(llm.generate(["a", "b"], sp, priority=[0, 0])) == 2
    with pytest.raises(
        InvalidRequestError, match=r"^priority is not supported \(requests are served first come"
    ):
        llm.generate(["a", "b"], sp, priority=[0, 1])
    with pytest.raises(InvalidRequestError, match=r"^priority is not supported"):  # an array's == is no bool
        llm.generate(["a", "b"], sp, priority=[np.zeros(2), 0])
    # vLLM ranks request i by priority[i]: a list of another length than the prompts' was taken unread
    for short in ([0], [0, 0, 0], []):
        with pytest.raises(InvalidRequestError, match=rf"^{len(short)} priorities for 2 prompts$"):
            llm.generate(["a", "b"], sp, priority=short)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    want = llm.chat(msgs, SamplingParams(max_tokens=2, temperature=0)).text
    for fmt in ("auto", "string"):
        out = llm.chat(msgs, SamplingParams(max_tokens=2, temperature=0), chat_template_content_format=fmt)
        assert out.text == want
    with pytest.raises(InvalidRequestError, match=r"^chat_template_content_format 'openai' is not supported"):
        llm.chat(msgs, sp, chat_template_content_format="openai")
    with pytest.raises(
        InvalidRequestError, match=r"^chat_template_content_format must be 'auto', 'string' or"
    ):
        llm.chat(msgs, sp, chat_template_content_format="jinja")
    with pytest.raises(InvalidRequestError, match=r"^chat_template_content_format must be"):
        llm.chat(msgs, sp, chat_template_content_format=np.array(["auto"]))
    assert not llm.engine.has_unfinished()
