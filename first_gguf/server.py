"""OpenAI-compatible HTTP server with skip_budget (FastAPI + uvicorn).

Endpoints: GET / (the chat page, first_gguf/web/index.html: plain HTML and JavaScript, streaming, a
skip-budget slider, the skipped blocks and speeds of each reply, a side-by-side mode; docs/chat.md),
GET /first-gguf/defaults (the page's sampling defaults: llama.cpp's chat defaults, sampling.CHAT_DEFAULTS, and
the default max_tokens), GET /health, GET /v1/models,
GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions (``stream: true`` answers with
server-sent events, like the OpenAI API).

Every request field is honoured or refused with a 400 that names it (never silently ignored): the
sampling fields run on llama.cpp's sampler chain (Model's keywords, a per-request ``seed`` gives the same
output whatever else runs; ``seed: -1`` is llama.cpp's "random", a seed reported in ``first.seed``;
``temperature`` in OpenAI's [0, 2]), ``response_format`` json_object / json_schema becomes a GBNF grammar
(llama-cpp-python's converter), ``logprobs`` / ``top_logprobs`` come from the model's raw logits. Refused:
``n`` > 1, tools and function calling, ``echo``, ``suffix``, ``best_of`` > 1, audio, predictions, and any
unknown field. Extra request fields: ``skip_budget`` (default 0), ``skip_strategy`` (default "auto"),
``top_k``, ``min_p``, ``typical_p``, ``repeat_penalty``, ``grammar`` (llama-cpp-python's); every response
carries an extra ``first`` object with the skipped blocks, the strategy, the seed and the speeds.

Concurrency: one model, one llama.cpp context; requests wait in a FIFO queue
(an asyncio lock held for the whole generation) and every model call runs on
one dedicated worker thread, so the event loop keeps accepting requests and a
request's output never depends on what else is running. A client that hangs up
mid-stream cannot leak the queue: the generator is closed on the worker thread
(after any call still running there) and the lock is released when that close
finishes, even if the request task itself is being cancelled. A non-streaming generation runs in
quarter-second slices and stops as soon as its client has hung up (a client timeout frees the queue). Errors are OpenAI-style JSON
bodies with a 4xx status; a failing request never takes the worker down.
"""
from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .model import Model
from .sampling import CHAT_DEFAULTS, NUMERIC_OPTIONS, check_logit_bias, check_value

MAX_BODY = 1 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _num(body: dict, key: str, default, lo: float, hi: float, *, integer=False, hi_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise APIError(400, f"'{key}' must be {'an integer' if integer else 'a number'}; got {v!r}", param=key)
    if isinstance(v, float) and math.isnan(v) or v < lo or (v >= hi if hi_open else v > hi):
        raise APIError(400, f"'{key}' must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}; got {v!r}", param=key)
    return v


# Request fields. Every field is honoured, refused with a 400 naming it, or unknown (400 too, as OpenAI does).
SAMPLING_FIELDS = (*NUMERIC_OPTIONS, "seed", "logit_bias")  # grammar and logprobs: below
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "stop", "n", "user", "response_format",
                 "grammar", "skip_budget", "skip_strategy", *SAMPLING_FIELDS}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs"}
# refused unless left at a value that asks for nothing
REFUSED = {
    "tools": lambda v: v not in (None, []), "tool_choice": lambda v: v not in (None, "none"),
    "functions": lambda v: v not in (None, []), "function_call": lambda v: v not in (None, "none"),
    "parallel_tool_calls": lambda v: v is not None, "echo": lambda v: v not in (None, False),
    "suffix": lambda v: v not in (None, ""), "best_of": lambda v: v not in (None, 1),
    "audio": lambda v: v is not None, "modalities": lambda v: v not in (None, ["text"]),
    "prediction": lambda v: v is not None,
}
ROLES = ("system", "user", "assistant", "developer")  # developer: OpenAI's newer name for system
DEFAULT_MAX_TOKENS = 256
SLICE_S = 0.25  # a non-streaming generation checks this often whether its client is still there
TEMPERATURE_MAX = 2.0  # OpenAI's range


def _check_fields(body: dict, allowed: set[str]) -> None:
    for key, is_set in REFUSED.items():
        if key in body and is_set(body[key]):
            raise APIError(400, f"'{key}' is not supported by this server (got {body[key]!r:.80})", param=key)
    for key in body:
        if key not in allowed and key not in REFUSED:
            raise APIError(400, f"unrecognized request field '{key}'", param=key)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise APIError(400, f"'n' must be a positive integer; got {n!r}", param="n")
    if n is not None and n > 1:
        raise APIError(400, f"'n' > 1 is not supported by this server (one choice per request); got {n}", param="n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean; got {stream!r}", param="stream")
    so = body.get("stream_options")
    if so is not None:
        if not stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
        if not isinstance(so, dict) or set(so) - {"include_usage"} or not isinstance(so.get("include_usage", False), bool):
            raise APIError(400, f"'stream_options' must be {{'include_usage': bool}}; got {so!r:.80}",
                           param="stream_options")


def _checked(param: str, fn, *args):
    try:
        return fn(*args)
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e), param=param) from None


def _grammar(body: dict) -> tuple[str | None, str | None]:
    """(GBNF text, the field it came from) from response_format or grammar."""
    rf, grammar = body.get("response_format"), body.get("grammar")
    if rf is not None and grammar is not None:
        raise APIError(400, "give 'response_format' or 'grammar', not both", param="grammar")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise APIError(400, f"'grammar' must be a GBNF string; got {grammar!r:.80}", param="grammar")
        return grammar, "grammar"
    if rf is None:
        return None, None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None, None
    if kind == "json_object":
        schema = rf.get("schema")  # llama-cpp-python's extension
    elif kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "'response_format' json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           param="response_format")
    else:
        raise APIError(400, f"'response_format' type must be 'text', 'json_object' or 'json_schema'; got {rf!r:.80}",
                       param="response_format")
    if schema is None:
        return JSON_GBNF, "response_format"
    try:
        return json_schema_to_gbnf(json.dumps(schema)), "response_format"
    except Exception as e:  # the converter raises several kinds on schemas it cannot express
        raise APIError(400, f"'response_format' schema cannot be turned into a grammar: {e}",
                       param="response_format") from None


def _messages(messages) -> list[dict]:
    """OpenAI chat messages as {'role', 'content': str} dicts: text parts joined, assistant null content ''."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {'role': ..., 'content': ...} objects",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object; got {m!r:.80}", param=f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {list(ROLES)}; got {role!r:.80}",
                           param=f"messages[{i}].role")
        if m.get("tool_calls") or m.get("function_call"):
            raise APIError(400, f"messages[{i}]: tool calls are not supported by this server",
                           param=f"messages[{i}].tool_calls")
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                        f"are supported; got {part!r:.80}", param=f"messages[{i}].content")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts; got "
                                f"{content!r:.80}", param=f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _logprobs_chat(model: Model, lps) -> dict | None:
    if lps is None:
        return None

    def one(tok, lp):
        b = model.token_bytes(tok)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    return {"content": [{**one(x.token, x.logprob), "top_logprobs": [one(t, lp) for t, lp in x.top]} for x in lps]}


def _logprobs_completion(model: Model, lps, offset: int = 0) -> dict | None:
    if lps is None:
        return None
    text = lambda t: model.token_bytes(t).decode("utf-8", errors="replace")  # noqa: E731
    tokens = [text(x.token) for x in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps], "text_offset": offsets,
            "top_logprobs": [{text(t): lp for t, lp in x.top} for x in lps]}


def parse_body(raw: bytes, allowed: set[str], model_id: str) -> dict:
    """A request's JSON body as a dict, checked: its size, its JSON, its ``model`` (404 unless ``model_id``)
    and its fields (``allowed``; an unknown one is a 400 naming it). Raises APIError."""
    if len(raw) > MAX_BODY:
        raise APIError(413, f"request body over {MAX_BODY} bytes")
    try:
        body = json.loads(raw or b"{}")
    except ValueError as e:
        raise APIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the JSON body must be an object")
    if body.get("model") not in (None, model_id):
        raise APIError(404, f"model {body.get('model')!r} not found; this server serves {model_id!r}",
                       param="model")
    _check_fields(body, allowed)
    return body


def request_options(body: dict, model, chat: bool) -> tuple[dict, str | None, str | None]:
    """A request body's Model keyword arguments, the field a grammar came from, and the field that set
    max_tokens (None: the default). ``model``: what the options are checked against (``check_skip``,
    ``n_ctx``, ``n_vocab``). Raises APIError (400) naming the field."""
    budget = _num(body, "skip_budget", 0.0, 0.0, 1.0, hi_open=True)
    strategy = body.get("skip_strategy", "auto")
    if not isinstance(strategy, str):
        raise APIError(400, f"'skip_strategy' must be a string; got {strategy!r}", param="skip_strategy")
    _checked("skip_strategy", model.check_skip, 0.0, strategy)
    _checked("skip_budget", model.check_skip, budget, strategy)
    max_field = None
    for key in ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",):
        if body.get(key) is not None:
            max_field = max_field or key
    if chat and None not in (body.get("max_tokens"), body.get("max_completion_tokens")) \
            and body["max_tokens"] != body["max_completion_tokens"]:
        raise APIError(400, "'max_tokens' and 'max_completion_tokens' differ; give one",
                       param="max_completion_tokens")
    max_tokens = _num(body, max_field, DEFAULT_MAX_TOKENS, 1, model.n_ctx - 1, integer=True) if max_field \
        else DEFAULT_MAX_TOKENS
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) and stop or isinstance(stop, list)
                                 and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"'stop' must be a string or a list of non-empty strings; got {stop!r:.80}",
                       param="stop")
    opts = dict(skip_budget=budget, skip_strategy=strategy, max_tokens=max_tokens, stop=stop)
    temperature = body.get("temperature")
    if temperature is not None:  # OpenAI's range, narrower than Model's [0, inf): the message says this one
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise APIError(400, f"temperature must be a number in [0, {TEMPERATURE_MAX:g}]; got {temperature!r}",
                           param="temperature")
        if math.isnan(temperature) or not 0 <= temperature <= TEMPERATURE_MAX:
            raise APIError(400, f"temperature must be in [0, {TEMPERATURE_MAX:g}]; got {temperature!r}",
                           param="temperature")
        opts["temperature"] = float(temperature)
    for key in [k for k in NUMERIC_OPTIONS if k != "temperature"] + ["seed"]:  # temperature: above
        if body.get(key) is not None:
            opts[key] = _checked(key, check_value, key, body[key])
    if body.get("logit_bias") is not None:
        opts["logit_bias"] = _checked("logit_bias", check_logit_bias, body["logit_bias"], model.n_vocab)
    if chat:
        lp, top = body.get("logprobs"), body.get("top_logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise APIError(400, f"'logprobs' must be a boolean; got {lp!r}", param="logprobs")
        if top is not None:
            if not lp:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            try:
                top = check_value("logprobs", top)
            except (TypeError, ValueError) as e:  # the message names the field the request used
                raise APIError(400, "top_logprobs" + str(e)[len("logprobs"):], param="top_logprobs") from None
        if lp:
            opts["logprobs"] = top or 0
    elif body.get("logprobs") is not None:
        opts["logprobs"] = _checked("logprobs", check_value, "logprobs", body["logprobs"])
    grammar, grammar_field = _grammar(body)
    if grammar is not None:
        opts["grammar"] = grammar
    return opts, grammar_field, max_field


def fit_context(opts: dict, n_ctx: int, n_prompt: int, max_field: str | None, prompt_field: str) -> None:
    """Fit opts' max_tokens to the context left after an ``n_prompt``-token prompt: the default is cut to
    it, a requested value over it is a 400 naming ``max_field`` (``prompt_field`` when nothing is left)."""
    room = n_ctx - n_prompt
    if room < 1:
        raise APIError(400, f"the prompt has {n_prompt} tokens; the context holds {n_ctx}",
                       param=prompt_field)
    if max_field is None:
        opts["max_tokens"] = min(opts["max_tokens"], room)
    elif opts["max_tokens"] > room:
        raise APIError(400, f"prompt ({n_prompt} tokens) + {max_field} ({opts['max_tokens']}) = "
                            f"{n_prompt + opts['max_tokens']} tokens exceed the context ({n_ctx})",
                       param=max_field)


def first_info(g) -> dict:
    """The ``"first"`` key of a response: what skipping did (a Generation's fields, JSON-safe)."""
    return {"skipped_layers": g.skipped_layers, "skip_strategy": g.skip_strategy,
            "n_skip_requested": g.n_skip_requested, "seed": g.seed,
            "prefill_tokens_per_s": g.prefill_tokens_per_s, "decode_tokens_per_s": g.decode_tokens_per_s,
            "bypassed_layers": g.bypassed_layers, "decode_lora": g.decode_lora,
            "router_scores": None if g.router_scores is None else
            [None if math.isnan(s) else s for s in g.router_scores]}


def usage(g) -> dict:
    """OpenAI's usage object of a Generation."""
    return {"prompt_tokens": g.n_prompt_tokens, "completion_tokens": len(g.tokens),
            "total_tokens": g.n_prompt_tokens + len(g.tokens)}


def create_app(model: Model, *, model_id: str | None = None, api_key: str | None = None):
    app = FastAPI(title="first-gguf", docs_url=None, redoc_url=None)
    model_id = model_id or model.path.stem
    lock = asyncio.Lock()
    worker = ThreadPoolExecutor(1, thread_name_prefix="first-gguf-model")  # the only thread touching the model
    closing: set[asyncio.Future] = set()
    created = int(time.time())

    async def on_worker(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(worker, fn, *args)

    async def close_and_release(it) -> None:
        """Close a stream on the worker, then release the queue; survives cancellation of the caller."""
        fut = asyncio.get_running_loop().run_in_executor(worker, it.close if it is not None else _nothing)
        closing.add(fut)

        def done(f: asyncio.Future) -> None:
            closing.discard(f)
            lock.release()
            if not f.cancelled() and f.exception() is not None:
                print(f"[first-gguf] closing a stream failed: {f.exception()!r}", flush=True)

        fut.add_done_callback(done)
        await asyncio.shield(fut)

    def error(e: APIError) -> JSONResponse:
        return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": None}},
                            status_code=e.status)

    async def auth(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key", type_="authentication_error")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    async def parse(request: Request, allowed: set[str]) -> dict:
        return parse_body(await request.body(), allowed, model_id)

    async def run(make_stream, chat: bool, body: dict, opts: dict, grammar_field: str | None,
                  request: Request | None = None):
        """Run one generation under the queue lock; returns a response."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def bad(e: Exception) -> APIError:
            return APIError(400, str(e), param=grammar_field if str(e).startswith("grammar") else None)

        def logprobs(lps, offset=0):
            return _logprobs_chat(model, lps) if chat else _logprobs_completion(model, lps, offset)

        if not stream:
            await lock.acquire()
            it = None
            try:
                it = await on_worker(make_stream)
                g = None
                while g is None:  # in slices, so a client that hung up stops the generation (and frees the queue)
                    g = await on_worker(_advance, it, SLICE_S)
                    if g is None and request is not None and await request.is_disconnected():
                        raise APIError(499, "client closed the request")  # nobody reads it
                lp = await on_worker(logprobs, g.logprobs)
            except (ValueError, TypeError) as e:
                raise bad(e) from None
            finally:
                await close_and_release(it)
            choice = ({"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": lp,
                       "finish_reason": g.finish_reason} if chat else
                      {"index": 0, "text": g.text, "finish_reason": g.finish_reason, "logprobs": lp})
            return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": model_id,
                                 "choices": [choice], "usage": usage(g), "first": first_info(g)})

        await lock.acquire()
        it = None
        try:
            it = await on_worker(make_stream)  # options are checked here, before any byte is sent
            first_chunk = await on_worker(next, it)
        except (ValueError, TypeError) as e:
            await close_and_release(it)
            raise bad(e) from None
        except BaseException:
            await close_and_release(it)
            raise

        def event(choice: dict, **extra) -> bytes:
            return _sse({"id": rid, "object": obj + ".chunk" if chat else obj, "created": int(time.time()),
                         "model": model_id, "choices": [choice] if choice is not None else [], **extra})

        async def events():
            chunk = first_chunk
            pending, offset = [], 0  # logprobs of tokens whose text is not sent yet
            want_lp = "logprobs" in opts
            try:
                if chat:
                    yield event({"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None})
                while True:
                    g = chunk.generation
                    if chunk.logprob is not None:
                        pending.append(chunk.logprob)
                    if chunk.text or (g is not None and pending):
                        lp = await on_worker(logprobs, pending, offset) if want_lp else None
                        if not chat and lp:
                            offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
                        pending = []
                        yield event({"index": 0, "delta": {"content": chunk.text}, "logprobs": lp,
                                     "finish_reason": None} if chat else
                                    {"index": 0, "text": chunk.text, "finish_reason": None, "logprobs": lp})
                    if g is not None:
                        yield event({"index": 0, "delta": {}, "logprobs": None, "finish_reason": g.finish_reason}
                                    if chat else {"index": 0, "text": "", "finish_reason": g.finish_reason,
                                                  "logprobs": None},
                                    usage=usage(g), first=first_info(g))
                        if include_usage:  # OpenAI's form: a last chunk with no choices and the usage
                            yield event(None, usage=usage(g))
                        break
                    chunk = await on_worker(next, it, None)
                    if chunk is None:
                        break
                yield b"data: [DONE]\n\n"
            finally:  # client gone or done: mask cleared, skipped cells dropped, then the next request runs
                await close_and_release(it)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error(e)

    @app.get("/", include_in_schema=False)
    async def page():
        from importlib import resources

        from fastapi.responses import HTMLResponse

        return HTMLResponse(resources.files("first_gguf.web").joinpath("index.html").read_text())

    @app.get("/first-gguf/defaults", include_in_schema=False)
    async def defaults():  # the page takes its sampling from here rather than repeating it

        return {"sampling": CHAT_DEFAULTS, "max_tokens": DEFAULT_MAX_TOKENS}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id}

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "first-gguf",
                "n_layer": model.n_layer, "n_ctx": model.n_ctx, "routers": model.n_routers,
                "static_rankings": list(model.info.static_rankings)}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{mid:path}")
    async def model_info(mid: str):
        if mid != model_id:
            raise APIError(404, f"model {mid!r} not found; this server serves {model_id!r}", param="model")
        return model_card()

    @v1.post("/completions")
    async def completions(request: Request):
        body = await parse(request, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
        opts, grammar_field, max_field = request_options(body, model, False)
        fit_context(opts, model.n_ctx, len(await on_worker(model.tokenize, prompt)), max_field, "prompt")
        return await run(lambda: model.stream_generate(prompt, **opts), False, body, opts, grammar_field, request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, CHAT_FIELDS)
        messages = _messages(body.get("messages"))
        opts, grammar_field, max_field = request_options(body, model, True)
        tokens, _ = await on_worker(_checked, "messages", model.prompt_tokens_for, messages)
        fit_context(opts, model.n_ctx, len(tokens), max_field, "messages")
        return await run(lambda: model.stream_chat(messages, **opts), True, body, opts, grammar_field, request)

    app.include_router(v1)
    return app


def _nothing() -> None:
    pass


def _advance(stream, seconds: float) -> Any:
    """Run ``stream`` for about ``seconds``: its Generation when it ended, else None (more to come)."""
    t_end = time.perf_counter() + seconds
    for chunk in stream:
        if chunk.generation is not None:
            return chunk.generation
        if time.perf_counter() >= t_end:
            return None
    raise RuntimeError("the generation stream ended without a result")


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def check_can_bind(host: str, port: int) -> None:
    """Bind host:port once as uvicorn will (SO_REUSEADDR), so a port in use fails before the model loads;
    an OSError saying why otherwise."""
    import errno
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise OSError(f"cannot serve on {host}:{port}: {e.strerror}") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            why = "the port is already in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise OSError(f"cannot serve on {host}:{port}: {why}") from None


def announce_when_listening(host: str, port: int, text: str) -> None:
    """Print ``text`` once a connection to host:port succeeds (the server has bound it), from a daemon thread."""
    import socket
    import threading
    import time

    target = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)

    def watch():
        while True:
            try:
                socket.create_connection((target, port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
            else:
                print(text, file=sys.stderr, flush=True)
                return

    threading.Thread(target=watch, name="first-gguf-announce", daemon=True).start()


def serve(model: Model, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          ready: threading.Event | None = None) -> None:
    import uvicorn

    app = create_app(model, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
