"""vLLM's per-request cache_salt, through LLM.generate's prompt dicts and the server: requests of one salt share
prefix-cache pages, of another salt (or none) they share none; a salt that is not a short non-empty string is
refused in one line."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lserve_lite import EngineConfig, InvalidRequestError, SamplingParams  # noqa: E402
from lserve_lite.engine.intake import MAX_CACHE_SALT  # noqa: E402
from lserve_lite.engine.llm_engine import LLMEngine  # noqa: E402
from lserve_lite.serve.app import create_app  # noqa: E402

CFG = dict(num_kv_pages=32, max_model_len=256, max_num_seqs=8)
GREEDY = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
TEXT = "zq xv " * 15  # 90 tokens of the tiny tokenizer: one whole page (64 tokens)
SALT_RULE = f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT} characters, got "
# (a bad salt, what its error says it got)
BAD = [
    ("", "''"),
    (5, "int"),
    (["a"], "list"),
    (True, "bool"),
    ("s" * (MAX_CACHE_SALT + 1), "257 characters"),
]


@pytest.fixture(scope="module")
def client(tiny_dir):
    """An in-process client of the app on conftest's `tiny_dir`, the model of its `llm` too."""
    engine = LLMEngine(str(tiny_dir), "cpu", EngineConfig(**CFG))
    with TestClient(create_app(engine, served_model_name="tiny")) as c:
        yield c


def test_generate_prompt_dicts_carry_the_salt(llm):
    """{"prompt": ..., "cache_salt": ...} and {"prompt_token_ids": ..., "cache_salt": ...}, as vLLM's TextPrompt and
    TokensPrompt: a salt's requests share pages with each other only; the outputs are the unsalted ones."""
    ids = list(range(3, 103))
    assert len(llm.tokenizer.encode(TEXT)) == 90
    want = llm.generate([ids, TEXT], GREEDY)
    runs = [
        [{"prompt_token_ids": ids, "cache_salt": "a"}, {"prompt": TEXT, "cache_salt": "a"}],
        [{"prompt_token_ids": ids, "cache_salt": "a"}, {"prompt": TEXT, "cache_salt": "a"}],
        [{"prompt_token_ids": ids, "cache_salt": "b"}, {"prompt": TEXT, "cache_salt": "b"}],
        [ids, {"prompt": TEXT}],
    ]
    got = [llm.generate(r, GREEDY) for r in runs]
    assert [w.num_cached_tokens for w in want] == [0, 0]
    assert [[o.num_cached_tokens for o in outs] for outs in got] == [[0, 0], [64, 64], [0, 0], [64, 64]]
    assert all([o.token_ids for o in outs] == [w.token_ids for w in want] for outs in got)
    streamed = list(llm.stream_outputs({"prompt_token_ids": ids, "cache_salt": "b"}, GREEDY))
    assert streamed[-1].num_cached_tokens == 64


def test_generate_refuses_a_bad_salt(llm):
    """A salt of another type, empty or too long: one line naming cache_salt, nothing queued."""
    for bad, got in BAD:
        for prompt in ({"prompt": "hi", "cache_salt": bad}, {"prompt_token_ids": [5, 6], "cache_salt": bad}):
            with pytest.raises(InvalidRequestError, match=f"^{re.escape(SALT_RULE + got)}$"):
                llm.generate([[5, 6, 7], prompt], GREEDY)
    with pytest.raises(
        InvalidRequestError, match=r"prompt dicts .* got a dict with the keys \['cache_salt'\]"
    ):
        llm.generate({"cache_salt": "a"}, GREEDY)
    assert not llm.engine.has_unfinished()


def post(c: TestClient, text: str, chat: bool, salt: object):
    """A request for 2 tokens of `text` (chat: as a user message) with `salt` as its cache_salt."""
    body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return c.post(path, json=body | {"max_tokens": 2, "cache_salt": salt})


@pytest.mark.parametrize("chat", [False, True])
def test_server_requests_of_one_salt_share_pages(client, chat):
    """vLLM's cache_salt on /v1/completions and /v1/chat/completions (refused until 2026-12-07: every request shared
    the prefix cache): a salt's requests share prefix pages with each other only; null is no salt."""
    text = TEXT + ("chat" if chat else "completion")  # a prompt of its own
    got = []
    for salt in (None, "a", "a", "b", None, "b"):
        r = post(client, text, chat, salt)
        assert r.status_code == 200, r.text
        got.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert got == [0, 0, 64, 0, 64, 64]


@pytest.mark.parametrize("chat", [False, True])
def test_server_refuses_a_bad_salt(client, chat):
    """A salt of another type, empty or too long: a 400 naming cache_salt, in one line."""
    for bad, got in BAD:
        r = post(client, "hi", chat, bad)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["message"]) == ("cache_salt", SALT_RULE + got), err
