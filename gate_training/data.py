"""Training and evaluation data: jsonl rows -> token ids and labels.

One example per line, either

    {"prompt": "...", "response": "..."}                    (optional "system": "...", "answer": "...")
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}

The last assistant message of a `messages` row is the response; everything before it is the
prompt. When the tokenizer has a chat template the prompt is rendered with it (generation
prompt included) and the response is what the template puts after that, up to and including
its end-of-turn token; without a template the prompt is tokenized as is and the response is
followed by the EOS token (unless add_eos=False). Labels are -100 everywhere except on the
response tokens, so the loss covers the response only. Prompt and response are tokenized
separately, as they are when the model generates after the prompt.

Every problem with a file is a LoraFlowError naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from loraflow.errors import LoraFlowError

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(LoraFlowError):
    """A data file that cannot be used (the message names the file and line)."""


@dataclass
class Row:
    line: int
    messages: list[dict]          # the prompt as chat messages (system/user/assistant turns)
    response: str                 # the target text
    answer: str | None = None     # the reference answer for evaluation, when given apart from the response

    @property
    def prompt_text(self) -> str:
        """The prompt without a template: the user turns' text (one for prompt/response rows)."""
        return "\n".join(m["content"] for m in self.messages if m["role"] != "system")


@dataclass
class Example:
    line: int
    input_ids: list[int]          # prompt + response
    labels: list[int]             # IGNORE on the prompt, the token ids on the response
    n_prompt: int                 # input_ids[:n_prompt] is the prompt (what generation starts from)
    row: Row

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.n_prompt]

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_rows(path) -> list[Row]:
    """Parse a jsonl file into rows; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(_parse_row(obj, path, line_no))
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


def _parse_row(obj, path, line_no) -> Row:
    where = f"{path}:{line_no}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: \"answer\" must be a string or a number")
    answer = None if answer is None else str(answer)
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise DataError(f"{where}: messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                                f"\"content\": a string}}")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (the response to learn), "
                            f"got role {msgs[-1]['role']!r}")
        if len(msgs) < 2:
            raise DataError(f"{where}: \"messages\" needs a prompt before the assistant's response")
        prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
        return Row(line_no, prompt, msgs[-1]["content"], answer)
    missing = [k for k in ("prompt", "response") if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field {' and '.join(repr(k) for k in missing)} "
                        "(rows are {\"prompt\", \"response\"} or {\"messages\": [...]})")
    for key in ("prompt", "response", "system"):
        if key in obj and not isinstance(obj[key], str):
            raise DataError(f"{where}: \"{key}\" must be a string, got {type(obj[key]).__name__}")
    msgs = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    msgs.append({"role": "user", "content": obj["prompt"]})
    return Row(line_no, msgs, obj["response"], answer)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, row: Row, where: str = "") -> list[int]:
    """The prompt's token ids, as generation starts from them."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if any(m["role"] != "user" for m in row.messages):
        raise DataError(f"{where}: system messages and earlier turns need a chat template, "
                        "and this tokenizer has none; use {\"prompt\", \"response\"} rows")
    return tokenizer(row.prompt_text)["input_ids"]


def encode_row(tokenizer, row: Row, where: str, max_length: int, truncate: bool = False,
               add_eos: bool = True) -> Example:
    if not row.response or not tokenizer(row.response, add_special_tokens=False)["input_ids"]:
        raise DataError(f"{where}: the response {row.response!r} tokenizes to nothing")
    prompt_ids = encode_prompt(tokenizer, row, where)
    if not prompt_ids:
        raise DataError(f"{where}: the prompt tokenizes to nothing (generation needs at least one token to start from)")
    if has_chat_template(tokenizer):
        prompt_text = tokenizer.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row.messages + [{"role": "assistant", "content": row.response}],
                                             tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(f"{where}: the chat template renders the conversation differently once the "
                            "response is added, so the prompt is not a prefix of it; use a template that "
                            "appends the assistant turn")
        # the assistant turn as the template writes it, up to its end-of-turn token (what generation emits)
        response_text = full[len(prompt_text):].rstrip()
        response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    else:
        response_ids = tokenizer(row.response, add_special_tokens=False)["input_ids"]
        if add_eos:
            if tokenizer.eos_token_id is None:
                raise DataError("the tokenizer has no EOS token to end responses with; pass --no-eos")
            response_ids = response_ids + [tokenizer.eos_token_id]
    n = len(prompt_ids) + len(response_ids)
    if n > max_length:
        if not truncate:
            raise DataError(f"{where}: {n} tokens ({len(prompt_ids)} prompt + {len(response_ids)} response), "
                            f"more than the maximum length {max_length}; raise --max-length or pass --truncate")
        if len(prompt_ids) >= max_length:
            raise DataError(f"{where}: the prompt alone has {len(prompt_ids)} tokens, so no response token "
                            f"fits in the maximum length {max_length}; raise --max-length")
        response_ids = response_ids[: max_length - len(prompt_ids)]
    input_ids = list(prompt_ids) + list(response_ids)
    labels = [IGNORE] * len(prompt_ids) + list(response_ids)
    return Example(row.line, input_ids, labels, len(prompt_ids), row)


def load_examples(path, tokenizer, max_length: int, truncate: bool = False, add_eos: bool = True) -> list[Example]:
    """Read and tokenize a jsonl file; a bad row raises DataError with its line number."""
    return [encode_row(tokenizer, row, f"{path}:{row.line}", max_length, truncate, add_eos)
            for row in read_rows(path)]


def collate(examples: list[Example], pad_id: int):
    """Right-padded batch: input_ids, attention_mask, labels ([batch, longest] torch tensors)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
