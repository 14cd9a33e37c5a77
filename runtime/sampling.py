"""How the next token is chosen: one set of knobs for every way loraflow generates (the
commands, the server, the batch engine), with llama-cpp-python's defaults and names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8           # 0: greedy
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None         # None: a random one
    ignore_eos: bool = False           # never sample an end-of-generation token (fixed lengths)

    def completion_kwargs(self, llm) -> dict:
        """The keyword arguments of llama-cpp-python's create_completion / create_chat_completion
        (`llm`: the FlowLlama whose end-of-generation tokens ignore_eos masks)."""
        kw = asdict(self)
        if kw.pop("ignore_eos"):
            kw["logit_bias"] = {t: float("-inf") for t in llm.eog_tokens}
        return kw

    def sampler(self, llm):
        """A llama.cpp sampler chain doing the same as llama-cpp-python's completion code."""
        import llama_cpp

        from loraflow.runtime.llama_api import Sampler

        sampler = Sampler()
        if self.ignore_eos:
            sampler.logit_bias(llm.n_vocab(), {t: float("-inf") for t in llm.eog_tokens})
        if self.repeat_penalty != 1.0 or self.frequency_penalty or self.presence_penalty:
            sampler.penalties(llm.n_vocab(), 64, self.repeat_penalty, self.frequency_penalty, self.presence_penalty)
        if self.temperature <= 0:
            return sampler.greedy()
        if self.top_k > 0:
            sampler.top_k(self.top_k)
        if self.top_p < 1.0:
            sampler.top_p(self.top_p)
        if self.min_p > 0:
            sampler.min_p(self.min_p)
        sampler.temp(self.temperature)
        return sampler.dist(self.seed if self.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
