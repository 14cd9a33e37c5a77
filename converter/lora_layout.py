"""Where llama.cpp puts a PEFT LoRA: the GGUF tensor of every weight it adapts, and the rows
its A and B must take there.

llama.cpp's converter renames each Hugging Face weight by architecture and may transform it on
the way (the q/k rows of llama-style models are permuted for llama.cpp's RoPE; other
architectures split, fuse or reshape projections). A LoRA must follow its weight. As llama.cpp's
own convert_lora_to_gguf.py does, A and B go together through the converter's model class for
the base's architecture, wrapped as one of that script's LoraTorchTensor, which turns each
reshape, permute or split the class applies to the weight into the same operation on B (or A).
So every architecture llama.cpp converts LoRAs for is placed with no table of ours, and a new
llama.cpp release brings its new ones. llama.cpp's conversion code imports torch and
transformers, so this does too (the `train` extra).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import tempfile
import threading
from functools import cache
from pathlib import Path

import numpy as np

from loraflow.errors import ConversionError
from loraflow.llama_source import llama_cpp_source_dir
from loraflow.peft_io import PeftAdapter

logger = logging.getLogger("loraflow.converter")


@cache
def _llama_cpp_converter():
    """(llama.cpp's `conversion` package, its convert_lora_to_gguf module), imported from the
    llama.cpp source the runtime was built from."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ConversionError("this reads the model through llama.cpp's own converter, which needs torch and "
                              "transformers: pip install torch==2.13.0 'loraflow[train]' (the CPU build of torch "
                              "first)") from None
    src = llama_cpp_source_dir()
    # the converters log every tensor, and a config without model_type, which ours may be
    logging.getLogger("hf-to-gguf").setLevel(logging.ERROR)
    with _IMPORTING:  # threads that convert at once must not see a half-imported module
        conversion = _import_file("conversion", src / "conversion" / "__init__.py", package=True)
        return conversion, _import_file("convert_lora_to_gguf", src / "convert_lora_to_gguf.py")


_IMPORTING = threading.Lock()


def _import_file(name: str, path, package: bool = False):
    """Import llama.cpp's module `name` from its source file (it is not an installed package;
    convert_lora_to_gguf imports `conversion` by that name, so it goes into sys.modules)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(Path(path).parent)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def hf_architecture(hparams: dict, path) -> str:
    """The Hugging Face architecture llama.cpp's converter reads from a config, e.g. LlamaForCausalLM."""
    conversion, _ = _llama_cpp_converter()
    try:
        return conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{path}: no architecture in config.json ({e})") from None


def converter_class(hf_arch: str, path):
    """llama.cpp's converter class for a Hugging Face architecture."""
    conversion, _ = _llama_cpp_converter()
    try:
        return conversion.get_model_class(hf_arch)
    except NotImplementedError:
        raise ConversionError(f"{path}: llama.cpp's converter does not know the architecture {hf_arch!r}, so "
                              "neither llama.cpp nor LoRA-Flow can run it") from None


def gguf_arch_name(cls) -> str:
    import gguf

    return gguf.MODEL_ARCH_NAMES[cls.model_arch]


@cache
def representative_hf_architecture(arch: str) -> str | None:
    """A Hugging Face architecture that llama.cpp converts to the GGUF architecture `arch` (for a base
    given as a GGUF, which does not record its source): the one named like it (llama ->
    LlamaForCausalLM), else any causal LM, else any. The GGUF layout belongs to `arch`, so every
    class that writes it places LoRA rows alike."""
    conversion, _ = _llama_cpp_converter()
    conversion.load_all_models()
    names = sorted(name for name, cls in conversion.ModelBase._model_classes[conversion.ModelType.TEXT].items()
                   if gguf_arch_name(cls) == arch)
    want = arch.replace("-", "").replace("_", "") + "forcausallm"
    for pick in ([n for n in names if n.lower() == want], [n for n in names if n.endswith("ForCausalLM")], names):
        if pick:
            return pick[0]
    return None


def lora_layout(hparams: dict, adapter: PeftAdapter, where) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """GGUF base tensor name (blk.N.attn_q.weight, ...) -> (A [r, n_in], B [n_out, r] float32, the
    Hugging Face weight it came from) of `adapter`, as llama.cpp's converter lays out the weights
    of the base described by `hparams` (its config.json). `where` names the base in errors."""
    import gguf
    import torch

    _, lora_script = _llama_cpp_converter()
    cls = converter_class(hf_architecture(hparams, where), where)

    class Layout(cls):  # the converter with no base weights: only its renaming and transforms are used
        model_arch = cls.model_arch

        def index_tensors(self, remote_hf_model_id=None):
            return {}

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hparams))  # some classes read it again
        try:
            model = Layout(Path(tmp), gguf.LlamaFileType.ALL_F32, Path(tmp) / "unused.gguf", hparams=dict(hparams),
                           eager=True, dry_run=True)
        except Exception as e:  # a config the class cannot read: say which and why
            raise ConversionError(f"{where}: llama.cpp's {cls.__name__} cannot read this base's configuration "
                                  f"({type(e).__name__}: {e})") from None
    out: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    for (layer, module), (a, b) in sorted(adapter.weights.items()):
        hf_name = name = adapter.hf_weight_name(layer, module)
        who = f"adapter {adapter.name!r} ({adapter.path}): LoRA on {name}"
        item = model.filter_tensors((name, lambda: None))
        if item is None:
            raise ConversionError(f"{who}: llama.cpp's converter drops that weight from the {gguf_arch_name(cls)} model")
        name = item[0]
        bid = next((int(part) for part in name.split(".") if part.isdecimal()), None)
        lora = lora_script.LoraTorchTensor(torch.from_numpy(a), torch.from_numpy(b))
        try:
            placed = list(model.modify_tensors(lora, name, bid))
        except Exception as e:  # noqa: BLE001 - whatever the class raises, name the weight
            raise ConversionError(f"{who}: llama.cpp's {cls.__name__} cannot place it ({type(e).__name__}: {e})") from None
        if not placed:
            raise ConversionError(f"{who}: llama.cpp's {cls.__name__} maps it to no tensor of its own "
                                  "(merged with others, as MoE experts are?); not supported")
        for gguf_name, t in placed:
            if not isinstance(t, lora_script.LoraTorchTensor):
                raise ConversionError(f"{who}: llama.cpp's {cls.__name__} turns it into {gguf_name}, which a LoRA "
                                      "cannot follow")
            if gguf_name in out:
                raise ConversionError(f"{who}: {gguf_name} would get a second LoRA (from another module of the "
                                      "same adapter); not supported")
            la, lb = t.get_lora_A_B()
            out[gguf_name] = (np.ascontiguousarray(la.float().numpy()), np.ascontiguousarray(lb.float().numpy()), hf_name)
    return out
