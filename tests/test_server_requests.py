"""The server's request parsing as plain functions (first_gguf.server: parse_body, request_options,
fit_context), without a server: what each field becomes and the 4xx each bad value gets."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from first_gguf.server import (  # noqa: E402
    CHAT_FIELDS, COMPLETION_FIELDS, DEFAULT_MAX_TOKENS, MAX_BODY, APIError, fit_context, parse_body, request_options)


def _err(fn, *args) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args)
    return e.value


def test_parse_body_checks_size_json_model_and_fields():
    body = parse_body(json.dumps({"model": "m", "prompt": "x"}).encode(), COMPLETION_FIELDS, "m")
    assert body == {"model": "m", "prompt": "x"}
    assert parse_body(b"", CHAT_FIELDS, "m") == {}
    e = _err(parse_body, b"x" * (MAX_BODY + 1), CHAT_FIELDS, "m")
    assert e.status == 413
    e = _err(parse_body, b"{bad", CHAT_FIELDS, "m")
    assert e.status == 400 and "malformed JSON" in e.message
    e = _err(parse_body, b"[1]", CHAT_FIELDS, "m")
    assert e.status == 400 and "object" in e.message
    e = _err(parse_body, b'{"model": "other"}', CHAT_FIELDS, "m")
    assert e.status == 404 and e.param == "model" and "'other'" in e.message
    e = _err(parse_body, b'{"prompt": "x"}', CHAT_FIELDS, "m")
    assert e.status == 400 and e.param == "prompt" and "unrecognized" in e.message
    e = _err(parse_body, b'{"n": 2}', CHAT_FIELDS, "m")
    assert e.param == "n" and "one choice" in e.message


def test_request_options_map_fields_to_model_keywords(tiny1):
    opts, gfield, mfield = request_options({"temperature": 0.5, "top_k": 7, "seed": 3, "stop": ["\n"],
                                            "logit_bias": {"5": 2}, "skip_budget": 0.25,
                                            "skip_strategy": "static" if tiny1.info.static_rankings else "router",
                                            "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 2},
                                           tiny1, True)
    assert opts["temperature"] == 0.5 and opts["top_k"] == 7 and opts["seed"] == 3 and opts["stop"] == ["\n"]
    assert opts["logit_bias"] == {5: 2.0} and opts["skip_budget"] == 0.25 and opts["max_tokens"] == 9
    assert opts["logprobs"] == 2 and gfield is None and mfield == "max_completion_tokens"
    opts, _, mfield = request_options({}, tiny1, False)
    assert opts == {"skip_budget": 0.0, "skip_strategy": "auto", "max_tokens": DEFAULT_MAX_TOKENS, "stop": None}
    assert mfield is None
    opts, gfield, _ = request_options({"response_format": {"type": "json_object"}, "logprobs": 3}, tiny1, False)
    assert gfield == "response_format" and "root" in opts["grammar"] and opts["logprobs"] == 3


@pytest.mark.parametrize("body,param,words", [
    ({"temperature": 2.5}, "temperature", "[0, 2]"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_k": 1.5}, "top_k", "integer"),
    ({"seed": -2}, "seed", "random seed"),
    ({"skip_budget": 1.0}, "skip_budget", "[0, 1)"),
    ({"skip_strategy": 3}, "skip_strategy", "string"),
    ({"skip_strategy": "best"}, "skip_strategy", "best"),
    ({"max_tokens": 0}, "max_tokens", "[1,"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "differ"),
    ({"stop": ["", "x"]}, "stop", "non-empty"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "x"),
    ({"top_logprobs": 2}, "top_logprobs", "needs 'logprobs'"),
    ({"logprobs": True, "top_logprobs": 99}, "top_logprobs", "top_logprobs must be"),
    ({"logprobs": 1}, "logprobs", "boolean"),
    ({"grammar": "", "response_format": None}, "grammar", "GBNF"),
])
def test_request_options_refuse_bad_chat_fields_by_name(tiny1, body, param, words):
    e = _err(request_options, body, tiny1, True)
    assert e.status == 400 and e.param == param and words in e.message, e.message


def test_fit_context_cuts_the_default_and_refuses_a_requested_overflow():
    opts = {"max_tokens": DEFAULT_MAX_TOKENS}
    fit_context(opts, 100, 60, None, "messages")
    assert opts["max_tokens"] == 40
    opts = {"max_tokens": 30}
    fit_context(opts, 100, 60, "max_tokens", "messages")
    assert opts["max_tokens"] == 30
    e = _err(fit_context, {"max_tokens": 50}, 100, 60, "max_tokens", "messages")
    assert e.param == "max_tokens" and "110 tokens exceed the context (100)" in e.message
    e = _err(fit_context, {"max_tokens": 5}, 100, 100, None, "prompt")
    assert e.param == "prompt" and "100 tokens" in e.message
