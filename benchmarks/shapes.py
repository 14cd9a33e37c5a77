"""Base models of the shapes people run, with random weights, written straight to GGUF.

    python -m benchmarks.shapes [NAME ...]       # writes them into the cache, prints the paths

Speed does not depend on the weights' values, so the benchmarks measure real sizes without a
download: each shape's hidden size, layers, heads, KV heads, head size, FFN size, vocabulary and
tied output are those of the published model's config.json, and the tensors get the types
llama.cpp's quantizer gives them for Q4_K_M (llama-quant.cpp: Q6_K for the output matrix and
for attn_v and ffn_down in the layers its use_more_bits picks, Q4_K for the other matrices,
F32 norms). The quantized blocks hold random bytes whose block scales are set to one small
value, so every weight is finite and of the size of a trained model's (RMS about 0.02); the
vocabulary is a plain SentencePiece one of placeholder pieces (the benchmarks feed token ids).
Nothing is held in memory but one tensor at a time; files are written once into the cache.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Q = None  # gguf.GGMLQuantizationType, imported lazily


@dataclass(frozen=True)
class Shape:
    arch: str                      # llama.cpp's architecture name
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    tied: bool                     # the output matrix is the token embedding
    rope_base: float
    rms_eps: float


SHAPES = {
    # meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B, Qwen/Qwen3-4B: config.json
    "llama-3.2-1b": Shape("llama", 2048, 16, 32, 8, 64, 8192, 128256, True, 500000.0, 1e-5),
    "llama-3.1-8b": Shape("llama", 4096, 32, 32, 8, 128, 14336, 128256, False, 500000.0, 1e-5),
    "qwen3-4b": Shape("qwen3", 2560, 36, 32, 8, 128, 9728, 151936, True, 1000000.0, 1e-6),
    # not a real model: the smallest llama whose matrices are whole K-quant blocks (tests of the kernels)
    "tiny-k-quants": Shape("llama", 256, 2, 4, 2, 64, 512, 1024, True, 10000.0, 1e-5),
}
FILE_TYPE_Q4_K_M = 15  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_K_M


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's choice of the layers whose attn_v and ffn_down get Q6_K in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensors(shape: Shape):
    """(name, ggml shape [n_in, n_out] or [n], ggml type) of every tensor, in file order."""
    e, hd = shape.n_embd, shape.head_dim
    yield "token_embd.weight", (e, shape.n_vocab), Q.Q6_K if shape.tied else Q.Q4_K
    for i in range(shape.n_layer):
        more = Q.Q6_K if use_more_bits(i, shape.n_layer) else Q.Q4_K
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (e,), Q.F32
        yield p + "attn_q.weight", (e, shape.n_head * hd), Q.Q4_K
        yield p + "attn_k.weight", (e, shape.n_head_kv * hd), Q.Q4_K
        yield p + "attn_v.weight", (e, shape.n_head_kv * hd), more
        yield p + "attn_output.weight", (shape.n_head * hd, e), Q.Q4_K
        if shape.arch == "qwen3":
            yield p + "attn_q_norm.weight", (hd,), Q.F32
            yield p + "attn_k_norm.weight", (hd,), Q.F32
        yield p + "ffn_norm.weight", (e,), Q.F32
        yield p + "ffn_gate.weight", (e, shape.n_ff), Q.Q4_K
        yield p + "ffn_up.weight", (e, shape.n_ff), Q.Q4_K
        yield p + "ffn_down.weight", (shape.n_ff, e), more
    yield "output_norm.weight", (e,), Q.F32
    if not shape.tied:
        yield "output.weight", (e, shape.n_vocab), Q.Q6_K


def random_blocks(ggml_shape, qtype, rng) -> np.ndarray:
    """Random quantized blocks of a matrix (uint8 bytes, numpy shape [n_out, row bytes]) whose
    weights are finite with an RMS of about 0.02: random quants, fixed small block scales."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_in, n_out = ggml_shape
    data = rng.integers(0, 256, (n_out, n_in // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:      # d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 of 4-bit quants
        # w = d sc q - dmin m, q in 0..15: dmin = 7.5 d centres the weights about 0
        data[..., 0:4] = np.frombuffer(np.array([1e-4, 7.5e-4], dtype=np.float16).tobytes(), dtype=np.uint8)
    elif qtype == Q.Q6_K:    # 128 + 64 bytes of 6-bit quants, 16 int8 scales, d (f16)
        data[..., 208:210] = np.frombuffer(np.array([1.5e-5], dtype=np.float16).tobytes(), dtype=np.uint8)
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    return data.reshape(n_out, -1)


def data_bytes(ggml_shape, qtype) -> int:
    """Bytes of one tensor's data in the file."""
    import gguf

    if qtype == Q.F32:
        return int(np.prod(ggml_shape)) * 4
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return ggml_shape[1] * ggml_shape[0] // block * size


def write_header(name: str, path: Path, label: str = "loraflow benchmarks"):
    """Write the metadata and tensor infos of shape `name` to `path`; returns the open writer (its
    tensor data still to write, in the order of the plan) and the plan: tensors(shape)."""
    global Q
    import gguf

    Q = gguf.GGMLQuantizationType
    shape = SHAPES[name]
    w = gguf.GGUFWriter(str(path), shape.arch)
    w.add_name(f"random {name} ({label})")
    w.add_file_type(FILE_TYPE_Q4_K_M)
    w.add_context_length(8192)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_base)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_vocab_size(shape.n_vocab)
    # SentencePiece: <unk> <s> </s>, the 256 byte pieces, then placeholders
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581t{i}" for i in range(shape.n_vocab - len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * (shape.n_vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([-float(i) for i in range(shape.n_vocab)])
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    plan = list(tensors(shape))
    for tname, gshape, qtype in plan:
        nbytes = data_bytes(gshape, qtype)
        if qtype == Q.F32:
            w.add_tensor_info(tname, gshape[::-1], np.dtype(np.float32), nbytes)
        else:
            w.add_tensor_info(tname, (gshape[1], nbytes // gshape[1]), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w, plan


def write_shape(name: str, out: Path) -> Path:
    """The GGUF of shape `name` at `out` (written to a temporary name, then moved)."""
    from tqdm import tqdm

    tmp = out.with_name(out.name + ".partial")
    w, plan = write_header(name, tmp)
    rng = np.random.default_rng(0)
    for tname, gshape, qtype in tqdm(plan, desc=f"writing {name}", unit="tensor", file=sys.stderr):
        if qtype == Q.F32:
            w.write_tensor_data(np.ones(gshape, dtype=np.float32))
        else:
            w.write_tensor_data(random_blocks(gshape, qtype, rng))
    w.close()
    tmp.replace(out)
    return out


def shape_path(name: str) -> Path:
    """The cached GGUF of shape `name`, written on first use (seconds to minutes)."""
    from loraflow.models import cache_dir

    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    out = cache_dir("bench", "shapes") / f"{name}-random-Q4_K_M.gguf"
    return out if out.exists() else write_shape(name, out)


def main(argv: list[str]) -> int:
    for name in argv or list(SHAPES):
        path = shape_path(name)
        print(f"{name}: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
