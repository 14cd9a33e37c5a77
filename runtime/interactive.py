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
from loraflow.runtime.prompts import chat_prompt_tokens, has_chat_template, messages_for
from loraflow.runtime.sampling import Sampling


def stream_generate(llm, prompt: str, sampling: Sampling, max_tokens: Optional[int] = 256,
                    chat: Optional[bool] = None, system: Optional[str] = None, out: TextIO = None) -> str:
    """Write the completion of `prompt` to `out` piece by piece as tokens arrive; return it.

    chat=None uses the model's chat template when it has one, else the raw prompt."""
    out = out or sys.stdout
    if chat is None:
        chat = has_chat_template(llm)
    kwargs = dict(max_tokens=max_tokens, stream=True, **sampling.completion_kwargs(llm))
    if chat:
        chunks = llm.create_chat_completion(messages_for(prompt, system), **kwargs)
        pieces = (c["choices"][0]["delta"].get("content") or "" for c in chunks)
    else:
        if system:
            raise LoraFlowError("--system needs the chat template (drop --raw)")
        chunks = llm.create_completion(prompt, **kwargs)
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
    max_tokens: Optional[int] = 256
    system: Optional[str] = None
    history: List[Dict[str, str]] = field(default_factory=list)

    def status(self) -> str:
        return f"[mode: {self.llm.mode.describe()}]"

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
                    self.llm.set_mode(self.llm.resolve_mode(mode, weights.strip() or None))
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
        room = min(self.max_tokens or n_ctx // 2, n_ctx // 2)
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
                chunks = self.llm.create_chat_completion(self.messages(), max_tokens=self.max_tokens, stream=True,
                                                         **self.sampling.completion_kwargs(self.llm))
                pieces = []
                try:
                    for c in chunks:
                        piece = c["choices"][0]["delta"].get("content") or ""
                        if piece:
                            out.write(piece)
                            out.flush()
                            pieces.append(piece)
                except KeyboardInterrupt:  # Ctrl-C stops the answer, not the conversation
                    chunks.close()
                    out.write(" [stopped]")
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
