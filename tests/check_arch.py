"""Does LoRA-Flow run a Hugging Face architecture exactly? One command per model_type:

    PYTHONPATH=tests .venv/bin/python tests/check_arch.py starcoder2 [more model_types ...]
    make check-arch ARCH="starcoder2 cohere"

For each model_type: a tiny random model built by transformers (hidden 64, 2 layers unless
fixtures.py knows the family better), converted by llama.cpp's own converter; two PEFT LoRAs on
every linear module PEFT's "all-linear" picks (ranks 4 and 8, one rsLoRA) and a third on two
modules of layer 1; a random gate; the flow file. Then the runtime's logits against the PyTorch
model in dynamic, static (per layer) and off modes, k = 2 and 3, one batch and token by token.
Prints one line per model_type: PASS (largest error relative to the logits' scale below 1e-3),
FAIL with the errors, REFUSED with LoRA-Flow's reason, NO BASE when llama.cpp itself cannot
convert or load the tiny model (a mismatch between transformers' and llama.cpp's idea of the
config, nothing LoRA-Flow can mend), or ERROR. The exit status is non-zero unless all pass.
`--tokenizer spm` gives the model a SentencePiece tokenizer (some llama.cpp converters need one).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

from fixtures import TinyModels
from parity_setup import TOL, arch_loras, build_flow, rel_err, runtime_token_by_token, torch_logits

from loraflow.errors import LoraFlowError


def check(models: TinyModels, model_type: str, work: Path, tokenizer: str) -> tuple[str, str]:
    try:
        tm = models.get(model_type, tokenizer=tokenizer)
    except LoraFlowError as e:
        lines = str(e).strip().splitlines()  # the converter's error: what failed, and its last line (why)
        reason = lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "")
        return ("REFUSED" if "LoRA-Flow supports" in str(e) else "NO BASE"), reason
    if not llama_cpp_loads(tm.gguf):
        return "NO BASE", f"llama.cpp converts the tiny {model_type} model but cannot load it"
    setup = arch_loras(tm, work)
    errors = {}
    for k in (2, 3):
        try:
            flow = build_flow(setup, k)
        except LoraFlowError as e:
            return "REFUSED", str(e)
        llm, model, tokens = flow["llm"], flow["model"], flow["tokens"]
        try:
            for mode, weights in (("dynamic", None), ("static", [[0.7, 0.4, -0.2][:k]] * tm.n_layer), ("off", None)):
                llm.set_mode(mode, weights)
                model.set_mode(mode, weights)
                ref = torch_logits(model, tokens)
                errors[f"k={k} {mode}"] = max(rel_err(llm.eval_logits(tokens), ref),
                                              rel_err(runtime_token_by_token(llm, tokens), ref))
        finally:
            llm.close()
    worst = max(errors.values())
    detail = ", ".join(f"{name} {err:.1e}" for name, err in errors.items())
    return ("PASS" if worst < TOL else "FAIL"), detail


def llama_cpp_loads(gguf) -> bool:
    import llama_cpp

    try:
        llama_cpp.Llama(str(gguf), n_ctx=32, verbose=False).close()
    except ValueError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_types", nargs="+", help="Hugging Face model_type values, e.g. starcoder2")
    ap.add_argument("--tokenizer", choices=("bpe", "spm"), default="bpe",
                    help="the tiny model's tokenizer: SmolLM2's BPE (default) or a small SentencePiece model")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="loraflow-check-arch-") as tmp:
        models = TinyModels(Path(tmp) / "models")
        for model_type in args.model_types:
            try:
                verdict, detail = check(models, model_type, Path(tmp) / model_type, args.tokenizer)
            except Exception as e:  # noqa: BLE001 - report and go on with the next one
                verdict, detail = "ERROR", f"{type(e).__name__}: {e}"
                traceback.print_exc()
            results.append(verdict)
            print(f"{verdict:8} {model_type}: {detail}", flush=True)
    return 0 if all(v == "PASS" for v in results) else 1


if __name__ == "__main__":
    sys.exit(main())
