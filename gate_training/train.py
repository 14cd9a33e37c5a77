"""Train LoRA-Flow gates (or the paper's static baselines) on a few hundred examples.

The whole procedure is `train_gate` below, read top to bottom; every knob is in TrainConfig.
Paper defaults: W = 0 and the bias starting from one adapter (the last, by default), AdamW,
5 epochs, cosine schedule with warmup, gradient clipping, temperature 1; the loss covers
response tokens only; the dev set picks the kept checkpoint. Not the paper's: each gate trains
on its layer's input divided by the input's measured RMS, with lr 2e-2 (DEFAULT_LR), where the
paper's 1e-3 on raw inputs trains fast or slow depending on the model's residual scale.

Fusions:
    dynamic   the gates (k * n_embd + k numbers per layer)    -> OUT_DIR/gate.safetensors
    static    one weight per adapter ([k]; [n_layer, k] with per_layer), trained by gradient
              on the same data and loss (the paper's task-level fusion)  -> OUT_DIR/static.json
    average   1/k each, nothing to train (losses are still measured)     -> OUT_DIR/static.json
and OUT_DIR/run.json records the config, the data files' sha256, per-epoch losses and timings.

After each epoch the whole training state goes atomically into OUT_DIR/train-state.pt (STATE_FILE:
the trained weights, AdamW's state, the step, every RNG state, the epoch rows, the kept best weights
and a fingerprint of the settings and data); `--resume` continues from it to the gate an
uninterrupted run ends with, bit for bit, and the finished run removes it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loraflow import schema
from loraflow.errors import LoraFlowError

FUSIONS = ("dynamic", "static", "average")
DEV_METRICS = ("loss", "accuracy")
STATIC_FILE = "static.json"
RUN_FILE = "run.json"
OUTPUT_FILES = (schema.GATE_CKPT_FILE, STATIC_FILE, RUN_FILE)
# the state of an unfinished run, written after each epoch (save_state) and removed once the
# outputs are written; `--resume` continues from it
STATE_FILE = "train-state.pt"
STATE_FORMAT = 1
# settings that change how fast a run goes, not what it computes: `--resume` may change them (on
# another device or thread count the rest of the run is the same up to rounding, not bit for bit)
RESUME_FREE = ("device", "threads", "grad_checkpointing", "dequantize")
# the training examples (the first ones) on which the layer inputs' RMS is measured before training
SCALE_EXAMPLES = 64
# the default learning rate. Adam moves each parameter by about lr a step: the gate's weight acts on
# inputs of unit RMS, its bias and the static weights are fusion weights. The paper's 1e-3 on
# SmolLM2-135M's raw inputs (median RMS 1.9 to 28 past its first layer) is 1.9e-3 to 2.8e-2 here
# (geometric mean 7.5e-3); 2e-2 is inside that range and also lets a bias travel the 0.5 it must
# to switch an adapter off within the default 125 steps (tests/test_train_gate.py)
DEFAULT_LR = 2e-2


@dataclass
class TrainConfig:
    fusion: str = "dynamic"          # dynamic | static | average
    per_layer: bool = False          # static: one row of k weights per layer instead of one for all
    epochs: int = 5
    lr: float = DEFAULT_LR
    weight_decay: float = 0.0        # AdamW's; 0 keeps the bias where the data wants it
    warmup: float = 0.1              # fraction of all steps with a linear warmup, then cosine to 0
    grad_clip: float = 1.0           # max global norm of the gradient (0: no clipping)
    batch_size: int = 8
    temperature: float = 1.0         # gate softmax temperature T
    init_adapter: str | None = None  # the adapter the gate starts from (W = 0, one-hot bias); None: the last
    seed: int = 0
    dtype: str = "fp32"              # fp32 | bf16 (the base model's; gates and static weights stay fp32)
    device: str = "auto"             # auto (cuda, else mps, else cpu) | cpu | cuda | mps
    dequantize: bool = False         # a GGUF base: load it dequantized whole (transformers) instead of
                                     # training over its quantized blocks (gate_training/quantized.py)
    threads: int | None = None       # torch CPU threads; None: torch's default (all cores)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    max_length: int | None = None    # longest example in tokens; None: min(2048, the model's context)
    truncate: bool = False           # cut longer examples instead of refusing them
    add_eos: bool = True             # without a chat template, end each response with EOS
    dev_metric: str = "loss"         # loss | accuracy (greedy decoding + extract on the dev set)
    extract: str = "last-number"     # answer extraction for dev accuracy (see evaluate.py)
    dev_max_tokens: int = 64         # generation length for dev accuracy
    eval_batch_size: int = 16        # batch size for dev/train loss evaluation

    def check(self) -> None:
        if self.fusion not in FUSIONS:
            raise LoraFlowError(f"fusion {self.fusion!r}: choose one of {', '.join(FUSIONS)}")
        if self.per_layer and self.fusion != "static":
            raise LoraFlowError("--per-layer applies to --fusion static only")
        if self.dev_metric not in DEV_METRICS:
            raise LoraFlowError(f"dev metric {self.dev_metric!r}: choose one of {', '.join(DEV_METRICS)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "dev_max_tokens"):
            if getattr(self, name) < 1:
                raise LoraFlowError(f"{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0 or not self.temperature > 0:
            raise LoraFlowError("lr and temperature must be positive")
        if not 0 <= self.warmup < 1:
            raise LoraFlowError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise LoraFlowError("grad-clip and weight-decay must not be negative")
        if self.threads is not None and self.threads < 1:
            raise LoraFlowError("threads must be at least 1")
        if self.max_length is not None and self.max_length < 2:
            raise LoraFlowError("max-length must be at least 2")


# -- the loss ------------------------------------------------------------------------------------

def response_loss(hf, batch):
    """(summed cross-entropy over the response tokens, their count) of a transformers causal LM
    (FlowModel.model: the gates act through hooks on its layers).

    The same loss as the model's own `labels=` path, but the vocabulary projection runs only at
    the positions that predict a response token, not at every prompt token."""
    import torch
    import torch.nn.functional as F

    h = hf.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = hf.get_output_embeddings()(h[:, :-1][keep]).float()
    cap = getattr(hf.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, target[keep], reduction="sum"), int(keep.sum())


def enable_checkpointing(hf) -> None:
    """Activation (gradient) checkpointing on every decoder layer. The gate runs in a pre-hook of the
    layer: transformers 5 checkpoints the layer's forward without its hooks, so the gate's weights
    are kept and the recomputed FlowLinear modules read them again (4.x recomputes the hook too);
    the gradients are the same either way (tests/test_gate_data.py)."""
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):        # transformers >= 5.x
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    hf.config.use_cache = False


def evaluate_loss(flow, examples, batch_size: int, device, pad_id: int, par: Parallel | None = None) -> float:
    """Mean cross-entropy per response token over `examples` (shared out across processes with `par`)."""
    import torch

    from loraflow.gate_training.data import collate

    mine = par.shard(examples) if par else examples
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            batch = {k: v.to(device) for k, v in collate(mine[i:i + batch_size], pad_id).items()}
            loss, n = response_loss(flow.model, batch)
            total, count = total + float(loss), count + n
    if par:
        total, count = par.sum(total, count)
    return total / max(count, 1)


def lr_at(step: int, total: int, warmup_steps: int, lr: float) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to 0 at `total`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class Parallel:
    """Data parallelism across the processes `torchrun` or `accelerate launch` start (WORLD_SIZE > 1
    in the environment; one process is the plain case). Every process holds the whole model and
    takes every world-th example of each batch; the loss is normalised by the response tokens of
    the whole batch and the gradients are summed, so the update is the single-process one."""

    def __init__(self, device: str):
        import os

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch
            import torch.distributed as dist

            if device == "cuda":
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                self.device = f"cuda:{local}"
            dist.init_process_group("nccl" if device == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        return items[self.rank::self.world]

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_grads(self, params) -> None:
        if self.world > 1:
            import torch.distributed as dist

            for p in params:
                dist.all_reduce(p.grad)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


# -- the run -------------------------------------------------------------------------------------

def check_out_dir(out_dir, force: bool, resume: bool = False) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LoraFlowError(f"{out}: exists and is not a folder")
    if resume:
        if not (out / STATE_FILE).is_file():
            finished = " (the run there finished: its run.json is written)" if (out / RUN_FILE).is_file() else ""
            raise LoraFlowError(f"{out}: nothing to resume, no {STATE_FILE} there{finished}; "
                                "run without --resume to train from the start")
        return out
    if out.is_dir() and any(out.iterdir()) and not force:
        if (out / STATE_FILE).is_file():
            raise LoraFlowError(f"{out}: folder holds an interrupted run ({STATE_FILE}); pass --resume to "
                                "continue it, or --force to start over")
        raise LoraFlowError(f"{out}: folder is not empty; pass --force to write into it anyway")
    return out


# -- the state of an unfinished run (--resume) ---------------------------------------------------

def run_fingerprint(cfg: TrainConfig, base, adapters, data, dev) -> dict:
    """What a run was started with, as --resume compares it: the config (less RESUME_FREE), the
    base and adapter paths (resolved) and the data files' sha256 (a moved file is the same data)."""
    from loraflow.gate_training.data import file_sha256

    return {"config": {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE},
            "base": str(Path(base).resolve()),
            "adapters": [[str(n), str(Path(p).resolve())] for n, p in adapters],
            "data": {"train": file_sha256(data), "dev": file_sha256(dev) if dev else None}}


# how --resume names a config field that differs: its option (and how its value reads)
_OPTIONS = {"add_eos": ("--no-eos", lambda v: not v), "grad_checkpointing": ("--gradient-checkpointing", None)}


def fingerprint_differences(then: dict, now: dict) -> list[str]:
    """Each way `now` differs from the fingerprint `then` a state was saved with, in words."""
    diffs = []
    a, b = then.get("config", {}), now["config"]
    for key in [*b, *(k for k in a if k not in b)]:
        if a.get(key) != b.get(key):
            opt, show = _OPTIONS.get(key, ("--" + key.replace("_", "-"), None))
            show = show or (lambda v: v)
            diffs.append(f"{opt} {show(a.get(key))!r} then, {show(b.get(key))!r} now")
    if then.get("base") != now["base"]:
        diffs.append(f"--base {then.get('base')} then, {now['base']} now")
    if then.get("adapters") != now["adapters"]:
        fmt = lambda xs: " ".join(f"{n}={p}" for n, p in xs or [])  # noqa: E731
        diffs.append(f"--adapter {fmt(then.get('adapters'))} then, {fmt(now['adapters'])} now")
    for name in ("train", "dev"):
        x, y = then.get("data", {}).get(name), now["data"][name]
        if x != y:
            opt = "--data" if name == "train" else "--dev"
            diffs.append(f"{opt}: none then, a file now" if x is None else f"{opt}: a file then, none now"
                         if y is None else f"{opt}: a different file (sha256 {x[:12]}... then, {y[:12]}... now)")
    return diffs


def load_state(out: Path) -> dict:
    """OUT_DIR/train-state.pt, read back (tensors on the CPU)."""
    import torch

    path = out / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                     # noqa: BLE001  (a truncated or foreign file: say so)
        raise LoraFlowError(f"{path}: cannot read the training state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise LoraFlowError(f"{path}: not a train-gate state of format {STATE_FORMAT}")
    return state


def save_state(out: Path, state: dict) -> None:
    """Write `state` to OUT_DIR/train-state.pt atomically: into a temporary file of the same folder,
    flushed to disk, then renamed over the previous state. A kill at any moment leaves the
    previous epoch's state or this one, whole."""
    import tempfile

    import torch

    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{STATE_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_state(out: Path) -> None:
    """The state file and any temporary one a kill left mid-write (ours by name)."""
    (out / STATE_FILE).unlink(missing_ok=True)
    for tmp in out.glob(f".{STATE_FILE}.*.tmp"):
        tmp.unlink(missing_ok=True)


def rng_states(device) -> dict:
    """Every RNG the run may draw from but the shuffling generator: python, numpy, torch (CPU, CUDA)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if str(device).startswith("cuda"):
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device) -> None:
    import numpy as np
    import torch

    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(states["cuda"], device)


def _data_record(path, examples) -> dict:
    from loraflow.gate_training.data import file_sha256

    return {"path": str(path), "sha256": file_sha256(path), "examples": len(examples),
            "tokens": sum(len(e.input_ids) for e in examples),
            "response_tokens": sum(e.n_response for e in examples)}


def train_gate(cfg: TrainConfig, base, adapters, data, out_dir, dev=None, force: bool = False,
               progress: bool = True, log=print, resume: bool = False) -> dict:
    """Train the fusion `cfg.fusion` for `adapters` [(name, peft_dir), ...] on `data` (jsonl);
    write OUT_DIR/{gate.safetensors | static.json} and OUT_DIR/run.json; return the run record.
    With `resume`, continue the interrupted run whose state OUT_DIR holds (same settings and data)."""
    import torch
    from tqdm.auto import tqdm

    from loraflow.gate_training import load
    from loraflow.gate_training.data import collate, load_examples

    t_start = time.time()
    cfg.check()
    out = check_out_dir(out_dir, force, resume)
    state = load_state(out) if resume else None
    if cfg.dev_metric == "accuracy" and dev is None:
        raise LoraFlowError("--dev-metric accuracy needs a dev set (--dev)")
    device = load.pick_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    # data first: a bad row is reported before minutes of model loading
    tokenizer = load.load_tokenizer(base)
    max_length = cfg.max_length
    if max_length is None:
        from transformers import AutoConfig

        folder, kw = load.model_source(base)
        ctx = getattr(AutoConfig.from_pretrained(folder, **kw).get_text_config(), "max_position_embeddings", None)
        max_length = min(2048, ctx or 2048)
    train_ex = load_examples(data, tokenizer, max_length, cfg.truncate, cfg.add_eos)
    dev_ex = load_examples(dev, tokenizer, max_length, cfg.truncate, cfg.add_eos) if dev else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    fingerprint = run_fingerprint(cfg, base, adapters, data, dev)
    if state is not None:
        diffs = fingerprint_differences(state["fingerprint"], fingerprint)
        if diffs:
            raise LoraFlowError(f"{out}: cannot resume, the run there was started otherwise: " + "; ".join(diffs)
                                + " (resume with its settings and data, or start over with --force)")
    par = Parallel(device)              # one process, or one of several started by torchrun / accelerate launch
    device = par.device
    progress = progress and par.main
    if not par.main:
        log = lambda *a, **k: None      # noqa: E731  (one process reports)

    # the model: base + k frozen LoRAs + gates
    t_load = time.time()
    flow = load.load_flow_model(base, adapters, cfg.dtype, device, cfg.temperature, cfg.init_adapter,
                                quantized=not cfg.dequantize)
    names, k = flow.names, flow.k
    input_scales = None
    if cfg.fusion == "dynamic":
        # each gate trains on its layer's input divided by that input's typical RMS, measured here
        # (the same examples in every process), so that cfg.lr does not depend on the model's
        # residual scale (FlowGate); the checkpoint holds W itself. A resumed run takes the scales
        # the run measured at its start
        if state is not None:
            input_scales = list(state["input_scales"])
        else:
            sample = train_ex[:SCALE_EXAMPLES]
            input_scales = flow.measure_input_scales(
                {key: v.to(device) for key, v in collate(sample[i:i + cfg.eval_batch_size], pad_id).items()}
                for i in range(0, len(sample), cfg.eval_batch_size))
        flow.set_input_scales(input_scales)
        params = list(flow.gates.parameters())
    elif cfg.fusion == "static":
        params = [flow.learn_static(cfg.per_layer)]
    else:
        flow.set_mode("average")
        params = []
    load_s = time.time() - t_load
    if cfg.grad_checkpointing:
        enable_checkpointing(flow.model)

    def trainable_state():
        return [p.detach().clone() for p in params]

    def measure(epoch: int, train_loss: float | None) -> dict:
        """One row of the epoch table: losses (and dev accuracy) of the current weights."""
        flow.model.eval()
        row = {"epoch": epoch, "train_loss": train_loss}
        if train_loss is None and (dev_ex is None or not params):
            # before training there is no running mean: measure it when it is all we have (`average`,
            # or no dev set); otherwise the dev loss at the start is enough and saves a pass
            row["train_loss"] = evaluate_loss(flow, train_ex, cfg.eval_batch_size, device, pad_id, par)
        if dev_ex is not None:
            row["dev_loss"] = evaluate_loss(flow, dev_ex, cfg.eval_batch_size, device, pad_id, par)
            if cfg.dev_metric == "accuracy":
                from loraflow.gate_training.evaluate import count_correct_torch

                mine = par.shard(dev_ex)
                correct, n = par.sum(count_correct_torch(flow, tokenizer, mine, cfg.extract, cfg.dev_max_tokens),
                                     len(mine))
                row["dev_accuracy"] = correct / n
        return row

    def better(row, best) -> bool:
        if best is None:
            return True
        if "dev_loss" not in row:
            return True                       # no dev set: keep the last epoch
        if cfg.dev_metric == "accuracy" and row["dev_accuracy"] != best["dev_accuracy"]:
            return row["dev_accuracy"] > best["dev_accuracy"]
        return row["dev_loss"] < best["dev_loss"]

    t0 = time.time()
    resumed_from = []                          # the epochs this run was resumed after
    if state is None:
        epochs, best, best_state = [], None, None
        row = measure(0, None)
        row["seconds"] = time.time() - t0
        epochs.append(row)
        best, best_state = row, trainable_state()
        log(_epoch_line(row, "average" if cfg.fusion == "average" else "before training"))
        train_s_before = 0.0
    else:
        # where the last completed epoch left the weights, the kept best and the epoch table
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        best_state = [t.to(p.device) for p, t in zip(params, state["best_state"])]
        epochs, best = state["epochs_done"], state["best"]
        resumed_from = [*state["resumed_from"], state["epoch"]]
        train_s_before = state["train_s"]
        flow.model.eval()                      # as measure() leaves it after every epoch
        log(f"resuming from epoch {state['epoch']}/{cfg.epochs} ({out / STATE_FILE}): "
            + _epoch_line(epochs[-1], f"epoch {state['epoch']}"))

    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs if params else 0
    if params:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup_steps = int(cfg.warmup * total_steps)
        gen = torch.Generator().manual_seed(cfg.seed)
        step, first = 0, 1
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["rng"]["shuffle"])
            set_rng_states(state["rng"], device)
            step, first = state["step"], state["epoch"] + 1
        elif par.main and force:
            remove_state(out)                  # a previous run's state: this run starts over
        bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
        if state is not None:
            bar.set_description(f"resuming from epoch {state['epoch']}/{cfg.epochs}")
        for epoch in range(first, cfg.epochs + 1):
            t_epoch = time.time()
            if cfg.grad_checkpointing:
                flow.model.train()            # transformers checkpoints only in training mode
            order = torch.randperm(len(train_ex), generator=gen).tolist()
            loss_sum, token_sum = 0.0, 0
            for i in range(0, len(order), cfg.batch_size):
                mine = par.shard(order[i:i + cfg.batch_size])      # the whole batch with one process
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total_steps, warmup_steps, cfg.lr)
                loss, n = torch.zeros(()), 0
                if mine:
                    batch = {key: v.to(device) for key, v in collate([train_ex[j] for j in mine], pad_id).items()}
                    loss, n = response_loss(flow.model, batch)
                (n_batch,) = par.sum(n)
                if mine:
                    (loss / n_batch).backward()                       # mean over the batch's response tokens
                else:
                    for p in params:
                        p.grad = torch.zeros_like(p)
                par.sum_grads(params)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss_sum, token_sum, step = loss_sum + loss.item(), token_sum + n, step + 1
                bar.update(1)
                bar.set_description(f"epoch {epoch}/{cfg.epochs}")
                bar.set_postfix(loss=f"{loss.item() / max(n, 1):.4f}")
            loss_sum, token_sum = par.sum(loss_sum, token_sum)
            row = measure(epoch, loss_sum / token_sum)
            row["lr"] = opt.param_groups[0]["lr"]
            row["seconds"] = time.time() - t_epoch
            epochs.append(row)
            if better(row, best):
                best, best_state = row, trainable_state()
            if par.main:
                # the epoch is complete: everything the next one starts from
                try:
                    save_state(out, {
                        "format": STATE_FORMAT, "fingerprint": fingerprint, "epoch": epoch, "step": step,
                        "params": [p.detach().cpu().clone() for p in params],
                        "optimizer": opt.state_dict(),
                        "best_state": [t.detach().cpu().clone() for t in best_state], "best": best,
                        "epochs_done": epochs, "input_scales": input_scales,
                        "rng": {"shuffle": gen.get_state(), **rng_states(device)},
                        "resumed_from": resumed_from, "train_s": train_s_before + time.time() - t0})
                except (OSError, RuntimeError) as e:     # torch.save reports a full disk as RuntimeError
                    log(f"warning: {out / STATE_FILE}: could not save the training state ({e}); "
                        "--resume would start from an earlier epoch")
            (bar.write if progress else log)(_epoch_line(row, f"epoch {epoch}"))
        bar.close()
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
    train_s = train_s_before + time.time() - t0
    par.close()

    # outputs (the first process writes them)
    weights = None
    if cfg.fusion == "dynamic":
        outputs = {schema.GATE_CKPT_FILE: lambda path: flow.save_gate(path.parent)}
    else:
        w = params[0].detach().float().cpu().numpy() if params else [1.0 / k] * k
        weights = [[round(float(x), 6) for x in r] for r in w] if cfg.per_layer else [round(float(x), 6) for x in w]
        static = {"fusion": cfg.fusion, "adapters": names, "per_layer": cfg.per_layer, "weights": weights}
        outputs = {STATIC_FILE: lambda path: path.write_text(json.dumps(static, indent=2) + "\n")}

    record = {
        "command": "train-gate",
        "fusion": cfg.fusion,
        "config": asdict(cfg) | {"max_length": max_length},
        "base": str(base),
        "adapters": [{"name": n, "path": str(p)} for n, p in adapters],
        "data": {"train": _data_record(data, train_ex)} | ({"dev": _data_record(dev, dev_ex)} if dev else {}),
        "epochs": epochs,
        "best_epoch": best["epoch"],
        "best": best,
        "static_weights": weights,
        "input_scales": None if input_scales is None else [round(x, 6) for x in input_scales],
        "trainable_parameters": sum(p.numel() for p in params),
        "steps": total_steps,
        "resumed_from_epochs": resumed_from,
        "outputs": list(outputs),
        "device": device,
        "base_weights": "quantized" if load.is_gguf(base) and not cfg.dequantize else "dense",
        "processes": par.world,
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "timings": {"load_s": round(load_s, 3), "train_s": round(train_s, 3),
                    "total_s": round(train_s_before + time.time() - t_start, 3)},
    }
    if par.main:
        outputs[RUN_FILE] = lambda path: path.write_text(json.dumps(record, indent=2) + "\n")
        write_outputs(out, outputs)
        remove_state(out)                      # the run is finished: its outputs hold all of it
    return record


def write_outputs(out: Path, writers: dict) -> None:
    """Write each output (name -> function writing that file) into a temporary folder inside
    `out`, then move them into place and remove the other OUTPUT_FILES. A failure (a full disk)
    leaves no partial output, and a previous run's outputs stay until the new ones are complete."""
    import os
    import shutil
    import tempfile

    from safetensors import SafetensorError

    stage = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out, prefix=".train-gate."))
        for name, write in writers.items():
            write(stage / name)
        for name in OUTPUT_FILES:
            if name not in writers:
                (out / name).unlink(missing_ok=True)
        for name in writers:
            os.replace(stage / name, out / name)
    except (OSError, SafetensorError) as e:
        raise LoraFlowError(f"{out}: could not write the outputs ({e}); none was written") from None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _epoch_line(row: dict, label: str) -> str:
    parts = [label + ":"] if row["train_loss"] is None else [f"{label}: train loss {row['train_loss']:.4f}"]
    if "dev_loss" in row:
        parts.append(f"dev loss {row['dev_loss']:.4f}")
    if "dev_accuracy" in row:
        parts.append(f"dev accuracy {row['dev_accuracy']:.3f}")
    return ", ".join(parts).replace(":, ", ": ")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("loraflow", "torch", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
