"""Q8_0 flow files in the runtime: the LoRA tensors stay Q8_0 inside it (A always; B as
stored when the adapters' ranks are equal, so its columns need no moving, else widened to
F16), and the logits match the PyTorch model computing what llama.cpp's arithmetic does with
them, in one batch and token by token: the same Q8_0 weights, and the activations a matmul
with a Q8_0 matrix quantizes to Q8_0 too (ggml's vec_dot_type; to F16 for an F16 matrix). On
the tiny llama model, two LoRAs on every linear module with R = 32."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from parity_setup import RUNTIME, TOL, arch_loras, build_flow, rel_err, runtime_token_by_token, torch_logits  # noqa: E402

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def q8_0_round_trip(t: torch.Tensor) -> torch.Tensor:
    """The values Q8_0 keeps of a tensor quantized along its last axis (blocks of 32): the
    converter's LoRA tensors, and ggml's activations before a dot with a Q8_0 row."""
    x = t.detach().numpy().astype(np.float32)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, Q8_0), Q8_0).reshape(x.shape))


def llama_cpp_arithmetic(b_stays_q8_0: bool):
    """FlowLinear.forward as llama.cpp computes it with Q8_0 LoRA tensors (see the module doc)."""
    import torch.nn.functional as F

    def forward(self, h):
        y = self.base(h)
        w = self.fusion.w
        if w is None:
            return y
        z = F.linear(q8_0_round_trip(h), self.a_cat) * w[..., self.slot]
        return y + F.linear(q8_0_round_trip(z) if b_stays_q8_0 else z.half().float(), self.b_cat)

    return forward


@pytest.mark.parametrize("ranks", [(16, 16), (24, 8)], ids=["equal-ranks", "unequal-ranks"])
def test_q8_0_flow_file(tiny_models, tmp_path, monkeypatch, ranks):
    from loraflow.gate_training.model import FlowLinear
    from loraflow.gguf_read import read_header
    from loraflow.runtime import _bindings as B

    tm = tiny_models.get("llama")
    spec = {name: (r, 2 * r, "all-linear", False, None) for name, r in zip(("lang", "math"), ranks)}
    setup = build_flow(arch_loras(tm, tmp_path, spec), 2, outtype="q8_0")
    llm, model, tokens = setup["llm"], setup["model"], setup["tokens"]
    try:
        stored = read_header(setup["flow"]).tensors
        lora_tensors = [t for name, t in stored.items() if name.endswith((".flow_a", ".flow_b"))]
        assert lora_tensors and all(t.type == Q8_0 for t in lora_tensors), "R = 32: every LoRA tensor is Q8_0"
        equal = ranks[0] == ranks[1]
        for m in model.modules():
            if isinstance(m, FlowLinear):
                # the file's values; with unequal ranks the loader widens B to F16
                m.a_cat, m.b_cat = q8_0_round_trip(m.a_cat), q8_0_round_trip(m.b_cat)
                if not equal:
                    m.b_cat = m.b_cat.half().float()
        model.set_mode("dynamic")
        llm.set_mode("dynamic")
        monkeypatch.setattr(FlowLinear, "forward", llama_cpp_arithmetic(b_stays_q8_0=equal))
        ref = torch_logits(model, tokens)
        batch = llm.eval_logits(tokens)
        one_by_one = runtime_token_by_token(llm, tokens)
        loaded = B.llama_flow_adapter_n_bytes(llm.flow.ptr)
    finally:
        llm.close()
    file_bytes = sum(t.nbytes for t in stored.values())
    print(f"[q8_0] ranks {ranks}: batch {rel_err(batch, ref):.1e}, token by token {rel_err(one_by_one, ref):.1e}; "
          f"adapter {loaded} bytes loaded, {file_bytes} in the file")
    assert rel_err(batch, ref) < TOL
    assert rel_err(one_by_one, ref) < TOL
    if equal:
        # as stored (buffer alignment aside); a B widened to F16 would take nearly twice its bytes
        assert loaded < 1.1 * file_bytes
    else:
        # padded to the largest rank (48 rows for 32), and B in F16
        assert loaded > 1.5 * file_bytes
