"""Training over a GGUF base's quantized weights, never dequantized whole.

The frozen base's linear weights stay in torch memory as the GGUF's raw blocks (uint8, one row
of blocks per output row: [n_out, row_bytes]). QuantLinear dequantizes them in torch just before
its matmul and drops them again; its backward dequantizes once more to compute the input's
gradient (the gates need it, the frozen weight needs none). The token embedding stays quantized
too: a lookup dequantizes only the rows it gathers. Norms, biases and other small tensors are
dequantized at load, as transformers does.

    dequantize(data, qtype, n_cols)     torch: raw blocks [..., row_bytes] -> float32 [..., n_cols]
    QuantLinear, QuantEmbedding         the frozen modules over raw blocks
    load_quantized_model(gguf, dtype)   the transformers causal LM of a GGUF file, its linear
                                        weights QuantLinear, the same numbers transformers loads

The dequantizers follow ggml's block layouts (gguf-py's numpy `gguf.quants` is their reference,
tests/test_quantized_training.py compares them bit for bit). The model is built from its config
on the meta device; the GGUF-to-transformers tensor names, and the rows transformers reorders
(llama's q/k permutation, Bloom's fused qkv), come from transformers' own GGUF loader, so both
paths give the same model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from torch import nn

from loraflow.errors import FormatError, LoraFlowError

QK_K = 256


# -- the dequantizers: blocks uint8 [n, type_size] -> float32 [n, block_size] -----------------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 (a little-endian float16 per row)."""
    return b.contiguous().view(torch.float16).float()


# (shifts by a scalar, stacked, are several times faster than one shift by a broadcast tensor; the
# float arithmetic runs in place on the fresh tensors, the same operations as numpy's)

def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """Low then high 4 bits of each run of `width` bytes: [n, m*width] -> [n, m, 2, width]."""
    r = qs.reshape(qs.shape[0], -1, width)
    return torch.stack([r & 0x0F, r >> 4], dim=2)


def _bits(b: torch.Tensor, shifts: tuple, width: int, mask: int) -> torch.Tensor:
    """Fields of each run of `width` bytes at `shifts`: [n, m*width] -> [n, m, len(shifts), width]."""
    r = b.reshape(b.shape[0], -1, width)
    return torch.stack([(r >> s) & mask if s else r & mask for s in shifts], dim=2)


def _q4_0(b):
    n = b.shape[0]
    d, qs = _f16(b[:, :2]), b[:, 2:]
    return _nibbles(qs, 16).reshape(n, 32).float().sub_(8).mul_(d)


def _q4_1(b):
    n = b.shape[0]
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:]
    return _nibbles(qs, 16).reshape(n, 32).float().mul_(d).add_(m)


def _q5_high(qh):
    """The 32 fifth bits of a Q5_0/Q5_1 block: 4 bytes, little-endian -> [n, 32]."""
    n = qh.shape[0]
    return _bits(qh, tuple(range(8)), 1, 1).reshape(n, 4, 8).reshape(n, 32)


def _q5_0(b):
    n = b.shape[0]
    d, qh, qs = _f16(b[:, :2]), b[:, 2:6], b[:, 6:]
    return (_nibbles(qs, 16).reshape(n, 32) | (_q5_high(qh) << 4)).float().sub_(16).mul_(d)


def _q5_1(b):
    n = b.shape[0]
    d, m, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:8], b[:, 8:]
    return (_nibbles(qs, 16).reshape(n, 32) | (_q5_high(qh) << 4)).float().mul_(d).add_(m)


def _q8_0(b):
    d, x = _f16(b[:, :2]), b[:, 2:].contiguous().view(torch.int8).float()
    return x.mul_(d)


def _q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, (0, 2, 4, 6), 32, 3).reshape(n, 16, 16).float()
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    lo = _bits(scales[:, :8], (0, 4), 8, 0x0F).reshape(n, 16)
    hi = _bits(scales[:, 8:], (0, 2, 4, 6), 4, 0x03).reshape(n, 16)
    sc = (lo | (hi << 4)).float() - 32
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs, (0, 2, 4, 6), 32, 3).reshape(n, 16, 16)
    qh = _bits(hmask, tuple(range(8)), 32, 1).reshape(n, 16, 16) ^ 1   # a set bit means no offset
    q = ql.float().sub_((qh << 2).float())
    return q.mul_(dl).reshape(n, QK_K)


def _k_scale_min(scales):
    """Q4_K/Q5_K's 8 six-bit scales and mins packed in 12 bytes -> ([n, 8], [n, 8]) uint8."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b):
    n = b.shape[0]
    d, dmin, scales, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:]
    sc, mn = _k_scale_min(scales)
    d = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    q = _nibbles(qs, 32).reshape(n, 8, 32).float()
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin, scales, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:48], b[:, 48:]
    sc, mn = _k_scale_min(scales)
    d = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    ql = _nibbles(qs, 32).reshape(n, 8, 32)
    high = _bits(qh, tuple(range(8)), 32, 1).reshape(n, 8, 32)
    q = (ql | (high << 4)).float()
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)
    high = _bits(qh, (0, 2, 4, 6), 32, 3).reshape(n, 8, 32)
    q = (low | (high << 4)).float().sub_(32).reshape(n, 16, 16)
    return q.mul_(d).reshape(n, QK_K)


_BLOCKS = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0,
           Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
_FLOATS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
SUPPORTED = tuple(_FLOATS) + tuple(_BLOCKS)


def check_type(qtype, tensor: str, source="") -> Q:
    """`qtype` as a GGMLQuantizationType if quantized training supports it, else a FormatError
    naming it and the tensor."""
    qtype = Q(int(qtype))
    if qtype not in SUPPORTED:
        raise FormatError(f"{source}{': ' if source else ''}tensor {tensor} is {qtype.name}, which training over "
                          f"quantized weights does not support (it does {', '.join(t.name for t in SUPPORTED)}); "
                          "train-gate --dequantize loads it through transformers instead")
    return qtype


def row_bytes(qtype, n_cols: int) -> int:
    block, size = GGML_QUANT_SIZES[Q(int(qtype))]
    if n_cols % block:
        raise FormatError(f"a row of {n_cols} values is not whole {Q(int(qtype)).name} blocks of {block}")
    return n_cols // block * size


def dequantize(data: torch.Tensor, qtype, n_cols: int) -> torch.Tensor:
    """Raw GGUF rows, uint8 [..., row_bytes], of `qtype` -> float32 [..., n_cols], on data's device."""
    qtype = Q(int(qtype))
    lead = data.shape[:-1]
    if qtype in _FLOATS:
        return data.contiguous().view(_FLOATS[qtype]).float().reshape(*lead, n_cols)
    if qtype not in _BLOCKS:
        check_type(qtype, "?")
    _, size = GGML_QUANT_SIZES[qtype]
    return _BLOCKS[qtype](data.reshape(-1, size)).reshape(*lead, n_cols)


# -- the modules -------------------------------------------------------------------------------------

# the most weight values dequantized at once: a larger matrix is dequantized and multiplied in
# slices of output rows, so no weight of any size is ever whole in float (the matmul of a slice
# gives the same numbers as the whole one's columns)
CHUNK = 1 << 20


class _QuantMatmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized from the module's blocks in the forward, and again in the
    backward for dx = dy W; the frozen W and b get no gradient."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return module.apply_weight(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.module.input_grad(grad), None


class QuantLinear(nn.Module):
    """A frozen linear layer over raw GGUF blocks: `qweight` uint8 [out_features, row_bytes]."""

    def __init__(self, qweight: torch.Tensor, qtype, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, dtype=torch.float32):
        super().__init__()
        self.qtype = Q(int(qtype))
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        if tuple(qweight.shape) != (out_features, row_bytes(self.qtype, in_features)):
            raise FormatError(f"QuantLinear: blocks of shape {list(qweight.shape)} do not hold a "
                              f"[{out_features}, {in_features}] {self.qtype.name} matrix")
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(dtype), persistent=False)
        self.rows = max(1, CHUNK // in_features)        # output rows dequantized at once

    def weight_rows(self, start: int, stop: int) -> torch.Tensor:
        """W[start:stop] in the compute dtype."""
        return dequantize(self.qweight[start:stop], self.qtype, self.in_features).to(self.dtype)

    def apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for s in range(0, self.out_features, self.rows):
            e = min(s + self.rows, self.out_features)
            parts.append(F.linear(x, self.weight_rows(s, e), None if self.bias is None else self.bias[s:e]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        out = None
        for s in range(0, self.out_features, self.rows):
            e = min(s + self.rows, self.out_features)
            g = grad[..., s:e].matmul(self.weight_rows(s, e))
            out = g if out is None else out.add_(g)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantMatmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype.name}"


class QuantEmbedding(nn.Module):
    """A frozen token embedding over raw GGUF blocks: a lookup dequantizes only the rows it takes
    (times `scale`, Gemma's sqrt(n_embd), where the model's embedding has one)."""

    def __init__(self, qweight: torch.Tensor, qtype, num_embeddings: int, embedding_dim: int,
                 scale: torch.Tensor | None = None, dtype=torch.float32):
        super().__init__()
        self.qtype = Q(int(qtype))
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype = dtype
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scale", None if scale is None else scale.detach().clone(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize(self.qweight[ids.reshape(-1)], self.qtype, self.embedding_dim).to(self.dtype)
        rows = rows.reshape(*ids.shape, self.embedding_dim)
        return rows if self.scale is None else rows * self.scale.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype.name}"


# -- loading ------------------------------------------------------------------------------------------

def _read_rows(f, tensor, n_rows: int) -> torch.Tensor:
    """A GGUFReader tensor's bytes, read from the open file `f` into torch memory: uint8
    [n_rows, row_bytes]. Read, not copied out of the reader's memory map, whose pages would count
    in the process's resident memory too."""
    out = torch.empty(int(tensor.n_bytes), dtype=torch.uint8)
    f.seek(int(tensor.data_offset))
    if f.readinto(memoryview(out.numpy())) != out.numel():
        raise FormatError(f"{f.name}: tensor {tensor.name} is cut short")
    return out.view(n_rows, -1)


def _row_order(processor, tensor, n_rows: int, n_cols: int, names, parsed) -> np.ndarray | None:
    """The rows of `tensor` in the order transformers' loader puts them (None: as stored), found by
    passing row numbers through the loader's own tensor processor; a FormatError if it does more to
    the tensor than reorder its rows."""
    probe = np.broadcast_to(np.arange(n_rows, dtype=np.float32)[:, None], (n_rows, n_cols))
    out = processor.process(weights=probe, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed)
    if out.weights is probe:
        return None
    w = np.asarray(out.weights)
    order = w[:, 0].astype(np.int64) if w.shape == (n_rows, n_cols) else None
    if order is None or not (w == w[:, :1]).all() or not np.array_equal(np.sort(order), np.arange(n_rows)):
        raise FormatError(f"tensor {tensor.name}: transformers' GGUF loader changes it beyond reordering its rows, "
                          "which training over quantized blocks cannot follow (use --dequantize)")
    return None if np.array_equal(order, np.arange(n_rows)) else order


def _set_param(model: nn.Module, name: str, value: torch.Tensor, source) -> None:
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    old = getattr(module, attr)
    if tuple(old.shape) != tuple(value.shape):
        raise FormatError(f"{source}: {name} is {list(value.shape)} in the file, the model wants {list(old.shape)}")
    value = value.to(old.dtype)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
    else:
        module._buffers[attr] = value


def load_quantized_model(gguf, dtype=torch.float32):
    """The transformers causal LM of the GGUF file `gguf` on the CPU, frozen, in eval mode, holding
    its linear weights and token embedding as GGUF blocks (QuantLinear, QuantEmbedding) and its
    other tensors as transformers' loader dequantizes them. Every tensor type must be one of
    SUPPORTED (a FormatError names the first that is not)."""
    from gguf import GGUFReader
    from gguf import dequantize as np_dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                          load_gguf_checkpoint, read_field)

    path = Path(gguf)
    reader = GGUFReader(str(path))
    for t in reader.tensors:                          # refuse before any work
        check_type(t.tensor_type, t.name, path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except (OSError, ValueError) as e:
        raise LoraFlowError(f"{path}: cannot load the model ({e})") from None
    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # the buffers a model computes (rotary frequencies, Gemma's embedding scale): made real, then
    # filled by the model's own initialisation, which leaves the (meta) weights alone
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[key] = torch.empty_like(buf, device="cpu")
    model.initialize_weights()
    names = get_gguf_hf_weights_map(model, processor)

    modules = dict(model.named_modules())
    quant, dense = {}, {}          # module path -> (blocks, qtype, n_rows, n_cols); param name -> tensor
    f = open(path, "rb")
    for t in reader.tensors:
        hf = names.get(t.name)
        path_, _, attr = (hf or "").rpartition(".")
        module = modules.get(path_)
        if attr == "weight" and len(t.shape) == 2 and type(module) in (nn.Linear, nn.Embedding) or \
                (attr == "weight" and isinstance(module, nn.Embedding) and hasattr(module, "embed_scale")):
            n_cols, n_rows = int(t.shape[0]), int(t.shape[1])
            order = _row_order(processor, t, n_rows, n_cols, names, parsed)
            blocks = _read_rows(f, t, n_rows)
            quant[path_] = (blocks if order is None else blocks[torch.from_numpy(order)],
                            Q(int(t.tensor_type)), n_rows, n_cols)
            continue
        out = processor.process(weights=np_dequantize(t.data, t.tensor_type), name=t.name,
                                tensor_key_mapping=names, parsed_parameters=parsed)
        if out.name in names:
            dense[names[out.name]] = torch.from_numpy(np.copy(out.weights))
    f.close()
    del reader                     # its memory map

    embed_in, embed_out = model.get_input_embeddings(), model.get_output_embeddings()
    path_of = {id(m): p for p, m in modules.items()}
    out_path = path_of.get(id(embed_out))
    if out_path is not None and out_path not in quant and f"{out_path}.weight" not in dense \
            and config.get_text_config().tie_word_embeddings:
        in_path = path_of[id(embed_in)]
        if in_path in quant:
            quant[out_path] = quant[in_path]          # tied: the very same blocks
        elif f"{in_path}.weight" in dense:
            dense[f"{out_path}.weight"] = dense[f"{in_path}.weight"]
    for path_, (blocks, qtype, n_rows, n_cols) in quant.items():
        old = modules[path_]
        if isinstance(old, nn.Embedding):
            if (n_rows, n_cols) != (old.num_embeddings, old.embedding_dim):
                raise FormatError(f"{path}: {path_} is [{n_rows}, {n_cols}] in the file, the model wants "
                                  f"[{old.num_embeddings}, {old.embedding_dim}]")
            new = QuantEmbedding(blocks, qtype, n_rows, n_cols, getattr(old, "embed_scale", None), dtype)
        else:
            if (n_rows, n_cols) != (old.out_features, old.in_features):
                raise FormatError(f"{path}: {path_} is [{n_rows}, {n_cols}] in the file, the model wants "
                                  f"[{old.out_features}, {old.in_features}]")
            new = QuantLinear(blocks, qtype, n_cols, n_rows, dense.pop(f"{path_}.bias", None), dtype)
        parent, _, attr = path_.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    for name, value in dense.items():
        _set_param(model, name, value, path)
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise FormatError(f"{path}: no tensor for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
