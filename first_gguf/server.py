"""OpenAI-compatible HTTP server with skip_budget (FastAPI + uvicorn).

Endpoints: GET / (a small chat page: plain HTML and JavaScript, streaming,
a skip-budget slider, the skipped blocks of each reply), GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(``stream: true`` answers with server-sent events, like the OpenAI API).
Extra request fields: ``skip_budget`` (default 0), ``skip_strategy`` (default
"auto"); every response carries an extra ``first`` object with the skipped
blocks, the strategy and the prefill/decode speeds.

Concurrency: one model, one llama.cpp context; requests wait in a FIFO queue
(an asyncio lock held for the whole generation) and every model call runs on
one dedicated worker thread, so the event loop keeps accepting requests and a
request's output never depends on what else is running. A client that hangs up
mid-stream cannot leak the queue: the generator is closed on the worker thread
(after any call still running there) and the lock is released when that close
finishes, even if the request task itself is being cancelled. Errors are OpenAI-style JSON
bodies with a 4xx status; a failing request never takes the worker down.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .model import Model

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

    async def parse(request: Request) -> dict:
        raw = await request.body()
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
        return body

    def options(body: dict) -> dict:
        budget = _num(body, "skip_budget", 0.0, 0.0, 1.0, hi_open=True)
        strategy = body.get("skip_strategy", "auto")
        if not isinstance(strategy, str):
            raise APIError(400, f"'skip_strategy' must be a string; got {strategy!r}", param="skip_strategy")
        try:
            model.check_skip(budget, strategy, None)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="skip_budget") from None
        max_tokens = _num(body, "max_tokens", 256, 1, model.n_ctx - 1, integer=True)
        stop = body.get("stop")
        if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop))):
            raise APIError(400, "'stop' must be a string or a list of non-empty strings", param="stop")
        return dict(skip_budget=budget, skip_strategy=strategy, max_tokens=max_tokens,
                    temperature=_num(body, "temperature", 0.0, 0.0, 2.0), top_p=_num(body, "top_p", 1.0, 1e-9, 1.0),
                    stop=stop)

    def first_info(g) -> dict:
        return {"skipped_layers": g.skipped_layers, "skip_strategy": g.skip_strategy,
                "prefill_tokens_per_s": g.prefill_tokens_per_s, "decode_tokens_per_s": g.decode_tokens_per_s,
                "bypassed_layers": g.bypassed_layers, "decode_lora": g.decode_lora,
                "router_scores": None if g.router_scores is None else
                [None if math.isnan(s) else s for s in g.router_scores]}

    def usage(g) -> dict:
        return {"prompt_tokens": g.n_prompt_tokens, "completion_tokens": len(g.tokens),
                "total_tokens": g.n_prompt_tokens + len(g.tokens)}

    async def run(make_stream, chat: bool, stream: bool):
        """Run one generation under the queue lock; returns a response."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        if not stream:
            async with lock:
                try:
                    g = await on_worker(lambda: _last(make_stream()))
                except (ValueError, TypeError) as e:
                    raise APIError(400, str(e)) from None
            choice = ({"index": 0, "message": {"role": "assistant", "content": g.text},
                       "finish_reason": g.finish_reason} if chat else
                      {"index": 0, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None})
            return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": model_id,
                                 "choices": [choice], "usage": usage(g), "first": first_info(g)})

        await lock.acquire()
        it = None
        try:
            it = await on_worker(make_stream)
            first_chunk = await on_worker(next, it)  # errors surface here, before any byte is sent
        except (ValueError, TypeError) as e:
            await close_and_release(it)
            raise APIError(400, str(e)) from None
        except BaseException:
            await close_and_release(it)
            raise

        async def events():
            chunk = first_chunk
            try:
                if chat:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": model_id, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                                "finish_reason": None}]})
                while True:
                    g = chunk.generation
                    if chunk.text:
                        choice = ({"index": 0, "delta": {"content": chunk.text}, "finish_reason": None} if chat
                                  else {"index": 0, "text": chunk.text, "finish_reason": None, "logprobs": None})
                        yield _sse({"id": rid, "object": obj + ".chunk" if chat else obj, "created": int(time.time()),
                                    "model": model_id, "choices": [choice]})
                    if g is not None:
                        done = ({"index": 0, "delta": {}, "finish_reason": g.finish_reason} if chat
                                else {"index": 0, "text": "", "finish_reason": g.finish_reason, "logprobs": None})
                        yield _sse({"id": rid, "object": obj + ".chunk" if chat else obj, "created": int(time.time()),
                                    "model": model_id, "choices": [done], "usage": usage(g), "first": first_info(g)})
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

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "first-gguf", "n_layer": model.n_layer,
                                            "routers": model.n_routers,
                                            "static_rankings": list(model.info.static_rankings)}]}

    @v1.post("/completions")
    async def completions(request: Request):
        body = await parse(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
        opts = options(body)
        return await run(lambda: model.stream_generate(prompt, **opts), False, bool(body.get("stream")))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request)
        messages = body.get("messages")
        try:
            model.check_messages(messages)
        except TypeError as e:
            raise APIError(400, str(e), param="messages") from None
        opts = options(body)
        return await run(lambda: model.stream_chat(messages, **opts), True, bool(body.get("stream")))

    app.include_router(v1)
    return app


def _nothing() -> None:
    pass


def _last(stream) -> Any:
    last = None
    for last in stream:
        pass
    return last.generation


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def serve(model: Model, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          ready: threading.Event | None = None) -> None:
    import uvicorn

    app = create_app(model, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
