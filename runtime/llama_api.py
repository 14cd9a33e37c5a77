"""loraflow's one contact with llama-cpp-python below its public `Llama` API.

Every private attribute loraflow reads (`Llama._logits_all`, the loaded library handle) is read
here and nowhere else, and what loraflow needs of `Llama`'s public one (`.model`, `.ctx`, the
`llama_model *` and `llama_context *`) is checked here, so a llama-cpp-python release that
renames one fails here, with a message that names it (tests/test_llama_api.py checks them on
the installed version). Contexts, batches and samplers of our own are small owning wrappers over
the public ctypes mirror of llama.h (`llama_cpp.llama_cpp`), not llama-cpp-python's `_internals`.
"""

from __future__ import annotations

import ctypes
from typing import Dict

import llama_cpp

from loraflow.errors import NativeError

SUPPORTED_VERSIONS = ("0.3.36",)   # the pin (runtime/native/build.py); others may work, untested


def _incompatible(what: str) -> NativeError:
    return NativeError(f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} has no {what}; loraflow "
                       f"supports {', '.join(SUPPORTED_VERSIONS)} (run `make install`, which builds that version)")


def library() -> ctypes.CDLL:
    """The libllama llama-cpp-python loaded (the patched build also exports the flow API)."""
    try:
        return llama_cpp.llama_cpp._lib
    except AttributeError:
        raise _incompatible("llama_cpp.llama_cpp._lib (the loaded library)") from None


def _attr(llm, name: str):
    try:
        return getattr(llm, name)
    except AttributeError:
        raise _incompatible(f"Llama.{name}") from None


def logits_all(llm) -> bool:
    """Whether a llama_cpp.Llama keeps the logits of every evaluated token (logits_all=True)."""
    return bool(_attr(llm, "_logits_all"))


def check(llm) -> None:
    """NativeError, naming what is missing, when this llama-cpp-python lacks what we use."""
    if not (_attr(llm, "model") and _attr(llm, "ctx")):
        raise _incompatible("model and context pointers on Llama.model / Llama.ctx")
    logits_all(llm), library()


def clear_kv(ctx) -> None:
    """Forget everything the KV cache of `ctx` (a llama_context *) holds."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)


def vocab_ptr(model):
    return llama_cpp.llama_model_get_vocab(model)


def token_text(model, token: int) -> str:
    """A token's text in the vocabulary (special tokens as written, e.g. '<|im_end|>')."""
    return llama_cpp.llama_vocab_get_text(vocab_ptr(model), token).decode("utf-8", errors="replace")


class Context:
    """A llama_context of our own on a model (`llama_model *`), made with `params`
    (llama_context_params); `close()` frees it, and must come before the model is freed.
    `Context.borrow(ptr)` wraps one that something else owns (a Llama's), and never frees it."""

    def __init__(self, model, params):
        self.ptr = llama_cpp.llama_init_from_model(model, params)
        self._owned = True
        if not self.ptr:
            raise NativeError("llama.cpp could not create a context (out of memory, or a bad parameter)")

    @classmethod
    def borrow(cls, ptr) -> "Context":
        ctx = cls.__new__(cls)
        ctx.ptr, ctx._owned = ptr, False
        return ctx

    def decode(self, batch: "Batch") -> int:
        return llama_cpp.llama_decode(self.ptr, batch.batch)

    def logits(self, i: int, n_vocab: int):
        """The logits of row i of the last decoded batch (-1: the last row); a numpy view."""
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ptr, i), shape=(n_vocab,))

    def memory(self):
        return llama_cpp.llama_get_memory(self.ptr)

    def clear_kv(self) -> None:
        clear_kv(self.ptr)

    def close(self) -> None:
        if self.ptr and self._owned:
            llama_cpp.llama_free(self.ptr)
        self.ptr = None


class Batch:
    """A llama_batch of up to n_tokens token ids, each in n_seq_max sequences at most."""

    def __init__(self, n_tokens: int, n_seq_max: int = 1):
        self.capacity = n_tokens
        self.batch = llama_cpp.llama_batch_init(n_tokens, 0, n_seq_max)

    def set(self, rows) -> "Batch":
        """Fill the batch with (token, pos, seq_id, wants_logits) rows."""
        if len(rows) > self.capacity:
            raise ValueError(f"{len(rows)} tokens do not fit a batch of {self.capacity}")
        b = self.batch
        for i, (token, pos, seq_id, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.seq_id[i][0], b.n_seq_id[i], b.logits[i] = token, pos, seq_id, 1, logits
        b.n_tokens = len(rows)
        return self

    def set_tokens(self, tokens, first_pos: int = 0, seq_id: int = 0) -> "Batch":
        """One sequence's tokens at positions first_pos.., every row's logits kept."""
        return self.set([(t, first_pos + j, seq_id, True) for j, t in enumerate(tokens)])

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None


class Sampler:
    """A llama.cpp sampler chain: add samplers in order, then sample(ctx, row)."""

    def __init__(self):
        self.ptr = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def _add(self, sampler) -> "Sampler":
        llama_cpp.llama_sampler_chain_add(self.ptr, sampler)
        return self

    def greedy(self):
        return self._add(llama_cpp.llama_sampler_init_greedy())

    def dist(self, seed: int):
        return self._add(llama_cpp.llama_sampler_init_dist(seed))

    def top_k(self, k: int):
        return self._add(llama_cpp.llama_sampler_init_top_k(k))

    def top_p(self, p: float):
        return self._add(llama_cpp.llama_sampler_init_top_p(p, 1))

    def min_p(self, p: float):
        return self._add(llama_cpp.llama_sampler_init_min_p(p, 1))

    def temp(self, t: float):
        return self._add(llama_cpp.llama_sampler_init_temp(t))

    def penalties(self, n_vocab: int, last_n: int, repeat: float, frequency: float, presence: float):
        return self._add(llama_cpp.llama_sampler_init_penalties(n_vocab, last_n, repeat, frequency, presence))

    def grammar(self, model, gbnf: str, root: str = "root"):
        """Only tokens the GBNF grammar `gbnf` accepts from rule `root` (llama.cpp's grammar
        sampler, as llama-cpp-python's LlamaSampler.add_grammar makes it); ValueError when llama.cpp
        cannot parse it."""
        sampler = llama_cpp.llama_sampler_init_grammar(vocab_ptr(model), gbnf.encode("utf-8"), root.encode("utf-8"))
        if not sampler:
            raise ValueError("llama.cpp could not parse the grammar")
        return self._add(sampler)

    def logit_bias(self, n_vocab: int, bias: Dict[int, float]):
        array = (llama_cpp.llama_logit_bias * len(bias))()
        for i, (token, value) in enumerate(bias.items()):
            array[i].token, array[i].bias = token, value
        return self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), array))

    def sample(self, ctx: Context, row: int) -> int:
        """Sample the token of batch row `row` (and accept it: penalties see it)."""
        return llama_cpp.llama_sampler_sample(self.ptr, ctx.ptr, row)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None


class CompletionTokens:
    """The token ids of the completion llama-cpp-python's `Llama.create_completion` is making
    (and so `create_chat_completion`'s), as it makes them: `with CompletionTokens(llm) as seen:`
    around the call, then `seen.prompt` and `seen.tokens` (the generated ids, end-of-generation
    token excluded: what its usage counts). Its answers carry text only, and its last generated
    token is never evaluated, so nothing else tells.

    This leans on the code of `Llama._create_completion` (0.3.36): after every generated token it
    detokenizes the completion so far as `detokenize(completion_tokens, prev_tokens=prompt_tokens)`,
    the same two lists each time; the tokenizer (`Llama.tokenizer_`, the object Llama(tokenizer=)
    sets) is wrapped for the duration of the block and sees them. `abort()` makes the next such
    call raise `Aborted`, which ends the completion (a server stopping)."""

    class Aborted(Exception):
        pass

    def __init__(self, llm):
        self.llm = llm
        self.prompt: list = []
        self.tokens: list = []
        self.seen = False
        self._aborted = False

    def abort(self) -> None:
        self._aborted = True

    def __enter__(self) -> "CompletionTokens":
        inner = _attr(self.llm, "tokenizer_")
        spy = self

        class Tokenizer(type(inner)):            # isinstance checks still hold
            def __init__(self):                  # noqa: D401 - a view of `inner`, not a new tokenizer
                self.__dict__.update(inner.__dict__)

            def tokenize(self, *args, **kwargs):
                return inner.tokenize(*args, **kwargs)

            def detokenize(self, tokens, prev_tokens=None, special=False):
                if spy._aborted:
                    raise CompletionTokens.Aborted("the completion was aborted")
                if prev_tokens is not None and not spy.seen and isinstance(tokens, list):
                    spy.prompt, spy.tokens, spy.seen = prev_tokens, tokens, True   # the first call: the lists themselves
                return inner.detokenize(tokens, prev_tokens=prev_tokens, special=special)

        self._inner = inner
        self.llm.tokenizer_ = Tokenizer()
        return self

    def __exit__(self, *exc) -> None:
        self.llm.tokenizer_ = self._inner
