"""Real OpenAI clients against the server (tiny random model): LangChain's ChatOpenAI (invoke, batch,
stream) and instructor extracting a pydantic model through response_format (constrained decoding makes
every reply valid, even from a random model)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from lserve_lite import EngineConfig  # noqa: E402


class Person(BaseModel):
    # extra="forbid": additionalProperties false in the schema (JSON Schema's default allows any other key,
    # and a random model writes long ones until max_tokens)
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    skills: list[Literal["python", "rust", "sql"]] = Field(max_length=3)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from tiny_models import make_tiny_numpy

    from lserve_lite.engine.llm_engine import LLMEngine
    from lserve_lite.serve.app import ServerThread, create_app

    model = make_tiny_numpy(tmp_path_factory.mktemp("tiny_clients"))
    engine = LLMEngine(str(model), "cpu", EngineConfig(page_size=16, max_model_len=512, num_kv_pages=256))
    with ServerThread(create_app(engine, served_model_name="tiny")) as u:
        yield u + "/v1"


def test_langchain_chat_openai_invoke_batch_stream(url):
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(model="tiny", base_url=url, api_key="x", max_tokens=8, temperature=0, max_retries=0)
    one = llm.invoke("hello")
    assert isinstance(one.content, str) and one.content
    many = llm.batch(["hello", "a", "b"])
    assert [m.content for m in many][0] == one.content and len(many) == 3  # greedy: same prompt, same text
    streamed = "".join(c.content for c in llm.stream("hello"))
    assert streamed == one.content


def test_instructor_extracts_50_valid_models_at_temperature_07(url):
    instructor = pytest.importorskip("instructor")
    client = instructor.from_openai(openai.OpenAI(base_url=url, api_key="x", max_retries=0),
                                    mode=instructor.Mode.JSON_SCHEMA)  # fmt: skip

    def extract(i: int) -> Person:
        return client.chat.completions.create(
            model="tiny", response_model=Person, temperature=0.7, max_tokens=200, max_retries=0,
            messages=[{"role": "user", "content": f"Extract the person: Ann {i}, an admin who knows SQL."}],
        )  # fmt: skip

    with ThreadPoolExecutor(16) as pool:
        people = list(pool.map(extract, range(50)))
    assert len(people) == 50 and all(isinstance(p, Person) for p in people)  # pydantic validated each reply
    assert len({p.model_dump_json() for p in people}) > 10  # sampled, not one answer repeated
