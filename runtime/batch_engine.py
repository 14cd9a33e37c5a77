"""Continuous batching: many requests decoded together on one llama_context, each in its own
fusion mode (dynamic, its own static weights, one LoRA alone, the average, or the base alone).

    engine = BatchEngine(llm, n_parallel=8)          # llm: a FlowLlama (model, tokenizer, flow adapter)
    req = engine.submit(llm.tokenize(b"..."), mode="single:math", max_tokens=64, temperature=0.0)
    for piece in req.stream():                       # text as it is decoded
        print(piece, end="")
    req.result()                                     # Completion(text, tokens, finish_reason, ...)
    engine.close()

The modes are data of one graph (llama_flow_set_seq_mode), so sequences in different modes share
every decode step. The engine's thread owns the context: between two decode steps requests join
free slots and finished ones leave; prompts are fed first come, first served, in chunks of at
most prefill_chunk tokens a step while others wait, so one long prompt does not stall the
others' decoding and the first to come gets its first token first; every request samples with
its own llama.cpp sampler chain (logit bias, penalties, a grammar, a seed); stop strings end
it; a slot keeps its last request's tokens, and a new request in the same mode reuses the longest
shared prefix of the KV cache. Each slot holds n_ctx / n_parallel tokens: a request that cannot
fit (prompt + max_tokens) is refused when submitted.

What a request may ask besides its text, per generated token (the numbers of the row whose logits
were sampled, so of the position that predicted the token): `logprobs=n`, the log-softmax of the
raw logits, the chosen token's and the n most likely (`prompt_logprobs` too: those of every prompt
token after the first, its cache then not reused); `trace=True`, the fusion weights the gate
computed there ([n_layer, k]; None in mode off): the context records gates only while a running
request asks for them.
"""

from __future__ import annotations

import bisect
import ctypes
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from loraflow.errors import LoraFlowError
from loraflow.modes import Mode, ModeError
from loraflow.runtime.sampling import Sampling

PREFILL_CHUNK = 64

# a token's log-probability and the n most likely of its row, (token id, logprob) best first
TokenLogprobs = Tuple[float, List[Tuple[int, float]]]


def token_logprobs(logits: np.ndarray, token: int, n: int) -> TokenLogprobs:
    """The log-softmax of one row of raw logits, as llama-cpp-python computes it
    (Llama.logits_to_logprobs, float32): the chosen token's and the n largest, ties to the larger
    id as its sort gives them."""
    import llama_cpp

    lp = llama_cpp.Llama.logits_to_logprobs(logits)
    top: List[Tuple[int, float]] = []
    if n > 0:
        kth = np.partition(lp, -n)[-n]
        cand = np.nonzero(lp >= kth)[0].tolist()
        top = [(i, float(lp[i])) for i in sorted(cand, key=lambda i: (float(lp[i]), i), reverse=True)[:n]]
    return float(lp[token]), top


def split_utf8(data: bytes, final: bool) -> tuple[str, bytes]:
    """The text of `data` and the bytes held back: an incomplete UTF-8 character at its end, which
    the next token's bytes may complete (none when `final`: what is left is decoded as it is)."""
    cut = len(data)
    while not final and cut > 0:
        try:
            data[:cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            cut -= 1
    return data[:cut].decode("utf-8", errors="replace"), data[cut:]


class RequestError(LoraFlowError):
    """A request the engine cannot run (too long for a slot, a bad prompt, ...); `param` names
    the field at fault."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


@dataclass
class Completion:
    text: str
    tokens: List[int]
    finish_reason: str                 # "stop" (end of text or a stop string) or "length"
    n_prompt: int
    n_cached: int                      # prompt tokens whose KV cache was reused
    time_to_first_token: float         # seconds from submit to the first generated token


class Request:
    """One submitted request: stream() its text as it is decoded, or wait for result()."""

    def __init__(self, engine: "BatchEngine", tokens: List[int], mode: Mode, max_tokens: int,
                 sampling: Sampling, stop: Sequence[str], logprobs: Optional[int] = None,
                 prompt_logprobs: bool = False, trace: bool = False):
        self.engine = engine
        self.prompt = list(tokens)
        self.mode = mode
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stop = [s for s in stop if s]
        self.logprobs = logprobs                      # n: keep each token's logprob and the n best
        self.prompt_logprobs = prompt_logprobs and logprobs is not None
        self.trace = trace
        self.generated: List[int] = []
        self.token_logprobs: List[TokenLogprobs] = []                     # per generated token
        self.prompt_token_logprobs: List[Optional[TokenLogprobs]] = []   # per prompt token (first: None)
        self.gates: List[Optional[np.ndarray]] = []                       # per generated token: [n_layer, k]
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.n_cached = 0
        self.submitted = time.perf_counter()
        self.started_at: Optional[float] = None       # when it took a slot
        self.first_token_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self.first_token_step: Optional[int] = None   # the engine's decode step that gave it
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self._token_ends: List[int] = []              # bytes of the generated text after each token
        self._pieces: "queue.Queue[Optional[Tuple[str, int]]]" = queue.Queue()

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot at its next step."""
        self.cancelled.set()
        self.engine._wake()

    def stream(self) -> Iterator[str]:
        """The generated text, piece by piece, until the request ends."""
        for text, _ in self.stream_chunks():
            yield text

    def stream_chunks(self) -> Iterator[Tuple[str, int]]:
        """(piece of text, how many generated tokens its text is complete with so far), piece by
        piece, until the request ends; a token whose text is all sent comes with the piece that
        completes it (its logprobs and gates are then in `token_logprobs` and `gates`). The tokens
        after the last piece's count belong with the end."""
        while True:
            piece = self._pieces.get()
            if piece is None:
                break
            yield piece
        if self.error is not None:
            raise self.error

    def result(self, timeout: Optional[float] = None) -> Completion:
        if not self.done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self.error is not None:
            raise self.error
        return Completion(self.text, list(self.generated), self.finish_reason or "stop", len(self.prompt),
                          self.n_cached, (self.first_token_at or self.submitted) - self.submitted)

    # called by the engine's thread
    def _emit(self, piece: str, safe_bytes: int) -> None:
        if piece:
            self.text += piece
            self._pieces.put((piece, bisect.bisect_right(self._token_ends, safe_bytes)))

    def _end(self, reason: Optional[str], error: Optional[BaseException] = None) -> None:
        self.finish_reason, self.error = reason, error
        self.ended_at = time.perf_counter()
        self._pieces.put(None)
        self.done.set()


@dataclass
class _Slot:
    seq_id: int
    tokens: List[int] = field(default_factory=list)   # what the KV cache holds for this sequence
    mode_key: Optional[tuple] = None                   # the mode those states were computed in
    mode: Optional[Mode] = None
    request: Optional[Request] = None
    pending: List[int] = field(default_factory=list)  # tokens to feed before sampling
    sampler: object = None
    held: bytes = b""                                  # generated bytes not yet valid UTF-8
    unsent: str = ""                                   # decoded text held back: it may begin a stop string
    n_bytes: int = 0                                   # bytes of the request's generated text


class BatchEngine:
    """Continuous batching of requests on a second context of `llm`'s model with `n_parallel`
    sequences (slots) and llm's flow adapter; `n_ctx` tokens of KV cache in all (default: llm's
    context size for each slot), `n_batch` tokens per decode step, of which at most `prefill_chunk`
    prompt tokens while other requests wait (smaller: an earlier first token for the others;
    larger: fewer, fuller steps). Each slot is a KV stream of its own (kv_unified off), laid out
    as the sequence alone would be; with `deterministic` (default: llm's) the kernels are
    batch-invariant too, and every sequence's logits are bitwise those of its solo run."""

    def __init__(self, llm, n_parallel: int = 4, n_ctx: Optional[int] = None, n_batch: int = 512,
                 n_threads: Optional[int] = None, prefill_chunk: int = PREFILL_CHUNK,
                 deterministic: Optional[bool] = None):
        import llama_cpp

        from loraflow.runtime import _bindings as B
        from loraflow.runtime import llama_api
        from loraflow.runtime.flow_llama import set_batch_invariant

        if n_parallel < 1:
            raise LoraFlowError(f"n_parallel must be >= 1, got {n_parallel}")
        if prefill_chunk < 1:
            raise LoraFlowError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.llm, self.B, self._llama_cpp = llm, B, llama_cpp
        self.n_parallel = n_parallel
        params = llama_cpp.llama_context_default_params()
        ctypes.memmove(ctypes.byref(params), ctypes.byref(llm.context_params), ctypes.sizeof(params))
        self.slot_ctx = (n_ctx // n_parallel) if n_ctx else llm.n_ctx()
        params.n_ctx = self.slot_ctx * n_parallel
        params.n_seq_max = n_parallel
        params.kv_unified = False       # each sequence its own stream of cells: numbers as when alone
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, params.n_ubatch or n_batch)
        params.embeddings = False
        if n_threads:
            params.n_threads = params.n_threads_batch = n_threads
        self.n_batch = n_batch
        self.ctx = llama_api.Context(llm.model, params)
        llm.on_close(self)                # the context goes before the model it was made on
        self.deterministic = getattr(llm, "deterministic", False) if deterministic is None else bool(deterministic)
        try:
            set_batch_invariant(self.ctx.ptr, self.deterministic)
        except LoraFlowError:
            self.ctx.close()
            raise
        if llm.flow is not None:
            err = ctypes.create_string_buffer(1024)
            if B.llama_flow_set_adapter(self.ctx.ptr, llm.flow.ptr, err, len(err)) != 0:
                self.ctx.close()
                raise LoraFlowError(err.value.decode(errors="replace"))
        self.batch = llama_api.Batch(n_batch)
        self.slots = [_Slot(i) for i in range(n_parallel)]
        self.queue: List[Request] = []
        self.lock = threading.Condition()
        self.closed = False
        self.stats = dict(requests=0, finished=0, cancelled=0, generated_tokens=0, prompt_tokens=0,
                          cached_tokens=0, decode_steps=0, prompt_seconds=0.0, generation_seconds=0.0,
                          busy_slot_steps=0, max_sequence=0)
        k = llm.flow.n_adapters if llm.flow is not None else 0
        self.gate_sum = np.zeros(k)      # the layer-mean gate weights of the dynamic tokens traced, summed
        self.gate_tokens = 0
        self._recording = False
        self.thread = threading.Thread(target=self._run, name="loraflow-batch-engine", daemon=True)
        self.thread.start()

    # -- the caller's side -------------------------------------------------------------------

    def submit(self, tokens: Sequence[int], mode: Mode | str = "dynamic", weights=None,
               max_tokens: Optional[int] = 16, sampling: Optional[Sampling] = None, stop: Sequence[str] = (),
               logprobs: Optional[int] = None, prompt_logprobs: bool = False, trace: bool = False) -> Request:
        """Queue a request (prompt token ids) in `mode` (a Mode, or a name with `weights`);
        RequestError (ModeError for the mode) if it cannot run. `logprobs`: keep every generated
        token's logprob and the `logprobs` most likely (`prompt_logprobs`: the prompt's too);
        `trace`: keep the gate's weights of every generated token."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise RequestError("the prompt is empty", "prompt")
        n_vocab = self.llm.n_vocab()
        if any(t < 0 or t >= n_vocab for t in tokens):
            raise RequestError(f"prompt token ids must be in [0, {n_vocab})", "prompt")
        if not isinstance(mode, Mode):
            mode = self.llm.resolve_mode(mode, weights)
        elif weights is not None:
            raise ModeError("a Mode carries its own weights", "weights")
        room = self.slot_ctx - len(tokens)
        if room < 1:
            raise RequestError(f"the prompt has {len(tokens)} tokens; a sequence holds {self.slot_ctx} "
                               f"(n_ctx {self.slot_ctx * self.n_parallel} over {self.n_parallel} slots)", "prompt")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise RequestError(f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceed the "
                               f"{self.slot_ctx} tokens a sequence holds", "max_tokens")
        sampling = sampling or Sampling()
        if sampling.grammar is not None:   # a grammar llama.cpp cannot parse fails here, not in the engine
            try:
                sampling.sampler(self.llm).close()
            except ValueError as e:
                raise RequestError(str(e), "grammar") from None
        request = Request(self, tokens, mode, max_tokens, sampling, stop, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, trace=trace)
        with self.lock:
            if self.closed:
                raise LoraFlowError("the engine is closed")
            self.queue.append(request)
            self.stats["requests"] += 1
            self.lock.notify()
        return request

    def status(self) -> dict:
        with self.lock:
            busy = sum(s.request is not None for s in self.slots)
            return dict(slots=self.n_parallel, slots_busy=busy, queued=len(self.queue), slot_ctx=self.slot_ctx,
                        kv_tokens=sum(len(s.tokens) for s in self.slots), recording=self._recording,
                        gate_tokens=self.gate_tokens, gate_sum=self.gate_sum.tolist(), **self.stats)

    def cache_positions(self) -> list[tuple[int, int]]:
        """Per slot (tokens it believes its KV cache holds, positions llama.cpp holds for it): the
        two must agree. Read it while the engine is idle."""
        mem = self._llama_cpp.llama_get_memory(self.ctx.ptr)
        return [(len(s.tokens), self._llama_cpp.llama_memory_seq_pos_max(mem, s.seq_id) + 1) for s in self.slots]

    def close(self) -> None:
        if self.ctx.ptr is None:
            return
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join()
        for request in self.queue:
            request._end(None, LoraFlowError("the engine was closed"))
        self.B.llama_flow_set_adapter(self.ctx.ptr, None, None, 0)
        self.batch.close()
        self.ctx.close()

    def _wake(self) -> None:
        with self.lock:
            self.lock.notify()

    # -- the engine's thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not self.queue and not any(s.request for s in self.slots):
                    self.lock.wait()
                if self.closed:
                    break
                self._admit()
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - fail the running requests, keep serving
                for slot in self.slots:
                    if slot.request is not None:
                        self._finish(slot, None, e)
                        self._forget(slot)
        for slot in self.slots:
            if slot.request is not None:
                self._finish(slot, None, LoraFlowError("the engine was closed"))

    def _admit(self) -> None:
        """Move queued requests into free slots (with the lock held): the slot whose cache shares
        the longest prefix with the prompt in the same mode, else the lowest."""
        while self.queue:
            free = [s for s in self.slots if s.request is None]
            if not free:
                return
            request = self.queue.pop(0)
            if request.cancelled.is_set():
                request._end(None, None)
                self.stats["cancelled"] += 1
                continue
            # the lowest slot when none shares a prefix: busy slots in a run of ids decode as one
            # ubatch (llama.cpp splits a batch over KV streams at a gap in the ids)
            slot = max(free, key=lambda s: (self._shared(s, request), -s.seq_id))
            self._start(slot, request, self._shared(slot, request))

    @staticmethod
    def _shared(slot: _Slot, request: Request) -> int:
        if slot.mode_key != request.mode.key or request.prompt_logprobs:
            return 0
        n = 0
        # at least one prompt token is fed again: its logits start the generation
        for a, b in zip(slot.tokens, request.prompt[:-1]):
            if a != b:
                break
            n += 1
        return n

    def _start(self, slot: _Slot, request: Request, n_keep: int) -> None:
        from loraflow.runtime.flow_llama import set_native_mode

        ctx = self.ctx.ptr
        self._llama_cpp.llama_memory_seq_rm(self._llama_cpp.llama_get_memory(ctx), slot.seq_id, n_keep, -1)
        slot.tokens = slot.tokens[:n_keep]
        if self.llm.flow is not None:
            set_native_mode(ctx, request.mode, seq_id=slot.seq_id)
        slot.mode_key, slot.mode = request.mode.key, request.mode
        slot.request = request
        slot.pending = request.prompt[n_keep:]
        slot.held, slot.unsent, slot.n_bytes = b"", "", 0
        slot.sampler = request.sampling.sampler(self.llm)
        request.n_cached = n_keep
        request.started_at = time.perf_counter()
        if request.prompt_logprobs:
            request.prompt_token_logprobs = [None]
        self.stats["prompt_tokens"] += len(request.prompt)
        self.stats["cached_tokens"] += n_keep

    def _step(self) -> None:
        """One decode step: every slot's next token, and prompt chunks in the room left."""
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled.is_set():
                self.stats["cancelled"] += 1
                self._finish(slot, None)
        active = [s for s in self.slots if s.request is not None and s.pending]
        if not active:
            return
        rows = []                           # (token, position, sequence, wants logits)
        logit_rows = {}                     # batch row -> slot whose next token it samples
        prompt_rows = {}                    # batch row -> (slot, prompt token it gives the logprob of)
        generating = [s for s in active if s.request.generated or len(s.pending) == 1]
        # prompts first come, first served, so that the first to come gets its first token first:
        # the oldest takes up to prefill_chunk tokens (the whole batch when nobody else waits),
        # later ones join the step only whole, in the room left
        prefilling = sorted((s for s in active if s not in generating), key=lambda s: s.request.submitted)
        room = self.n_batch - len(generating)
        if len(active) > 1:
            room = min(room, self.prefill_chunk)
        chunks = []
        for slot in prefilling:
            take = min(len(slot.pending), room)
            if take <= 0 or (chunks and take < len(slot.pending)):
                break
            chunks.append((slot, take))
            room -= take
        for slot, take in [(s, len(s.pending)) for s in generating] + chunks:
            take = min(take, self.n_batch - len(rows))
            if take <= 0:
                continue
            scored = slot.request.prompt_logprobs and not slot.request.generated
            for j, token in enumerate(slot.pending[:take]):
                last = j == take - 1 and take == len(slot.pending)
                if last:
                    logit_rows[len(rows)] = slot
                elif scored:
                    prompt_rows[len(rows)] = (slot, len(slot.tokens) + j + 1)
                rows.append((token, len(slot.tokens) + j, slot.seq_id, last or scored))
            slot.tokens += slot.pending[:take]
            slot.pending = slot.pending[take:]
        record = self.llm.flow is not None and any(s.request is not None and s.request.trace for s in self.slots)
        if record != self._recording:       # the gates are graph outputs only while someone reads them
            self._set_recording(record)
        self.batch.set(rows)
        rc = self.ctx.decode(self.batch)
        if rc != 0:
            raise LoraFlowError(f"llama_decode failed ({rc}) on a batch of {len(rows)} tokens")
        self.stats["decode_steps"] += 1
        self.stats["busy_slot_steps"] += sum(s.request is not None for s in self.slots)
        gates = None
        if record:
            from loraflow.runtime.flow_llama import recorded_gates

            gates = recorded_gates(self.ctx.ptr, self.llm.flow)
        n_vocab = self.llm.n_vocab()
        for row, (slot, j) in prompt_rows.items():
            slot.request.prompt_token_logprobs.append(
                token_logprobs(self.ctx.logits(row, n_vocab), slot.request.prompt[j], slot.request.logprobs))
        for row, slot in logit_rows.items():
            request = slot.request
            logits = np.array(self.ctx.logits(row, n_vocab)) if request.logprobs is not None else None
            token = slot.sampler.sample(self.ctx, row)
            info = None if logits is None else token_logprobs(logits, token, request.logprobs)
            gate = None
            if request.trace and gates is not None and request.mode.kind != "off":
                gate = gates[row].copy()
            self._accept(slot, token, info, gate)

    def _set_recording(self, on: bool) -> None:
        """Record the gates (or not). Turned on, the adapter is attached again: that makes llama.cpp
        reserve and lay out the graph's buffers anew, with the gates among its outputs. (Without
        it, a graph of the same shape as one computed while not recording reuses that layout, in
        which the gate tensors' memory is overwritten by later nodes: the recorded weights are
        garbage. The patch's llama_flow_set_record rebuilds the graph but keeps the layout.)
        Attaching clears the sequences' modes: set again for every slot that has one."""
        from loraflow.runtime.flow_llama import set_native_mode

        self.B.llama_flow_set_record(self.ctx.ptr, on)
        if on:
            self.B.llama_flow_set_adapter(self.ctx.ptr, None, None, 0)
            err = ctypes.create_string_buffer(1024)
            if self.B.llama_flow_set_adapter(self.ctx.ptr, self.llm.flow.ptr, err, len(err)) != 0:
                raise LoraFlowError(err.value.decode(errors="replace"))
            for slot in self.slots:
                if slot.mode is not None:
                    set_native_mode(self.ctx.ptr, slot.mode, seq_id=slot.seq_id)
        self._recording = on

    def _accept(self, slot: _Slot, token: int, info: Optional[TokenLogprobs] = None,
                gate: Optional[np.ndarray] = None) -> None:
        request = slot.request
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
            request.first_token_step = self.stats["decode_steps"]
        if self.llm.is_eog(token):
            self._flush(slot, final=True)
            self._finish(slot, "stop")
            return
        request.generated.append(token)
        if request.logprobs is not None:
            request.token_logprobs.append(info)
        if request.trace:
            request.gates.append(gate)
            if gate is not None and request.mode.kind == "dynamic":
                self.gate_sum += gate.mean(axis=0)
                self.gate_tokens += 1
        self.stats["generated_tokens"] += 1
        slot.pending = [token]
        piece = self.llm.detokenize([token])
        slot.held += piece
        slot.n_bytes += len(piece)
        request._token_ends.append(slot.n_bytes)
        if self._flush(slot, final=False):
            self._finish(slot, "stop")
        elif len(request.generated) >= request.max_tokens:
            self._flush(slot, final=True)
            self._finish(slot, "length")

    def _flush(self, slot: _Slot, final: bool) -> bool:
        """Emit the text decoded so far, keeping back an incomplete UTF-8 character and whatever
        could still become a stop string; True when a stop string was met (the text ends before it)."""
        request = slot.request
        text, slot.held = split_utf8(slot.held, final)
        text = slot.unsent + text
        decoded = slot.n_bytes - len(slot.held)          # bytes of the generated text decoded so far
        for stop in request.stop:
            i = text.find(stop)
            if i >= 0:
                request._emit(text[:i], decoded - len(text[i:].encode()))
                slot.unsent = ""
                return True
        hold = 0
        if not final:  # the longest tail that begins a stop string
            for stop in request.stop:
                hold = max([hold] + [k for k in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:k])])
        slot.unsent = text[len(text) - hold:]
        request._emit(text[:len(text) - hold], decoded - len(slot.unsent.encode()))
        return False

    def _finish(self, slot: _Slot, reason: Optional[str], error: Optional[BaseException] = None) -> None:
        request = slot.request
        if slot.sampler is not None:
            slot.sampler.close()
        slot.request, slot.pending, slot.sampler, slot.unsent = None, [], None, ""
        self.stats["finished"] += 1
        now = time.perf_counter()
        if request.first_token_at is not None:
            self.stats["prompt_seconds"] += request.first_token_at - (request.started_at or request.submitted)
            self.stats["generation_seconds"] += now - request.first_token_at
        self.stats["max_sequence"] = max(self.stats["max_sequence"], len(request.prompt) + len(request.generated))
        request._end(reason, error)

    def _forget(self, slot: _Slot) -> None:
        """Drop what a slot's cache holds (after a failed step its states are not to be trusted)."""
        self._llama_cpp.llama_memory_seq_rm(self._llama_cpp.llama_get_memory(self.ctx.ptr), slot.seq_id, -1, -1)
        slot.tokens, slot.mode_key, slot.mode = [], None, None
