"""Prompts from messages: the model's own chat template, through llama-cpp-python's Jinja2
formatter, as its create_chat_completion applies it (so every path builds the same tokens)."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

from loraflow.errors import LoraFlowError


class ChatPrompt(NamedTuple):
    tokens: List[int]
    stop: List[str]            # the template's own stop strings (its end-of-turn text)


def has_chat_template(llm) -> bool:
    return bool(llm.metadata.get("tokenizer.chat_template"))


def messages_for(prompt: str, system: Optional[str] = None) -> List[Dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def chat_prompt(llm, messages) -> ChatPrompt:
    """The tokens (generation prompt included) and stop strings of `messages` in `llm`'s chat
    template; LoraFlowError when it has none or the messages do not fit it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise LoraFlowError("the model has no chat template; use the raw prompt")
    eos, bos = llm.token_eos(), llm.token_bos()
    formatter = Jinja2ChatFormatter(template, eos_token=llm.token_text(eos) if eos != -1 else "",
                                    bos_token=llm.token_text(bos) if bos != -1 else "")
    try:
        formatted = formatter(messages=messages)
    except Exception as e:  # noqa: BLE001 - jinja2's errors, or the template's raise_exception
        raise LoraFlowError(f"the messages do not fit the model's chat template: {e}") from None
    stop = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop] if formatted.stop else []
    tokens = llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)
    return ChatPrompt(tokens, [s for s in stop if s])


def chat_prompt_tokens(llm, messages) -> List[int]:
    return chat_prompt(llm, messages).tokens
