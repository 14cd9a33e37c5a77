"""Generation for people: stream a completion to a terminal, and a chat session with
history and fusion-mode switching (`loraflow generate`, `loraflow chat`).

Everything here drives a `FlowLlama` through llama-cpp-python's own completion API, so
sampling, chat templates and stop tokens behave exactly as they do there.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, TextIO

from loraflow.errors import LoraFlowError
from loraflow.modes import MODE_NAMES


def parse_weights(text: Optional[str]):
    """Static weights from the command line: "0.3,0.7" (k numbers, every layer) or
    "0.3,0.7;0.5,0.5;..." (one row of k per layer). None stays None."""
    if text is None:
        return None
    try:
        rows = [[float(x) for x in row.split(",")] for row in text.strip().strip(";").split(";")]
    except ValueError:
        raise LoraFlowError(f"weights must be numbers separated by ',' (rows by ';'), got {text!r}") from None
    if len(rows) == 1:
        return rows[0]
    if len({len(r) for r in rows}) != 1:
        raise LoraFlowError(f"every row of weights needs the same number of values, got {text!r}")
    return rows


def has_chat_template(llm) -> bool:
    return bool(llm.metadata.get("tokenizer.chat_template"))


def chat_prompt_tokens(llm, messages) -> List[int]:
    """The tokens llama-cpp-python's chat handler builds from the model's chat template for
    `messages` (generation prompt included)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise LoraFlowError("the model has no chat template; use the raw prompt (--raw)")
    model = llm._model
    eos, bos = model.token_eos(), model.token_bos()
    fmt = Jinja2ChatFormatter(template, eos_token=model.token_get_text(eos) if eos != -1 else "",
                              bos_token=model.token_get_text(bos) if bos != -1 else "")
    return llm.tokenize(fmt(messages=messages).prompt.encode("utf-8"), add_bos=False, special=True)


def messages_for(prompt: str, system: Optional[str] = None) -> List[Dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


@dataclass
class Sampling:
    """The sampling knobs of generate and chat (llama-cpp-python's names)."""

    max_tokens: Optional[int] = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0
    seed: Optional[int] = None

    def kwargs(self) -> dict:
        return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, repeat_penalty=self.repeat_penalty, seed=self.seed)


def stream_generate(llm, prompt: str, sampling: Sampling, chat: Optional[bool] = None,
                    system: Optional[str] = None, out: TextIO = None) -> str:
    """Write the completion of `prompt` to `out` piece by piece as tokens arrive; return it.

    chat=None uses the model's chat template when it has one, else the raw prompt."""
    out = out or sys.stdout
    if chat is None:
        chat = has_chat_template(llm)
    if chat:
        chunks = llm.create_chat_completion(messages_for(prompt, system), stream=True, **sampling.kwargs())
        pieces = (c["choices"][0]["delta"].get("content") or "" for c in chunks)
    else:
        if system:
            raise LoraFlowError("--system needs the chat template (drop --raw)")
        chunks = llm.create_completion(prompt, stream=True, **sampling.kwargs())
        pieces = (c["choices"][0]["text"] for c in chunks)
    text = []
    try:
        for piece in pieces:
            if piece:
                out.write(piece)
                out.flush()
                text.append(piece)
    except ValueError as e:  # llama-cpp-python: prompt longer than the context
        raise LoraFlowError(str(e)) from None
    return "".join(text)


CHAT_HELP = ("commands: /mode <dynamic | static W1,W2,... | average | single:NAME | off>, "
             "/reset (forget the history), /help, /quit")


@dataclass
class ChatSession:
    """A conversation with a FlowLlama: history, and commands between turns.

    `handle(line, out)` takes one line the user typed; returns False when the session ends."""

    llm: object
    sampling: Sampling
    system: Optional[str] = None
    history: List[Dict[str, str]] = field(default_factory=list)

    def status(self) -> str:
        mode = self.llm.mode
        w = getattr(self.llm, "_static_weights", None)
        if mode == "static" and w is not None:
            rows = w if (w != w[:1]).any() else w[:1]
            mode += " " + ";".join(",".join(f"{x:g}" for x in row) for row in rows)
        return f"[mode: {mode}]"

    def handle(self, line: str, out: TextIO) -> bool:
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            return self.command(line, out)
        self.history.append({"role": "user", "content": line})
        answer = self.answer(out)
        self.history.append({"role": "assistant", "content": answer})
        return True

    def command(self, line: str, out: TextIO) -> bool:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/reset":
            self.history.clear()
            self.llm.reset()
            out.write("[history cleared]\n")
        elif name == "/mode":
            if not arg:
                out.write(f"{self.status()} adapters: {', '.join(self.llm.adapter_names)}; "
                          f"modes: {', '.join(MODE_NAMES)}\n")
            else:
                mode, _, weights = arg.partition(" ")
                try:
                    self.llm.set_mode(mode, parse_weights(weights.strip() or None))
                except LoraFlowError as e:  # a typo must not end the conversation
                    out.write(f"[error: {e}]\n")
                else:
                    out.write(self.status() + "\n")
        elif name == "/help":
            out.write(CHAT_HELP + "\n")
        else:
            out.write(f"[unknown command {name}] {CHAT_HELP}\n")
        out.flush()
        return True

    def messages(self) -> List[Dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def fit_history(self, out: TextIO) -> None:
        """Drop the oldest user + assistant pairs until the conversation and an answer of up to
        max_tokens (at most half the context) fit in the context."""
        if not has_chat_template(self.llm):
            return
        n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        room = min(self.sampling.max_tokens or n_ctx // 2, n_ctx // 2)
        dropped = 0
        while len(self.history) >= 3 and len(chat_prompt_tokens(self.llm, self.messages())) + room > n_ctx:
            del self.history[:2]
            dropped += 1
        if dropped:
            out.write(f"[context full: dropped the oldest {dropped} turn{'s' if dropped > 1 else ''}]\n")

    def answer(self, out: TextIO) -> str:
        """Stream the assistant's answer to the history; drop the oldest turns when the
        conversation no longer fits in the context."""
        self.fit_history(out)
        while True:
            try:
                chunks = self.llm.create_chat_completion(self.messages(), stream=True, **self.sampling.kwargs())
                pieces = []
                for c in chunks:
                    piece = c["choices"][0]["delta"].get("content") or ""
                    if piece:
                        out.write(piece)
                        out.flush()
                        pieces.append(piece)
                out.write("\n\n")
                out.flush()
                return "".join(pieces)
            except ValueError as e:
                if "context window" not in str(e) or len(self.history) < 3:
                    out.write(f"[error: {e}]\n\n")
                    return ""
                del self.history[:2]  # the oldest user + assistant pair
                out.write("[context full: dropped the oldest turn]\n")


def run_chat(session: ChatSession, inp: TextIO = None, out: TextIO = None, banner: str = "") -> None:
    """Read lines from `inp` until /quit or end of input; prompts only on a terminal."""
    inp, out = inp or sys.stdin, out or sys.stdout
    interactive = inp.isatty()
    if banner:
        out.write(banner + "\n")
    out.write(f"{CHAT_HELP}\n{session.status()}\n\n")
    out.flush()
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        if not session.handle(line, out):
            break
