"""Train one LoRA of the compose recipe with PEFT: the base model frozen, rank-r adapters on all
seven projection modules, AdamW with warmup + cosine, loss on the response tokens only (the same
tokenization, chat template and loss as `loraflow train-gate`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_lora(base, data, out_dir, r: int = 8, alpha: int = 16, epochs: int = 2, lr: float = 1e-3,
               batch_size: int = 16, warmup: float = 0.05, seed: int = 0, threads: int | None = None,
               log=print) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from loraflow.gate_training import load
    from loraflow.gate_training.data import collate, load_examples
    from loraflow.gate_training.train import lr_at, response_loss

    t0 = time.time()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = load.load_tokenizer(base)
    examples = load_examples(data, tokenizer, max_length=512)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = get_peft_model(load.load_model(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                             target_modules=MODULES, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = math.ceil(len(examples) / batch_size) * epochs
    warmup_steps = max(1, int(warmup * steps))
    gen = torch.Generator().manual_seed(seed)
    hf = model.get_base_model()
    losses, step = [], 0
    bar = tqdm(total=steps, unit="step", desc=f"LoRA {Path(out_dir).name}", dynamic_ncols=True)
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, warmup_steps, lr)
            loss, n = response_loss(hf, collate([examples[j] for j in order[i:i + batch_size]], pad_id))
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item() / n)
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
    bar.close()
    out = Path(out_dir)
    model.save_pretrained(out)
    record = {"data": str(data), "examples": len(examples), "r": r, "alpha": alpha, "epochs": epochs, "lr": lr,
              "batch_size": batch_size, "steps": steps, "seed": seed, "first_loss": losses[0],
              "last_loss": sum(losses[-10:]) / len(losses[-10:]), "seconds": round(time.time() - t0, 1)}
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"LoRA {out}: {steps} steps, loss {record['first_loss']:.3f} -> {record['last_loss']:.3f}, "
        f"{record['seconds']:.0f} s")
    return record


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, help="Hugging Face folder of the base model")
    ap.add_argument("--data", required=True, help="jsonl rows {prompt, response}")
    ap.add_argument("--out", required=True, help="folder for the PEFT adapter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    train_lora(args.base, args.data, args.out, seed=args.seed, threads=args.threads)
