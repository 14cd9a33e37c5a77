"""An OpenAI-compatible HTTP server for a FlowLlama (`loraflow serve`).

    POST /v1/completions          {"prompt": ..., "stream": false|true, ...}
    POST /v1/chat/completions     {"messages": [...], "stream": false|true, ...}
    GET  /v1/models
    GET  /health

FastAPI + uvicorn; streamed answers are server-sent events (`data: {chunk}` ... `data: [DONE]`),
as OpenAI sends them. The answers themselves are llama-cpp-python's `create_completion` /
`create_chat_completion` results, so every OpenAI client reads them.

The fusion mode is chosen per request with two extra body fields:

    "flow_mode":    "dynamic" | "static" | "average" | "single:<name>" | "off"
    "flow_weights": [w1, ..., wk]  or one row of k per layer (mode "static"; alone it implies "static")

A request without them runs in the server's mode (`--mode`/`--weights`). A bad mode or bad
weights is answered with HTTP 400 and an OpenAI-style error body before anything runs.

With `parallel` = 1 one model serves one request at a time (a lock; switching mode clears the KV
cache) through llama-cpp-python's own completion code, logprobs and grammars included. With
`parallel` > 1 the requests share a BatchEngine (runtime/batch_engine.py): up to that many are
decoded together, each in its own mode, and a client that goes away frees its slot at once;
logprobs, echo and response_format are refused there (HTTP 400). /health (and /metrics) show the
slots in use and the queue.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Union

from loraflow.errors import LoraFlowError
from loraflow.modes import Mode, ModeError, parse_weights
from loraflow.runtime.prompts import chat_prompt, has_chat_template
from loraflow.runtime.sampling import Sampling

try:
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise LoraFlowError(f"the server needs FastAPI and uvicorn: pip install 'loraflow[serve]' ({e})") from None


Weights = Union[List[float], List[List[float]], str]


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, ge=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False  # as llama.cpp's server: generate max_tokens, never an end-of-generation token
    # loraflow's own fields
    flow_mode: Optional[str] = None
    flow_weights: Optional[Weights] = None

    def settings(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                        repeat_penalty=self.repeat_penalty, frequency_penalty=self.frequency_penalty,
                        presence_penalty=self.presence_penalty, seed=self.seed, ignore_eos=self.ignore_eos)

    def stops(self) -> List[str]:
        return self.stop if isinstance(self.stop, list) else [self.stop] if self.stop else []


class CompletionRequest(_Common):
    prompt: Union[str, List[str], List[int]] = ""
    max_tokens: Optional[int] = Field(16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0)


class ChatCompletionRequest(_Common):
    messages: List[Dict[str, Any]]
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0)
    response_format: Optional[Dict[str, Any]] = None


class BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


HTTP_FIELD = {"mode": "flow_mode", "weights": "flow_weights"}   # a ModeError's field, as the body names it


class Engine:
    """One FlowLlama, one request at a time, each in the fusion mode it asked for."""

    def __init__(self, llm, model_id: str, mode: Optional[Mode] = None):
        self.llm = llm
        self.model_id = model_id
        self.lock = threading.Lock()
        self.default = mode or llm.mode

    def mode_of(self, req: _Common) -> Mode:
        """The request's mode, resolved once against the adapter (the server's without
        flow_mode and flow_weights); BadRequest naming the field at fault."""
        if req.flow_mode is None and req.flow_weights is None:
            return self.default
        try:
            return self.llm.resolve_mode(req.flow_mode, parse_weights(req.flow_weights, files=False))
        except ModeError as e:
            raise BadRequest(str(e), HTTP_FIELD[e.field]) from None

    def _apply(self, mode: Mode) -> None:  # with the lock held
        if mode.key != self.llm.mode.key:
            self.llm.set_mode(mode)

    def run(self, mode: Mode, fn):
        with self.lock:
            self._apply(mode)
            return fn()

    def stream(self, mode: Mode, fn, loop: asyncio.AbstractEventLoop):
        """Run the generator `fn()` in a thread of its own (it holds the lock throughout);
        returns (queue of ("chunk"|"end"|"error", value), cancel event)."""
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                cancel.set()

        def work():
            with self.lock:
                it = None
                try:
                    self._apply(mode)
                    it = fn()
                    for chunk in it:
                        if cancel.is_set():
                            break
                        put(("chunk", chunk))
                    put(("end", None))
                except Exception as e:  # noqa: BLE001 - reported to the client
                    put(("error", e))
                finally:
                    if it is not None and hasattr(it, "close"):
                        it.close()

        threading.Thread(target=work, name="loraflow-generate", daemon=True).start()
        return queue, cancel


def _one_prompt(prompt):
    """A completion's prompt: a string or token ids; a list of strings must hold exactly one."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise BadRequest("one prompt per request", "prompt")
        return prompt[0]
    return prompt


def _error_response(e: Exception) -> JSONResponse:
    if isinstance(e, BadRequest):
        return JSONResponse(error_body(str(e), param=e.param), status_code=400)
    if isinstance(e, (ValueError, LoraFlowError)):  # e.g. prompt longer than the context
        return JSONResponse(error_body(str(e)), status_code=400)
    return JSONResponse(error_body(f"{type(e).__name__}: {e}", type_="server_error"), status_code=500)


class BatchedServing:
    """The requests of an app with parallel > 1, on one BatchEngine: prompts made here (chat
    templates through llama-cpp-python's Jinja2 formatter), OpenAI-shaped answers built here."""

    UNSUPPORTED = ("logprobs", "echo", "response_format", "top_logprobs")

    def __init__(self, llm, model_id: str, parallel: int, n_ctx: Optional[int]):
        from loraflow.runtime.batch_engine import BatchEngine

        self.llm, self.model_id = llm, model_id
        self.engine = BatchEngine(llm, n_parallel=parallel, n_ctx=n_ctx)

    def check(self, req: "_Common") -> None:
        if req.n != 1:
            raise BadRequest("only n=1 is supported", "n")
        for name in self.UNSUPPORTED:
            value = getattr(req, name, None)
            if value not in (None, False):
                raise BadRequest(f"{name} is not supported when the server batches requests (--parallel > 1)", name)

    def prompt_tokens(self, req) -> tuple[list, list]:
        """(prompt token ids, extra stop strings) of a completion or chat request."""
        if isinstance(req, ChatCompletionRequest):
            if not has_chat_template(self.llm):
                raise BadRequest("this model has no chat template; use /v1/completions", "messages")
            try:
                return chat_prompt(self.llm, req.messages)
            except LoraFlowError as e:  # a template error is the request's
                raise BadRequest(str(e), "messages") from None
        prompt = _one_prompt(req.prompt)
        if isinstance(prompt, list):
            return list(prompt), []
        return (self.llm.tokenize(prompt.encode("utf-8"), special=True) if prompt else [self.llm.token_bos()]), []

    def submit(self, req, mode: Mode):
        from loraflow.runtime.batch_engine import RequestError

        self.check(req)
        tokens, stop = self.prompt_tokens(req)
        try:
            return self.engine.submit(tokens, mode, max_tokens=req.max_tokens, sampling=req.settings(),
                                      stop=req.stops() + stop)
        except RequestError as e:
            raise BadRequest(str(e), e.param) from None

    def answer(self, req, result, mode) -> dict:
        chat = isinstance(req, ChatCompletionRequest)
        choice = {"index": 0, "logprobs": None, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_id, "choices": [choice], "flow_mode": mode.name,
                "usage": {"prompt_tokens": result.n_prompt, "completion_tokens": len(result.tokens),
                          "total_tokens": result.n_prompt + len(result.tokens)}}

    def chunk(self, req, rid: str, created: int, mode, text: Optional[str], finish: Optional[str],
              first: bool = False) -> dict:
        chat = isinstance(req, ChatCompletionRequest)
        choice = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
        else:
            choice["text"] = text or ""
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": self.model_id, "choices": [choice], "flow_mode": mode.name}


def create_app(llm, model_id: str, mode: Optional[Mode] = None, parallel: int = 1,
               n_ctx: Optional[int] = None) -> "FastAPI":
    """The FastAPI app serving `llm` (a FlowLlama) under the name `model_id`, in `mode` when a
    request names none (default: llm's); `parallel` > 1 batches up to that many requests (n_ctx
    tokens of KV cache shared among them)."""
    engine = Engine(llm, model_id, mode)
    batched = BatchedServing(llm, model_id, parallel, n_ctx) if parallel > 1 else None
    app = FastAPI(title="loraflow", description="OpenAI-compatible API for a LoRA-Flow model")
    app.state.engine = engine
    app.state.batched = batched
    created = int(time.time())

    if batched is not None:
        @app.on_event("shutdown")
        def _close_engine():
            batched.engine.close()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msgs = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            msgs.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        param = str(first[-1]) if first else None
        return JSONResponse(error_body("; ".join(msgs) or "invalid request", param=param), status_code=400)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return _error_response(exc)

    @app.get("/health")
    async def health():
        slots = batched.engine.status() if batched is not None else {"slots": 1, "slots_busy": int(engine.lock.locked())}
        return {"status": "ok", **slots}

    @app.get("/metrics")
    async def metrics():
        return await health()

    @app.get("/v1/models")
    async def models():
        flow = None
        if llm.flow is not None:
            flow = {"adapters": llm.adapter_names, "n_layer": llm.flow.n_layer, "default_mode": engine.default.name,
                    "modes": ["dynamic", "static", "average", *(f"single:{n}" for n in llm.adapter_names), "off"]}
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "loraflow", "flow": flow}]}

    async def respond_batched(req: _Common):
        mode = engine.mode_of(req)
        request = batched.submit(req, mode)
        if not req.stream:
            try:
                result = await run_in_threadpool(request.result)
            except asyncio.CancelledError:
                request.cancel()
                raise
            except Exception as e:  # noqa: BLE001
                return _error_response(e)
            return batched.answer(req, result, mode)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def put(item) -> bool:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
                return True
            except RuntimeError:  # the event loop is gone (server shutting down)
                request.cancel()
                return False

        def pump():  # the engine's pieces, from its thread to this event loop
            try:
                for piece in request.stream():
                    if not put(("piece", piece)):
                        return
                put(("end", None))
            except Exception as e:  # noqa: BLE001 - reported to the client
                put(("error", e))

        threading.Thread(target=pump, name="loraflow-stream", daemon=True).start()
        rid, t = f"{'chatcmpl' if isinstance(req, ChatCompletionRequest) else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

        async def events():
            try:
                first = True
                while True:
                    kind, value = await pieces.get()
                    if kind == "piece":
                        yield f"data: {json.dumps(batched.chunk(req, rid, t, mode, value, None, first), ensure_ascii=False)}\n\n"
                        first = False
                    elif kind == "end":
                        final = batched.chunk(req, rid, t, mode, None, request.finish_reason or "stop", first)
                        yield f"data: {json.dumps(final, ensure_ascii=False)}\n\n"
                        break
                    else:
                        yield f"data: {json.dumps(error_body(f'{type(value).__name__}: {value}', type_='server_error'))}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                request.cancel()  # a client that went away frees its slot now (no-op when done)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def respond(req: _Common, fn):
        if batched is not None:
            return await respond_batched(req)
        if req.n != 1:
            raise BadRequest("only n=1 is supported", "n")
        mode = engine.mode_of(req)

        def finish(result: dict) -> dict:
            result["model"] = model_id
            result["flow_mode"] = mode.name
            return result

        if not req.stream:
            try:
                result = await run_in_threadpool(engine.run, mode, fn)
            except Exception as e:  # noqa: BLE001
                return _error_response(e)
            return finish(result)

        queue, cancel = engine.stream(mode, fn, asyncio.get_running_loop())
        first = await queue.get()
        if first[0] == "error":  # nothing sent yet: a proper status code
            return _error_response(first[1])

        async def events():
            item = first
            try:
                while item[0] == "chunk":
                    yield f"data: {json.dumps(finish(item[1]), ensure_ascii=False)}\n\n"
                    item = await queue.get()
                if item[0] == "error":
                    e = item[1]
                    yield f"data: {json.dumps(error_body(f'{type(e).__name__}: {e}', type_='server_error'))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # the client went away (or we are done): stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def generation(req) -> Dict[str, Any]:
        """llama-cpp-python's keyword arguments for the request's sampling, stop strings and stream."""
        return dict(stop=req.stops(), stream=req.stream, **req.settings().completion_kwargs(llm))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompt = _one_prompt(req.prompt)
        kwargs = dict(prompt=prompt, max_tokens=req.max_tokens, echo=req.echo, logprobs=req.logprobs,
                      **generation(req))
        return await respond(req, lambda: llm.create_completion(**kwargs))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        if not req.messages:
            raise BadRequest("messages must not be empty", "messages")
        kwargs = dict(messages=req.messages, max_tokens=req.max_tokens, logprobs=req.logprobs,
                      top_logprobs=req.top_logprobs, response_format=req.response_format, **generation(req))
        return await respond(req, lambda: llm.create_chat_completion(**kwargs))

    return app


def serve(llm, model_id: str, host: str = "127.0.0.1", port: int = 8000, mode: Optional[Mode] = None,
          log_level: str = "info", parallel: int = 1, n_ctx: Optional[int] = None) -> None:
    """Serve `llm` until interrupted."""
    import uvicorn

    app = create_app(llm, model_id, mode, parallel=parallel, n_ctx=n_ctx)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
