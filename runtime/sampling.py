"""How the next token is chosen: one set of knobs for every way loraflow generates (the
commands, the server, the batch engine), with llama-cpp-python's defaults and names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional


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
    logit_bias: Optional[Dict[int, float]] = None   # token id -> added to its logit (OpenAI's logit_bias)
    grammar: Optional[str] = None      # GBNF (root rule "root"): only text it accepts is sampled

    def bias(self, llm) -> Dict[int, float]:
        """logit_bias, with -inf on the end-of-generation tokens for ignore_eos."""
        bias = dict(self.logit_bias or {})
        if self.ignore_eos:
            bias.update({t: float("-inf") for t in llm.eog_tokens})
        return bias

    def completion_kwargs(self, llm) -> dict:
        """The keyword arguments of llama-cpp-python's create_completion / create_chat_completion
        (`llm`: the FlowLlama whose end-of-generation tokens ignore_eos masks)."""
        kw = asdict(self)
        kw.pop("ignore_eos")
        kw.pop("logit_bias")
        bias = self.bias(llm)
        if bias:
            kw["logit_bias"] = bias
        grammar = kw.pop("grammar")
        if grammar is not None:
            from llama_cpp.llama_grammar import LlamaGrammar

            kw["grammar"] = LlamaGrammar.from_string(grammar, verbose=False)
        return kw

    def sampler(self, llm):
        """A llama.cpp sampler chain doing the same as llama-cpp-python's completion code
        (Llama._init_sampler): the logit bias, the penalties, the grammar, then greedy or
        top-k, top-p, min-p, temperature and a seeded draw."""
        import llama_cpp

        from loraflow.runtime.llama_api import Sampler

        sampler = Sampler()
        try:
            bias = self.bias(llm)
            if bias:
                sampler.logit_bias(llm.n_vocab(), bias)
            if self.repeat_penalty != 1.0 or self.frequency_penalty or self.presence_penalty:
                sampler.penalties(llm.n_vocab(), 64, self.repeat_penalty, self.frequency_penalty,
                                  self.presence_penalty)
            if self.grammar is not None:
                sampler.grammar(llm.model, self.grammar)
        except BaseException:
            sampler.close()
            raise
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
