"""An OpenAI-compatible HTTP server for a FlowLlama (`loraflow serve`).

    POST /v1/completions          {"prompt": ..., "stream": false|true, ...}
    POST /v1/chat/completions     {"messages": [...], "stream": false|true, ...}
    GET  /v1/models
    GET  /health                  JSON: slots in use, queue
    GET  /metrics                 Prometheus text format (llama-server's names, and loraflow's)
    GET  /                        the web page (runtime/web.py), where installed

FastAPI + uvicorn; streamed answers are server-sent events (`data: {chunk}` ... `data: [DONE]`),
as OpenAI sends them.

loraflow's own body fields:

    "flow_mode":    "dynamic" | "static" | "average" | "single:<name>" | "off"
    "flow_weights": [w1, ..., wk]  or one row of k per layer (mode "static"; alone it implies "static")
    "flow_trace":   false | true | "mean" | "layers": the fusion weights of every generated token

A request without a mode runs in the server's (`--mode`/`--weights`). Every field is checked
before anything runs: a bad value, or a field this server does not serve, is answered with HTTP
400 and an OpenAI-style error body naming it, never ignored.

With `parallel` > 1 (the default: 4) the requests share a BatchEngine (runtime/batch_engine.py):
up to that many are decoded together, each in its own mode, with its own sampler chain (logit
bias, penalties, grammar, seed), logprobs read from the raw logits of the row it samples and gate
weights recorded while someone asks. With `parallel` = 1 one model serves one request at a time
(a lock; switching mode clears the KV cache) through llama-cpp-python's own completion code; its
logprobs need the model made with logits_all=True (`--logits-all`).

On SIGTERM or Ctrl-C the server stops taking requests (503), lets the running ones finish for up
to `shutdown_timeout` seconds, ends the streams still open with an error event, and returns.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

from loraflow.errors import LoraFlowError
from loraflow.modes import Mode, ModeError, parse_weights
from loraflow.runtime.batch_engine import split_utf8
from loraflow.runtime.prompts import chat_prompt, has_chat_template
from loraflow.runtime.sampling import Sampling

try:
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise LoraFlowError(f"the server needs FastAPI and uvicorn: pip install 'loraflow[serve]' ({e})") from None


Weights = Union[List[float], List[List[float]], str]
MAX_TOP_LOGPROBS = 20               # OpenAI's bound for top_logprobs
SHUTTING_DOWN = "the server is shutting down"


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")   # then refused by name (refuse_unserved), not dropped

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
    stream_options: Optional[Dict[str, Any]] = None
    n: int = 1
    ignore_eos: bool = False  # as llama.cpp's server: generate max_tokens, never an end-of-generation token
    logit_bias: Optional[Dict[str, float]] = None   # token id (a string, as OpenAI) -> bias
    response_format: Optional[Dict[str, Any]] = None
    grammar: Optional[str] = None                   # GBNF, as llama.cpp's and llama-cpp-python's servers take it
    user: Optional[str] = None                      # OpenAI's end-user id: no effect on the answer
    # loraflow's own fields
    flow_mode: Optional[str] = None
    flow_weights: Optional[Weights] = None
    flow_trace: Optional[Union[bool, str]] = None

    def stops(self) -> List[str]:
        return self.stop if isinstance(self.stop, list) else [self.stop] if self.stop else []


class CompletionRequest(_Common):
    prompt: Union[str, List[str], List[int]] = ""
    max_tokens: Optional[int] = Field(16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class ChatCompletionRequest(_Common):
    messages: List[Dict[str, Any]]
    max_completion_tokens: Optional[int] = Field(None, ge=0)   # OpenAI's newer name of max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


# Fields of OpenAI's (and llama-cpp-python's) requests that loraflow does not serve, with the
# values that mean "not used": a request that sets one otherwise is refused, naming it.
NOT_SERVED = {
    "best_of": (None, 1), "suffix": (None,), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "store": (None, False),
    "metadata": (None, {}), "service_tier": (None, "auto", "default"), "reasoning_effort": (None,),
    "web_search_options": (None,), "typical_p": (None, 1.0), "tfs_z": (None, 1.0), "mirostat_mode": (None, 0),
    "mirostat_tau": (None,), "mirostat_eta": (None,), "logprobs_type": (None,), "logit_bias_type": (None,),
}


class BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class Aborted(Exception):
    """A request ended because the server is stopping."""


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _number(x):
    """numpy numbers (llama-cpp-python's logprobs are float32s) as JSON numbers."""
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, default=_number)}\n\n"


def _plain(obj):
    return json.loads(json.dumps(obj, default=_number))


HTTP_FIELD = {"mode": "flow_mode", "weights": "flow_weights"}   # a ModeError's field, as the body names it


# -- what a request asks, checked once ------------------------------------------------------------


@dataclass
class Plan:
    """A request checked and resolved: everything both serving paths need of it."""

    chat: bool
    mode: Mode
    sampling: Sampling
    stops: List[str]
    max_tokens: Optional[int]
    logprobs: Optional[int]            # n (chat: top_logprobs, 0 without) or None: no logprobs
    echo: bool
    trace: Optional[str]               # "mean" | "layers" | None
    stream: bool
    include_usage: bool
    prompt: Any = None                 # completions: a string or token ids
    messages: Any = None


def refuse_unserved(req: _Common) -> None:
    for name, value in (req.model_extra or {}).items():
        if name in NOT_SERVED:
            if any(value == ok and type(value) is type(ok) for ok in NOT_SERVED[name]) or value is None:
                continue
            raise BadRequest(f"{name} is not supported by loraflow serve", name)
        raise BadRequest(f"unrecognized request argument supplied: {name}", name)
    if req.n != 1:
        raise BadRequest("only n=1 is supported", "n")


def flow_trace_of(value) -> Optional[str]:
    if value is None or value is False:
        return None
    if value is True or value == "mean":
        return "mean"
    if value == "layers":
        return "layers"
    raise BadRequest(f"flow_trace must be false, true, \"mean\" or \"layers\", got {value!r}", "flow_trace")


def grammar_of(req: _Common) -> Optional[str]:
    """The GBNF a request's response_format (OpenAI's json_schema form, or llama-cpp-python's
    json_object with or without a schema) or grammar asks for; None: free text."""
    rf = req.response_format
    if rf is None:
        return req.grammar
    if req.grammar is not None:
        raise BadRequest("give response_format or grammar, not both", "response_format")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = rf.get("schema")
    elif kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise BadRequest("response_format of type json_schema needs a json_schema object "
                             "({\"name\": ..., \"schema\": {...}})", "response_format")
        schema = spec.get("schema")
    else:
        raise BadRequest(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                         "response_format")
    from llama_cpp import llama_grammar

    if schema is None:
        return llama_grammar.JSON_GBNF
    if not isinstance(schema, dict):
        raise BadRequest("response_format: the schema must be a JSON object", "response_format")
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 - the converter's errors are the schema's
        raise BadRequest(f"response_format: the schema cannot be turned into a grammar: {e}",
                         "response_format") from None


def logit_bias_of(req: _Common, n_vocab: int) -> Optional[Dict[int, float]]:
    if not req.logit_bias:
        return None
    bias = {}
    for key, value in req.logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise BadRequest(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token < n_vocab:
            raise BadRequest(f"logit_bias: token id {token} is not in [0, {n_vocab})", "logit_bias")
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise BadRequest(f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")
        bias[token] = float(value)
    return bias


def make_plan(req: _Common, mode: Mode, n_vocab: int, model=None) -> Plan:
    refuse_unserved(req)
    chat = isinstance(req, ChatCompletionRequest)
    if chat:
        if not req.messages:
            raise BadRequest("messages must not be empty", "messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    else:
        logprobs, max_tokens = req.logprobs, req.max_tokens
    options = req.stream_options or {}
    if set(options) - {"include_usage"}:
        raise BadRequest("stream_options: only include_usage is supported", "stream_options")
    if options and not req.stream:
        raise BadRequest("stream_options needs stream: true", "stream_options")
    sampling = Sampling(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                        repeat_penalty=req.repeat_penalty, frequency_penalty=req.frequency_penalty,
                        presence_penalty=req.presence_penalty, seed=req.seed, ignore_eos=req.ignore_eos,
                        logit_bias=logit_bias_of(req, n_vocab), grammar=grammar_of(req))
    if sampling.grammar is not None:
        check_grammar(sampling.grammar, model, param="grammar" if req.grammar is not None else "response_format")
    return Plan(chat=chat, mode=mode, sampling=sampling, stops=req.stops(), max_tokens=max_tokens,
                logprobs=logprobs, echo=bool(getattr(req, "echo", False)), trace=flow_trace_of(req.flow_trace),
                stream=req.stream, include_usage=bool(options.get("include_usage")),
                prompt=None if chat else _one_prompt(req.prompt), messages=req.messages if chat else None)


def check_grammar(gbnf: str, model, param: str) -> None:
    """BadRequest unless llama.cpp parses the grammar (`model`: a llama_model *; None: unchecked)."""
    if model is None:
        return
    from loraflow.runtime.llama_api import Sampler

    sampler = Sampler()
    try:
        sampler.grammar(model, gbnf)
    except ValueError as e:
        raise BadRequest(f"{param}: {e}", param) from None
    finally:
        sampler.close()


def _one_prompt(prompt):
    """A completion's prompt: a string or token ids; a list of strings must hold exactly one."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise BadRequest("one prompt per request", "prompt")
        return prompt[0]
    return prompt


# -- the shapes of the answers: logprobs and flow traces ----------------------------------------------


def _piece(llm, token: int) -> str:
    return llm.detokenize([token]).decode("utf-8", errors="ignore")


def completion_logprobs(llm, ids, infos, offset0: int, start: int = 0, bos_skip: bool = True) -> dict:
    """A completion's `logprobs` for tokens ids[start:] as llama-cpp-python writes them
    (Llama._create_completion): token strings, text offsets (offset0 + the characters of the
    tokens before), the chosen token's logprob and a dict of the n most likely, the chosen one
    added. infos[i]: (logprob, [(id, logprob), ...]) of ids[i], or None (written null)."""
    out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    bos = llm.token_bos()
    pieces = [llm.detokenize([t]) for t in ids]
    before = b"".join(pieces[:start])
    for idx in range(start, len(ids)):
        token, info = ids[idx], infos[idx]
        if not (bos_skip and token == bos):
            text = pieces[idx].decode("utf-8", errors="ignore")
            out["tokens"].append(text)
            out["text_offset"].append(offset0 + len(before.decode("utf-8", errors="ignore")))
            if info is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                chosen, top = info
                best = {_piece(llm, i): lp for i, lp in top}
                best.update({text: chosen})
                out["token_logprobs"].append(chosen)
                out["top_logprobs"].append(best)
        before += pieces[idx]
    return out


def chat_logprobs(logprobs: Optional[dict]) -> Optional[dict]:
    """llama_chat_format._convert_text_completion_logprobs_to_chat."""
    if logprobs is None:
        return None
    return {"content": [{"token": token, "bytes": None, "logprob": lp,
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in (top or {}).items()]}
                        for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                  logprobs["top_logprobs"])],
            "refusal": None}


def echo_logprobs(llm, prompt_ids, gen_ids, prompt_infos, gen_infos) -> dict:
    """The logprobs of an echoed completion: the prompt's tokens (a leading BOS dropped) then the
    generated ones, the first written null (OpenAI's way). Each token's numbers are those of the
    row before it, so with or without a BOS token (llama-cpp-python's own are one row late on a
    model that adds none)."""
    skip = 1 if prompt_ids and prompt_ids[0] == llm.token_bos() else 0
    ids = list(prompt_ids[skip:]) + list(gen_ids)
    infos = list(prompt_infos[skip:]) + list(gen_infos)
    if infos:
        infos[0] = None
    return completion_logprobs(llm, ids, infos, 0)


class TraceWriter:
    """The flow_trace of one answer, token by token: each token's id, its text (the characters it
    completes, so the texts add up to the answer) and its weights: the k fusion weights averaged
    over layers ("mean") or [n_layer][k] ("layers"); null in mode off."""

    def __init__(self, llm, per: str):
        self.llm, self.per = llm, per
        self._held = b""

    def header(self) -> dict:
        flow = self.llm.flow
        return {"adapters": self.llm.adapter_names, "n_layer": flow.n_layer if flow else 0, "per": self.per}

    def tokens(self, ids, gates, final: bool = False) -> List[dict]:
        out = []
        for n, (token, gate) in enumerate(zip(ids, gates)):
            text, self._held = split_utf8(self._held + self.llm.detokenize([token]),
                                          final and n == len(ids) - 1)
            if gate is None:
                weights = None
            else:
                gate = np.asarray(gate, dtype=np.float64)
                weights = (gate.mean(axis=0) if self.per == "mean" else gate).tolist()
            out.append({"id": int(token), "text": text, "weights": weights})
        return out


# -- serving: the metrics and the stop ------------------------------------------------------------------


class Metrics:
    """Counters of the one-at-a-time path (the batched one reads its engine's)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_mode: Dict[str, int] = {}
        self.c = dict(prompt_tokens=0, generated_tokens=0, prompt_seconds=0.0, generation_seconds=0.0,
                      decode_steps=0, max_sequence=0)
        self.gate_sum: Optional[np.ndarray] = None
        self.gate_tokens = 0

    def count_request(self, mode: Mode) -> None:
        with self.lock:
            self.by_mode[mode.name] = self.by_mode.get(mode.name, 0) + 1

    def add_gates(self, gates, mode: Mode) -> None:
        if mode.kind != "dynamic":
            return
        rows = [np.asarray(g).mean(axis=0) for g in gates if g is not None]
        if not rows:
            return
        with self.lock:
            total = np.sum(rows, axis=0)
            self.gate_sum = total if self.gate_sum is None else self.gate_sum + total
            self.gate_tokens += len(rows)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def prometheus(counters: Dict[str, tuple], gauges: Dict[str, tuple], labelled: List[tuple]) -> str:
    """The text exposition format: `# HELP`, `# TYPE`, then the samples."""
    lines = []
    for kind, items in (("counter", counters), ("gauge", gauges)):
        for name, (help_, value) in items.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {float(value):.10g}"]
    for name, kind, help_, label, samples in labelled:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{{{label}=\"{_label(k)}\"}} {float(v):.10g}" for k, v in samples]
    return "\n".join(lines) + "\n"


class Lifecycle:
    """Serving or stopping: the requests in flight, and how to end them when time is up."""

    def __init__(self):
        self.draining = False
        self.aborted = False
        self.active = 0
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._enders: Dict[int, Callable[[], None]] = {}
        self._next = 0
        self.lock = threading.Lock()

    def enter(self, ender: Callable[[], None]) -> int:
        with self.lock:
            self.active += 1
            self._next += 1
            self._enders[self._next] = ender
            if self.aborted:
                ender()
            return self._next

    def leave(self, key: int) -> None:
        with self.lock:
            if self._enders.pop(key, None) is not None:
                self.active -= 1

    def abort_all(self) -> None:
        with self.lock:
            self.aborted = True
            enders = list(self._enders.values())
        for end in enders:
            end()


class _Gate:
    """ASGI middleware: while the server stops, every request but /metrics is answered 503."""

    def __init__(self, app, life: Lifecycle):
        self.app, self.life = app, life

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.life.draining and scope.get("path") != "/metrics":
            body = {"status": "shutting down"} if scope.get("path") == "/health" else \
                error_body(SHUTTING_DOWN, type_="server_error", code="shutting_down")
            await JSONResponse(body, status_code=503, headers={"Connection": "close"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


# -- one request at a time, through llama-cpp-python ------------------------------------------------------


class Engine:
    """One FlowLlama, one request at a time, each in the fusion mode it asked for."""

    def __init__(self, llm, model_id: str, mode: Optional[Mode] = None):
        self.llm = llm
        self.model_id = model_id
        self.lock = threading.Lock()
        self.waiting = 0
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

    def session(self, plan: Plan):
        return _Session(self, plan)


class _Session:
    """One request on the model, lock held: its mode set, gates recorded when it traces, and
    llama-cpp-python's completion watched (runtime.llama_api.CompletionTokens) for the token ids."""

    def __init__(self, engine: Engine, plan: Plan):
        from loraflow.runtime.llama_api import CompletionTokens

        self.engine, self.plan, self.llm = engine, plan, engine.llm
        self.seen = CompletionTokens(self.llm)
        self.gates: List[np.ndarray] = []          # gate rows of the evaluated tokens, from position 0
        self.started = self.first = None

    def begin(self) -> None:
        llm, plan = self.llm, self.plan
        self.engine._apply(plan.mode)
        self.fresh = plan.trace is not None or (plan.echo and plan.logprobs is not None)
        if self.fresh:  # every row from position 0: the prompt is evaluated whole
            llm.clear_kv()
        self.was_recording = llm.recording
        if plan.trace is not None and llm.flow is not None:
            llm.clear_gate_log()
            if not llm.recording:
                llm.record_gates(True)
                relayout(llm)
        self.started = time.perf_counter()
        self.seen.__enter__()

    def end(self) -> None:
        self.seen.__exit__(None, None, None)
        llm = self.llm
        if self.plan.trace is not None and llm.flow is not None:
            self.collect_gates()
            llm.record_gates(self.was_recording)
            llm.clear_gate_log()

    def collect_gates(self) -> None:
        if self.plan.trace is not None and self.llm.flow is not None and self.llm.recording:
            rows = self.llm.gate_weights()
            self.llm.clear_gate_log()
            self.gates.extend(rows)

    def gate_of(self, j: int):
        """The weights of generated token j: those of the row that predicted it."""
        if self.plan.mode.kind == "off" or self.llm.flow is None:
            return None
        row = len(self.seen.prompt) - 1 + j
        return self.gates[row] if row < len(self.gates) else None


def relayout(llm) -> None:
    """Attach llm's flow adapter to its context again, so that llama.cpp lays the graph's buffers
    out anew with the gates among its outputs (after llama_flow_set_record on a context that has
    decoded without recording, a graph of the same shape keeps a layout in which the gates'
    memory is reused: see BatchEngine._set_recording), and set its mode again."""
    import ctypes

    from loraflow.runtime import _bindings as B
    from loraflow.runtime.flow_llama import set_native_mode

    B.llama_flow_set_adapter(llm.ctx, None, None, 0)
    err = ctypes.create_string_buffer(1024)
    if B.llama_flow_set_adapter(llm.ctx, llm.flow.ptr, err, len(err)) != 0:
        raise LoraFlowError(err.value.decode(errors="replace"))
    set_native_mode(llm.ctx, llm.mode)


class OneAtATime:
    """The requests of an app with parallel = 1: llama-cpp-python's create_completion and
    create_chat_completion, one at a time, their answers decorated with what they cannot give
    (flow_trace, echo logprobs right on a model without BOS, usage in streams)."""

    def __init__(self, engine: Engine, life: Lifecycle, metrics: Metrics):
        from loraflow.runtime import llama_api

        self.engine, self.llm, self.life, self.metrics = engine, engine.llm, life, metrics
        self.logits_all = llama_api.logits_all(self.llm)

    def check(self, plan: Plan) -> None:
        if plan.logprobs is not None and not self.logits_all:
            raise BadRequest("logprobs need the model's every logit one at a time: start the server with "
                             "--logits-all, or batched (--parallel > 1)", "logprobs")
        if plan.echo and plan.stream and plan.logprobs is not None:
            raise BadRequest("echo with logprobs in a stream is served only when batched (--parallel > 1)", "echo")
        if plan.chat and has_chat_template(self.llm):   # the template's complaints are the request's, not a 500
            try:
                chat_prompt(self.llm, plan.messages)
            except LoraFlowError as e:
                raise BadRequest(str(e), "messages") from None
        if isinstance(plan.prompt, list):
            n_vocab = self.llm.n_vocab()
            if any(not isinstance(t, int) or not 0 <= t < n_vocab for t in plan.prompt):
                raise BadRequest(f"prompt token ids must be in [0, {n_vocab})", "prompt")

    def kwargs(self, plan: Plan) -> dict:
        kw = dict(max_tokens=plan.max_tokens, stop=plan.stops, stream=plan.stream,
                  **plan.sampling.completion_kwargs(self.llm))
        if plan.chat:
            kw.update(messages=plan.messages, logprobs=plan.logprobs is not None,
                      top_logprobs=plan.logprobs)
        else:
            kw.update(prompt=plan.prompt, echo=False, logprobs=None if plan.echo else plan.logprobs)
        return kw

    def call(self, plan: Plan, kwargs):
        return (self.llm.create_chat_completion if plan.chat else self.llm.create_completion)(**kwargs)

    def prompt_text(self, plan: Plan, session: _Session) -> str:
        if isinstance(plan.prompt, str):
            return plan.prompt
        return self.llm.detokenize(list(plan.prompt)).decode("utf-8", errors="ignore")

    def _record(self, session: _Session, plan: Plan) -> None:
        now = time.perf_counter()
        m = self.metrics
        with m.lock:
            m.c["prompt_tokens"] += len(session.seen.prompt)
            m.c["generated_tokens"] += len(session.seen.tokens)
            m.c["decode_steps"] += len(session.seen.tokens) + (1 if session.seen.prompt else 0)
            m.c["max_sequence"] = max(m.c["max_sequence"], len(session.seen.prompt) + len(session.seen.tokens))
            if session.started is not None:
                m.c["generation_seconds"] += now - session.started

    def finish(self, plan: Plan, session: _Session, result: dict) -> dict:
        """Echo, echo logprobs, flow_trace on a finished non-streamed answer."""
        llm, seen = self.llm, session.seen
        choice = result["choices"][0]
        if plan.echo:
            choice["text"] = self.prompt_text(plan, session) + choice["text"]
            if plan.logprobs is not None:
                n_prompt, gen = len(seen.prompt), list(seen.tokens)
                scores = llm.scores
                prompt_infos = [None] + [_lp(scores[j - 1], seen.prompt[j], plan.logprobs) for j in range(1, n_prompt)]
                gen_infos = [_lp(scores[n_prompt - 1 + j], t, plan.logprobs) for j, t in enumerate(gen)]
                choice["logprobs"] = echo_logprobs(llm, list(seen.prompt), gen, prompt_infos, gen_infos)
        if plan.trace is not None:
            ids = list(seen.tokens)
            gates = [session.gate_of(j) for j in range(len(ids))]
            writer = TraceWriter(llm, plan.trace)
            choice["flow_trace"] = {**writer.header(), "tokens": writer.tokens(ids, gates, final=True)}
            self.metrics.add_gates(gates, plan.mode)
        return result

    async def respond(self, plan: Plan, model_id: str):
        kwargs = self.kwargs(plan)

        def finish(result: dict) -> dict:
            result["model"] = model_id
            result["flow_mode"] = plan.mode.name
            return result

        if not plan.stream:
            session = _Session(self.engine, plan)
            key = self.life.enter(session.seen.abort)
            try:
                result = await run_in_threadpool(self._run, plan, session, kwargs)
            except Exception as e:  # noqa: BLE001
                return _error_response(Aborted() if self.life.aborted else e)
            finally:
                self.life.leave(key)
            return finish(_plain(result))
        return await self._stream(plan, kwargs, finish)

    def _run(self, plan: Plan, session: _Session, kwargs) -> dict:
        with self.engine.lock:
            session.begin()
            try:
                result = self.call(plan, kwargs)
            finally:
                session.end()
                self._record(session, plan)
            return self.finish(plan, session, result)

    async def _stream(self, plan: Plan, kwargs, finish):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        session = _Session(self.engine, plan)
        llm = self.llm

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                cancel.set()

        def ender():
            cancel.set()
            session.seen.abort()
            put(("abort", None))

        def work():
            with self.engine.lock:
                it = None
                try:
                    session.begin()
                    writer = TraceWriter(llm, plan.trace) if plan.trace else None
                    sent, emitted, ends = 0, 0, []
                    first = True
                    it = self.call(plan, kwargs)
                    pending = []
                    if plan.echo:   # the prompt first, as OpenAI streams an echo
                        head = next(it)
                        echo = json.loads(json.dumps(head))
                        echo["choices"][0].update(text=self.prompt_text(plan, session), logprobs=None,
                                                  finish_reason=None)
                        pending = [echo, head]
                    chunk = None
                    for chunk in _chain(pending, it):
                        if cancel.is_set():
                            break
                        choice = chunk["choices"][0]
                        text = choice.get("text") if not plan.chat else (choice.get("delta") or {}).get("content")
                        if writer is not None or plan.include_usage:
                            session.collect_gates()
                            ids = list(session.seen.tokens)
                            while len(ends) < len(ids):
                                ends.append((ends[-1] if ends else 0) + len(llm.detokenize([ids[len(ends)]])))
                            if text and not (plan.echo and first):
                                emitted += len(text.encode("utf-8"))
                            upto = len(ids) if choice.get("finish_reason") else bisect.bisect_right(ends, emitted)
                            if writer is not None:
                                trace = writer.header() if first else {}
                                trace["tokens"] = writer.tokens(ids[sent:upto], [session.gate_of(j) for j in
                                                                                 range(sent, upto)],
                                                                final=bool(choice.get("finish_reason")))
                                self.metrics.add_gates([session.gate_of(j) for j in range(sent, upto)], plan.mode)
                                choice["flow_trace"] = trace
                            sent = max(sent, upto)
                        first = False
                        put(("chunk", chunk))
                    if plan.include_usage and chunk is not None and not cancel.is_set():
                        n_p, n_g = len(session.seen.prompt), len(session.seen.tokens)
                        put(("chunk", {"id": chunk["id"], "object": chunk["object"], "created": chunk["created"],
                                       "model": chunk["model"], "choices": [],
                                       "usage": {"prompt_tokens": n_p, "completion_tokens": n_g,
                                                 "total_tokens": n_p + n_g}}))
                    put(("end", None))
                except Exception as e:  # noqa: BLE001 - reported to the client
                    put(("error", e))
                finally:
                    if it is not None and hasattr(it, "close"):
                        try:
                            it.close()
                        except Exception:  # noqa: BLE001 - an aborted completion's generator
                            pass
                    if session.started is not None:
                        session.end()
                        self._record(session, plan)

        key = self.life.enter(ender)
        threading.Thread(target=work, name="loraflow-generate", daemon=True).start()
        first = await queue.get()
        if first[0] in ("error", "abort"):  # nothing sent yet: a proper status code
            self.life.leave(key)
            return _error_response(Aborted() if first[0] == "abort" or self.life.aborted else first[1])

        async def events():
            item = first
            try:
                while item[0] == "chunk":
                    yield _sse(finish(item[1]))
                    item = await queue.get()
                if item[0] == "abort" or (item[0] == "error" and self.life.aborted):
                    yield _sse(error_body(SHUTTING_DOWN, type_="server_error", code="shutting_down"))
                elif item[0] == "error":
                    e = item[1]
                    yield _sse(error_body(f"{type(e).__name__}: {e}", type_="server_error"))
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # the client went away (or we are done): stop generating
                self.life.leave(key)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chain(first, rest):
    yield from first
    yield from rest


def _lp(logits, token, n):
    from loraflow.runtime.batch_engine import token_logprobs

    return token_logprobs(np.asarray(logits, dtype=np.float32), int(token), n)


def _error_response(e: Exception) -> JSONResponse:
    if isinstance(e, Aborted):
        return JSONResponse(error_body(SHUTTING_DOWN, type_="server_error", code="shutting_down"), status_code=503)
    if isinstance(e, BadRequest):
        return JSONResponse(error_body(str(e), param=e.param), status_code=400)
    if isinstance(e, (ValueError, LoraFlowError)):  # e.g. prompt longer than the context
        return JSONResponse(error_body(str(e)), status_code=400)
    return JSONResponse(error_body(f"{type(e).__name__}: {e}", type_="server_error"), status_code=500)


# -- batched ----------------------------------------------------------------------------------------------


class BatchedServing:
    """The requests of an app with parallel > 1, on one BatchEngine: prompts made here (chat
    templates through llama-cpp-python's Jinja2 formatter), OpenAI-shaped answers built here, in
    llama-cpp-python's shapes."""

    def __init__(self, llm, model_id: str, parallel: int, n_ctx: Optional[int], life: Lifecycle):
        from loraflow.runtime.batch_engine import BatchEngine

        self.llm, self.model_id, self.life = llm, model_id, life
        self.engine = BatchEngine(llm, n_parallel=parallel, n_ctx=n_ctx)
        self.by_mode: Dict[str, int] = {}

    def prompt_tokens(self, plan: Plan) -> tuple[list, list]:
        """(prompt token ids, extra stop strings) of a completion or chat request."""
        if plan.chat:
            if not has_chat_template(self.llm):
                raise BadRequest("this model has no chat template; use /v1/completions", "messages")
            try:
                return chat_prompt(self.llm, plan.messages)
            except LoraFlowError as e:  # a template error is the request's
                raise BadRequest(str(e), "messages") from None
        prompt = plan.prompt
        if isinstance(prompt, list):
            return list(prompt), []
        return (self.llm.tokenize(prompt.encode("utf-8"), special=True) if prompt else [self.llm.token_bos()]), []

    def submit(self, plan: Plan):
        from loraflow.runtime.batch_engine import RequestError

        tokens, stop = self.prompt_tokens(plan)
        try:
            request = self.engine.submit(tokens, plan.mode, max_tokens=plan.max_tokens, sampling=plan.sampling,
                                         stop=plan.stops + stop, logprobs=plan.logprobs,
                                         prompt_logprobs=plan.echo and plan.logprobs is not None,
                                         trace=plan.trace is not None)
        except RequestError as e:
            raise BadRequest(str(e), e.param) from None
        self.by_mode[plan.mode.name] = self.by_mode.get(plan.mode.name, 0) + 1
        return request

    def prompt_text(self, plan: Plan, request) -> str:
        if isinstance(plan.prompt, str):
            return plan.prompt
        return self.llm.detokenize(request.prompt).decode("utf-8", errors="ignore")

    def logprobs(self, plan: Plan, request, start: int, stop: int) -> Optional[dict]:
        """The logprobs of generated tokens [start, stop), in the endpoint's shape."""
        if plan.logprobs is None:
            return None
        offset0 = 0 if plan.chat else len(self.prompt_text(plan, request))
        ids, infos = request.generated[:stop], request.token_logprobs[:stop]
        out = completion_logprobs(self.llm, ids, infos, offset0, start=start)
        return chat_logprobs(out) if plan.chat else out

    def answer(self, plan: Plan, request, result) -> dict:
        chat = plan.chat
        choice = {"index": 0, "logprobs": None, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
            choice["logprobs"] = self.logprobs(plan, request, 0, len(result.tokens))
        else:
            choice["text"] = result.text
            if plan.echo:
                choice["text"] = self.prompt_text(plan, request) + result.text
                if plan.logprobs is not None:
                    choice["logprobs"] = echo_logprobs(self.llm, request.prompt, result.tokens,
                                                       request.prompt_token_logprobs, request.token_logprobs)
            elif plan.logprobs is not None:
                choice["logprobs"] = self.logprobs(plan, request, 0, len(result.tokens))
        if plan.trace is not None:
            writer = TraceWriter(self.llm, plan.trace)
            choice["flow_trace"] = {**writer.header(), "tokens": writer.tokens(result.tokens, request.gates, final=True)}
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_id, "choices": [choice], "flow_mode": plan.mode.name,
                "usage": {"prompt_tokens": result.n_prompt, "completion_tokens": len(result.tokens),
                          "total_tokens": result.n_prompt + len(result.tokens)}}

    def chunk(self, plan: Plan, rid: str, created: int, text: Optional[str], finish: Optional[str],
              first: bool = False, logprobs=None, trace=None) -> dict:
        choice = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
        if plan.chat:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
        else:
            choice["text"] = text or ""
        if trace is not None:
            choice["flow_trace"] = trace
        return {"id": rid, "object": "chat.completion.chunk" if plan.chat else "text_completion", "created": created,
                "model": self.model_id, "choices": [choice], "flow_mode": plan.mode.name}

    async def respond(self, plan: Plan):
        request = self.submit(plan)
        if plan.stream:
            return self._stream(plan, request)
        key = self.life.enter(request.cancel)
        try:
            result = await run_in_threadpool(request.result)
        except asyncio.CancelledError:
            request.cancel()
            raise
        except Exception as e:  # noqa: BLE001
            return _error_response(e)
        finally:
            self.life.leave(key)
        if self.life.aborted and request.finish_reason is None:
            return _error_response(Aborted())
        return self.answer(plan, request, result)

    def _stream(self, plan: Plan, request):
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
                for piece in request.stream_chunks():
                    if not put(("piece", piece)):
                        return
                put(("end", None))
            except Exception as e:  # noqa: BLE001 - reported to the client
                put(("error", e))

        key = self.life.enter(lambda: (put(("abort", None)), request.cancel()))
        threading.Thread(target=pump, name="loraflow-stream", daemon=True).start()
        rid = f"{'chatcmpl' if plan.chat else 'cmpl'}-{uuid.uuid4().hex}"
        t = int(time.time())
        writer = TraceWriter(self.llm, plan.trace) if plan.trace else None

        def extras(start: int, stop: int, first: bool, final: bool = False):
            logprobs = self.logprobs(plan, request, start, stop) if stop > start else None
            trace = None
            if writer is not None:
                trace = writer.header() if first else {}
                trace["tokens"] = writer.tokens(request.generated[start:stop], request.gates[start:stop], final=final)
            return logprobs, trace

        async def events():
            try:
                first, sent, echo = True, 0, plan.echo
                while True:
                    kind, value = await pieces.get()
                    if echo and kind in ("piece", "end"):   # the prompt first (its logprobs are known now)
                        echo = False
                        lp = None
                        if plan.logprobs is not None:
                            lp = echo_logprobs(self.llm, request.prompt, [], request.prompt_token_logprobs, [])
                        yield _sse(self.chunk(plan, rid, t, self.prompt_text(plan, request), None, logprobs=lp))
                    if kind == "piece":
                        text, upto = value
                        logprobs, trace = extras(sent, upto, first)
                        sent = max(sent, upto)
                        yield _sse(self.chunk(plan, rid, t, text, None, first, logprobs, trace))
                        first = False
                    elif kind == "end" and request.finish_reason is None and self.life.aborted:
                        yield _sse(error_body(SHUTTING_DOWN, type_="server_error", code="shutting_down"))
                        break
                    elif kind == "end":
                        logprobs, trace = extras(sent, len(request.generated), first, final=True)
                        yield _sse(self.chunk(plan, rid, t, None, request.finish_reason or "stop", first,
                                              logprobs, trace))
                        if plan.include_usage:
                            n_p, n_g = len(request.prompt), len(request.generated)
                            yield _sse({"id": rid, "object": "chat.completion.chunk" if plan.chat else "text_completion",
                                        "created": t, "model": self.model_id, "choices": [],
                                        "usage": {"prompt_tokens": n_p, "completion_tokens": n_g,
                                                  "total_tokens": n_p + n_g}})
                        break
                    elif kind == "abort":
                        yield _sse(error_body(SHUTTING_DOWN, type_="server_error", code="shutting_down"))
                        break
                    else:
                        if self.life.aborted:
                            yield _sse(error_body(SHUTTING_DOWN, type_="server_error", code="shutting_down"))
                        else:
                            yield _sse(error_body(f"{type(value).__name__}: {value}", type_="server_error"))
                        break
                yield "data: [DONE]\n\n"
            finally:
                request.cancel()  # a client that went away frees its slot now (no-op when done)
                self.life.leave(key)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def metrics(self) -> tuple[dict, dict, list]:
        s = self.engine.status()
        counters = {
            "llamacpp:prompt_tokens_total": ("Number of prompt tokens processed, excluding cached tokens",
                                             s["prompt_tokens"] - s["cached_tokens"]),
            "llamacpp:prompt_tokens_cached_total": ("Number of prompt tokens reused from the cache",
                                                    s["cached_tokens"]),
            "llamacpp:prompt_seconds_total": ("Total time spent processing prompts", s["prompt_seconds"]),
            "llamacpp:tokens_predicted_total": ("Number of generation tokens processed", s["generated_tokens"]),
            "llamacpp:tokens_predicted_seconds_total": ("Total time spent generating tokens",
                                                        s["generation_seconds"]),
            "llamacpp:n_decode_total": ("Total number of llama_decode() calls", s["decode_steps"]),
            "llamacpp:n_tokens_max": ("Largest observed sequence length (prompt + generation)", s["max_sequence"]),
        }
        processed = s["prompt_tokens"] - s["cached_tokens"]
        gauges = {
            "llamacpp:prompt_tokens_seconds": ("Average prompt throughput in tokens/s",
                                               processed / s["prompt_seconds"] if s["prompt_seconds"] else 0.0),
            "llamacpp:predicted_tokens_seconds": ("Average generation throughput in tokens/s",
                                                  s["generated_tokens"] / s["generation_seconds"]
                                                  if s["generation_seconds"] else 0.0),
            "llamacpp:requests_processing": ("Number of requests processing", s["slots_busy"]),
            "llamacpp:requests_deferred": ("Number of requests deferred", s["queued"]),
            "llamacpp:n_busy_slots_per_decode": ("Average number of busy slots per llama_decode() call",
                                                 s["busy_slot_steps"] / max(s["decode_steps"], 1)),
            "llamacpp:kv_cache_usage_ratio": ("KV-cache usage. 1 means 100 percent usage",
                                              s["kv_tokens"] / (s["slot_ctx"] * s["slots"])),
            "llamacpp:kv_cache_tokens": ("KV-cache tokens", s["kv_tokens"]),
            "loraflow:slots": ("Sequences decoded together (--parallel)", s["slots"]),
        }
        gates = (np.array(s["gate_sum"]) / s["gate_tokens"]) if s["gate_tokens"] else None
        return counters, gauges, [("by_mode", dict(self.by_mode)), ("gates", gates, s["gate_tokens"])]


# -- the app ------------------------------------------------------------------------------------------------


def create_app(llm, model_id: str, mode: Optional[Mode] = None, parallel: int = 1,
               n_ctx: Optional[int] = None) -> "FastAPI":
    """The FastAPI app serving `llm` (a FlowLlama) under the name `model_id`, in `mode` when a
    request names none (default: llm's); `parallel` > 1 batches up to that many requests (n_ctx
    tokens of KV cache shared among them)."""
    engine = Engine(llm, model_id, mode)
    life = Lifecycle()
    metrics = Metrics()
    batched = BatchedServing(llm, model_id, parallel, n_ctx, life) if parallel > 1 else None
    single = OneAtATime(engine, life, metrics) if batched is None else None
    app = FastAPI(title="loraflow", description="OpenAI-compatible API for a LoRA-Flow model")
    app.state.engine = engine
    app.state.batched = batched
    app.state.lifecycle = life
    app.add_middleware(_Gate, life=life)
    created = int(time.time())

    try:  # the web page (runtime/web.py), where this install has it
        from loraflow.runtime.web import add_page
    except ImportError:
        add_page = None
    if add_page is not None:
        add_page(app)

    @app.on_event("startup")
    async def _loop():
        life.loop = asyncio.get_running_loop()

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
        names = [str(p) for p in first if p != "body" and not isinstance(p, int)]
        param = names[0] if names else None
        return JSONResponse(error_body("; ".join(msgs) or "invalid request", param=param), status_code=400)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return _error_response(exc)

    @app.get("/health")
    async def health():
        slots = batched.engine.status() if batched is not None else {"slots": 1, "slots_busy": int(engine.lock.locked())}
        return {"status": "ok", **slots}

    @app.get("/metrics")
    async def metrics_text():
        if batched is not None:
            counters, gauges, extra = batched.metrics()
            by_mode = extra[0][1]
            gates, gate_tokens = extra[1][1], extra[1][2]
        else:
            with metrics.lock:
                c = dict(metrics.c)
                by_mode = dict(metrics.by_mode)
                gate_tokens = metrics.gate_tokens
                gates = metrics.gate_sum / gate_tokens if gate_tokens else None
            counters = {
                "llamacpp:prompt_tokens_total": ("Number of prompt tokens processed", c["prompt_tokens"]),
                "llamacpp:tokens_predicted_total": ("Number of generation tokens processed", c["generated_tokens"]),
                "llamacpp:tokens_predicted_seconds_total": ("Total time spent on requests (prompt and generation)",
                                                            c["generation_seconds"]),
                "llamacpp:n_decode_total": ("Total number of llama_decode() calls", c["decode_steps"]),
                "llamacpp:n_tokens_max": ("Largest observed sequence length (prompt + generation)", c["max_sequence"]),
            }
            gauges = {
                "llamacpp:predicted_tokens_seconds": ("Average throughput in tokens/s (prompt time included)",
                                                      c["generated_tokens"] / c["generation_seconds"]
                                                      if c["generation_seconds"] else 0.0),
                "llamacpp:requests_processing": ("Number of requests processing", int(engine.lock.locked())),
                "llamacpp:requests_deferred": ("Number of requests deferred", max(life.active - 1, 0)),
                "llamacpp:kv_cache_usage_ratio": ("KV-cache usage. 1 means 100 percent usage",
                                                  llm.n_tokens / llm.n_ctx()),
                "llamacpp:kv_cache_tokens": ("KV-cache tokens", llm.n_tokens),
                "loraflow:slots": ("Sequences decoded together (--parallel)", 1),
            }
        labelled = [("loraflow:requests_total", "counter", "Requests served, by fusion mode", "mode",
                     sorted(by_mode.items()))]
        names = llm.adapter_names
        labelled.append(("loraflow:gate_weight_mean", "gauge",
                         "Mean fusion weight of each adapter over the generated tokens of dynamic-mode requests "
                         "that asked for flow_trace (layers averaged)", "adapter",
                         [(n, gates[i]) for i, n in enumerate(names)] if gates is not None else []))
        gauges["loraflow:gate_tokens"] = ("Generated tokens loraflow:gate_weight_mean is over", gate_tokens)
        return PlainTextResponse(prometheus(counters, gauges, labelled),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        flow = None
        if llm.flow is not None:
            flow = {"adapters": llm.adapter_names, "n_layer": llm.flow.n_layer, "default_mode": engine.default.name,
                    "modes": ["dynamic", "static", "average", *(f"single:{n}" for n in llm.adapter_names), "off"]}
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "loraflow", "flow": flow}]}

    async def respond(req: _Common):
        mode = engine.mode_of(req)
        plan = make_plan(req, mode, llm.n_vocab(), llm.model)
        if batched is not None:
            return await batched.respond(plan)
        single.check(plan)
        metrics.count_request(mode)
        return await single.respond(plan, model_id)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await respond(req)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return await respond(req)

    return app


def serve(llm, model_id: str, host: str = "127.0.0.1", port: int = 8000, mode: Optional[Mode] = None,
          log_level: str = "info", parallel: int = 1, n_ctx: Optional[int] = None,
          shutdown_timeout: float = 10.0) -> None:
    """Serve `llm` until SIGTERM or Ctrl-C; then stop taking requests (503), let the running ones
    finish for up to `shutdown_timeout` seconds, end the rest (streams with an error event), and
    return. A second signal ends them at once."""
    import uvicorn

    app = create_app(llm, model_id, mode, parallel=parallel, n_ctx=n_ctx)
    life: Lifecycle = app.state.lifecycle

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # a signal: drain, then exit (and exit 0, not re-raise it)
            if life.draining:
                if life.loop is not None:
                    life.loop.call_soon_threadsafe(life.abort_all)
                else:
                    self.should_exit = True
                return
            life.draining = True
            if life.loop is None:
                self.should_exit = True
                return
            life.loop.call_soon_threadsafe(lambda: life.loop.create_task(self.drain()))

        async def drain(self) -> None:
            deadline = time.monotonic() + shutdown_timeout
            while life.active > 0 and time.monotonic() < deadline and not life.aborted:
                await asyncio.sleep(0.05)
            if life.active > 0:
                life.abort_all()
                grace = time.monotonic() + 5
                while life.active > 0 and time.monotonic() < grace:
                    await asyncio.sleep(0.05)
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    Server(config).run()
    engine: Engine = app.state.engine
    if engine.lock.acquire(timeout=30):   # a one-at-a-time generation still ending: wait for it
        engine.lock.release()
