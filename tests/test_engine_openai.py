"""Every OpenAI request field goes through vLLM's own serving code: real generation on SmolLM2 (CPU).

Each success body is validated with the ``openai`` SDK's own types, each failure against OpenAI's error
shape. Few requests, small max_tokens: the whole module is a minute or so of CPU on the shared engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("tests.conftest_engine", "tests.stub_engine", "tests.test_engine")
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402

from tests.conftest_engine import ENGINE_MAX_MODEL_LEN, Run, body_of, chat, completion  # noqa: E402
from tests.test_engine import assert_openai_error  # noqa: E402

pytest_plugins = ["tests.conftest_engine"]
# vLLM warns (DeprecationWarning) on every chat request that uses OpenAI's max_tokens.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:vllm")]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "pet": {"type": "string", "enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


def check_schema(value: Any, schema: dict[str, Any]) -> None:
    """Validate with jsonschema when installed, else check keys and types by hand."""
    try:
        import jsonschema
    except ImportError:
        assert isinstance(value, dict) and set(value) == set(schema["required"])
        assert isinstance(value["name"], str) and isinstance(value["age"], int) and value["pet"] in ("cat", "dog", "none")
        return
    jsonschema.validate(value, schema)


def chat_body(res: Any) -> ChatCompletion:
    assert res.status_code == 200, res.body
    return ChatCompletion.model_validate(body_of(res))


def completion_body(res: Any) -> Completion:
    assert res.status_code == 200, res.body
    return Completion.model_validate(body_of(res))


def test_response_format_json_schema_and_json_object(engine_run: Run) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    res = engine_run([
        chat(f"Describe a person called {who} as JSON.", 100 + i, max_tokens=60, response_format=fmt)
        for i, who in enumerate(["Ada", "Linus", "Grace"])
    ] + [chat("Give me a JSON object with a key 'colour'.", 103, max_tokens=60, response_format={"type": "json_object"})])
    for rid in (100, 101, 102):
        content = chat_body(res[rid]).choices[0].message.content
        assert content is not None
        check_schema(json.loads(content), PERSON)
    obj = json.loads(chat_body(res[103]).choices[0].message.content or "")
    assert isinstance(obj, dict)


def test_logprobs_chat_and_completions(engine_run: Run) -> None:
    res = engine_run([
        chat("Say hello.", 110, max_tokens=5, logprobs=True, top_logprobs=3),
        completion("The sky is", 111, max_tokens=5, logprobs=2),
    ])
    c = chat_body(res[110]).choices[0]
    assert c.logprobs is not None and c.logprobs.content
    assert len(c.logprobs.content) == res[110].completion_tokens
    for tok in c.logprobs.content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
    k = completion_body(res[111]).choices[0]
    assert k.logprobs is not None and k.logprobs.tokens and k.logprobs.top_logprobs
    assert len(k.logprobs.tokens) == len(k.logprobs.token_logprobs or []) == res[111].completion_tokens
    assert all(1 <= len(top) <= 3 for top in k.logprobs.top_logprobs)  # the sampled token may be a third


def test_n_two_choices_and_seeds(engine_run: Run) -> None:
    story = "Tell me a very short story."
    res = engine_run([
        chat(story, 120, max_tokens=12, temperature=0.9, n=2),
        chat(story, 121, max_tokens=12, temperature=1, seed=7),
        chat(story, 122, max_tokens=12, temperature=1, seed=7),
        chat(story, 123, max_tokens=12, temperature=1, seed=8),
    ])
    two = chat_body(res[120])
    assert [c.index for c in two.choices] == [0, 1] and all(c.message.content for c in two.choices)
    assert two.usage is not None and two.usage.completion_tokens == res[120].completion_tokens
    same = [chat_body(res[r]).choices[0].message.content for r in (121, 122, 123)]
    assert same[0] == same[1], "the same seed must give the same text"
    assert same[0] != same[2], "different seeds should differ"


def test_stop_and_max_completion_tokens(engine_run: Run) -> None:
    res = engine_run([
        completion("1, 2, 3, 4,", 130, max_tokens=16, stop=[","]),
        chat("Count from one to twenty in words.", 131, max_tokens=None, max_completion_tokens=5),
    ])
    k = completion_body(res[130]).choices[0]
    assert k.finish_reason == "stop" and "," not in k.text
    c = chat_body(res[131])
    assert res[131].completion_tokens <= 5 and c.choices[0].finish_reason == "length"


def test_penalties_and_logit_bias(engine_run: Run, smollm2_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    paris = tok.encode(" Paris", add_special_tokens=False).ids[0]
    banana = tok.encode(" banana", add_special_tokens=False).ids[0]
    repeat = "Repeat after me: cat cat cat cat cat cat"  # greedy SmolLM2 goes on with "cat" for ever
    res = engine_run([
        completion("The capital of France is", 140, max_tokens=4),
        completion("The capital of France is", 141, max_tokens=4, logit_bias={str(paris): -100}),
        completion("The capital of France is", 142, max_tokens=2, logit_bias={str(banana): 100}),
        completion(repeat, 143, max_tokens=8),
        completion(repeat, 144, max_tokens=8, presence_penalty=2.0, frequency_penalty=2.0),
    ])
    plain, banned, pushed = (completion_body(res[r]).choices[0].text for r in (140, 141, 142))
    assert "Paris" in plain and "Paris" not in banned
    assert pushed.startswith(" banana")
    greedy, penalised = (completion_body(res[r]).choices[0].text for r in (143, 144))
    assert greedy.count("cat") > penalised.count("cat"), (greedy, penalised)


def test_rejected_requests_fail_alone_with_vllms_message(engine_run: Run) -> None:
    long_text = "hello " * (ENGINE_MAX_MODEL_LEN + 50)
    res = engine_run([
        chat("Name a colour.", 150, max_tokens=4),
        chat(long_text, 151),
        completion(long_text, 152),
        chat("hi", 153, temperature=5),
        chat("hi", 154, n=2, temperature=0),
        chat("hi", 155, stream=True),
        chat("hi", 156, top_logprobs=30, logprobs=True),
        chat("hi", 157, response_format={"type": "json_schema"}),
        completion("The sky is", 158, max_tokens=4),
    ])
    assert res[150].status_code == res[158].status_code == 200
    for rid in (151, 152):
        err = assert_openai_error(res[rid], 400)
        assert err["code"] == "context_length_exceeded" and "maximum context length" in err["message"]
    assert "temperature" in assert_openai_error(res[153], 400)["message"]
    assert "n must be 1" in assert_openai_error(res[154], 400)["message"]
    assert assert_openai_error(res[155], 400)["param"] == "stream"
    assert "logprobs of 30" in assert_openai_error(res[156], 400)["message"]  # vLLM's cap is 20
    assert assert_openai_error(res[157], 400)["message"]
