"""A synthetic task where the right answer needs adapter 1 on some tokens and adapter 2 on others.

N single-token words w_0 .. w_{N-1}; half of them (random) are of kind A, the rest of kind B.
The task is a successor map T (one random N-cycle): the response continues a chain
w, T(w), T(T(w)), ... from the prompt's last word. Two rules share T's work:

    rule 1 ("first"):  F1 = T on kind A words, a wrong successor on kind B words
    rule 2 ("second"): F2 = T on kind B words, a wrong successor on kind A words

(F1, F2 are permutations, each wrong everywhere the other is right). LoRA 1 is trained on
chains of F1 alone, LoRA 2 on chains of F2 alone; each learns its whole rule. On T's chains,
kinds alternate within a sequence, so the right output needs LoRA 1 at kind-A tokens and
LoRA 2 at kind-B tokens: a per-token gate can do it, any fixed mixture cannot. The base is the
tiny llama of tests/fixtures.py without its chat template, so prompt + response is plain text
and every response token is predicted from the word before it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fixtures import make_tiny_model


@dataclass
class Task:
    words: list[str]          # N words, each one token with its leading space
    kind_a: np.ndarray        # [N] bool
    T: np.ndarray             # the task's successor map
    F1: np.ndarray            # rule 1
    F2: np.ndarray            # rule 2
    token_ids: list[int]      # the words' token ids

    def chain(self, rule: np.ndarray, start: int, length: int) -> list[int]:
        out, w = [], start
        for _ in range(length):
            w = int(rule[w])
            out.append(w)
        return out

    def text(self, idx) -> str:
        return "".join(" " + self.words[i] for i in idx)

    def rows(self, rule: np.ndarray, n: int, length: int, seed: int, prompt_len: int = 2) -> list[dict]:
        """Rows {"prompt": "<prompt_len words of the chain>", "response": "<the next `length` words>"}."""
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(n):
            start = int(rng.integers(len(self.words)))
            seq = [start] + self.chain(rule, start, prompt_len - 1 + length)
            rows.append({"prompt": self.text(seq[:prompt_len]), "response": self.text(seq[prompt_len:])})
        return rows


def make_task_model(dir, seed: int = 21, logit_scale: float = 8.0) -> Path:
    """The tiny llama (SmolLM2's tokenizer) without a chat template, its final norm scaled by
    `logit_scale`: with embeddings of norm ~0.4 the tied output layer's logits otherwise span
    only a few units, too little for any adapter to single out one token among 49152."""
    import torch
    from transformers import AutoModelForCausalLM

    dir = Path(dir)
    make_tiny_model("llama", dir, seed)
    model = AutoModelForCausalLM.from_pretrained(str(dir), dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(logit_scale)
    model.save_pretrained(str(dir))
    (dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg = dir / "tokenizer_config.json"
    c = json.loads(cfg.read_text())
    c.pop("chat_template", None)
    cfg.write_text(json.dumps(c, indent=2))
    return dir


def make_task(tokenizer, n_words: int = 12, seed: int = 0) -> Task:
    rng = np.random.default_rng(seed)
    vocab = tokenizer.get_vocab()
    cands = sorted(t for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and 4 <= len(t) <= 7)
    words = []
    for t in rng.permutation(cands):
        w = str(t[1:])
        if tokenizer(" " + w, add_special_tokens=False)["input_ids"] == [vocab[t]]:
            words.append(w)
        if len(words) == n_words:
            break
    n = n_words
    kind_a = np.zeros(n, bool)
    kind_a[rng.permutation(n)[: n // 2]] = True
    cycle = rng.permutation(n)
    T = np.empty(n, int)
    T[cycle] = np.roll(cycle, -1)          # one n-cycle: every word appears in every long chain

    def wrong_on(kind):
        """T on ~kind, and on `kind` T composed with a derangement of that kind (never T's answer)."""
        idx = np.flatnonzero(kind)
        rule = T.copy()
        rule[idx] = T[np.roll(idx, 1)]
        return rule

    F1, F2 = wrong_on(~kind_a), wrong_on(kind_a)
    ids = [vocab["Ġ" + w] for w in words]
    task = Task(words, kind_a, T, F1, F2, ids)
    ok = tokenizer(task.text(range(n)), add_special_tokens=False)["input_ids"]
    assert ok == ids, "the words must tokenize one token each, also in a row"
    return task


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_rule_lora(model_dir, task: Task, rule: np.ndarray, out_dir, steps: int = 150, r: int = 8,
                    lr: float = 1e-2, seed: int = 0, batch: int = 16, length: int = 10) -> Path:
    """A PEFT LoRA (all projections) trained on chains of `rule`; saved to out_dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.gate_training.data import Row, collate, encode_row
    from loraflow.gate_training.train import response_loss

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rows = task.rows(rule, steps * batch, length, seed=1000 + seed)
    examples = [encode_row(tok, Row(i, [{"role": "user", "content": x["prompt"]}], x["response"]), "", 10**6,
                           add_eos=False) for i, x in enumerate(rows)]
    hf = peft.base_model.model
    for step in range(steps):
        b = collate(examples[step * batch:(step + 1) * batch], tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 10) * (0.1 + 0.9 * (1 - step / steps))
        loss, n = response_loss(hf, b)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    peft.save_pretrained(str(out_dir))
    return Path(out_dir)


# -- a planted gate --------------------------------------------------------------------------------

PLANTED_PROMPT, PLANTED_LENGTH = 4, 10      # words of prompt and of response per row


def make_planted_task(work, strength: float = 0.5, logit_std: float = 3.0, rows: int = 400, seed: int = 0) -> dict:
    """A teacher with a known token-dependent gate, and data it wrote: the tiny llama of
    make_task_model, two random LoRAs ("a", "b") and a planted gate W_l ~ N(0, c^2 / (s_l^2 n)),
    b = 0, so that each token's gate logits spread by about c = logit_std (s_l: the layer input's
    RMS). Rows are random prompts of PLANTED_PROMPT words and the teacher's greedy continuation,
    restricted to one-token words so that the text tokenizes back to the same ids. Returns
    {model, loras [(name, dir)], planted (gate folder), train/dev/test (jsonl, 200/50/rest)}."""
    import torch

    from fixtures import make_tiny_lora
    from loraflow.gate_training.load import load_flow_model, load_tokenizer

    work = Path(work)
    model = make_task_model(work / "model", seed=5)
    loras = [(n, make_tiny_lora(model, work / f"lora-{n}", seed=i + 1, strength=strength)) for i, n in enumerate("ab")]
    tok = load_tokenizer(model)
    vocab = tok.get_vocab()
    words = torch.tensor(sorted(i for t, i in vocab.items()
                                if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and 4 <= len(t) <= 7))
    rng = np.random.default_rng(seed)
    seq = torch.from_numpy(rng.choice(words.numpy(), (rows, PLANTED_PROMPT)))
    teacher = load_flow_model(model, loras)
    allowed = torch.full((teacher.model.config.vocab_size,), float("-inf"))
    allowed[words] = 0.0
    with torch.no_grad():
        scales = teacher.measure_input_scales([{"input_ids": seq, "attention_mask": torch.ones_like(seq)}])
        for g, s in zip(teacher.gates, scales):
            n = g.weight.shape[1]
            g.weight.copy_(torch.from_numpy(rng.normal(0.0, logit_std / (s * np.sqrt(n)), g.weight.shape)))
            g.bias.zero_()
        for _ in range(PLANTED_LENGTH):
            seq = torch.cat([seq, (teacher(seq).logits[:, -1] + allowed).argmax(-1, keepdim=True)], 1)
    planted = work / "planted"
    teacher.save_gate(planted)
    out = []
    for ids in seq.tolist():
        prompt, response = tok.decode(ids[:PLANTED_PROMPT]), tok.decode(ids[PLANTED_PROMPT:])
        if tok(prompt + response, add_special_tokens=False)["input_ids"] == ids:
            out.append({"prompt": prompt, "response": response})
    assert len(out) > 300, f"only {len(out)} of {rows} rows tokenize back to their ids"
    files = {name: write_jsonl(work / f"{name}.jsonl", part)
             for name, part in (("train", out[:200]), ("dev", out[200:250]), ("test", out[250:]))}
    return dict(model=model, loras=loras, planted=planted, **files)


def residual_scaled_copy(model_dir, loras, factor: float, out_dir) -> tuple[Path, list]:
    """The same function with a residual stream `factor` times larger: the embedding and every
    write into the residual stream (o_proj, down_proj and their LoRAs' B) scaled by `factor`, the
    final norm by 1 / factor (the output layer is the tied embedding). Each layer's RMSNorm
    cancels the scale on the way in, up to its epsilon. Returns (model folder, loras)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert model.config.tie_word_embeddings
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(factor)
        model.model.norm.weight.div_(factor)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(factor)
            layer.mlp.down_proj.weight.mul_(factor)
    model.save_pretrained(str(out_dir / "model"))
    for f in Path(model_dir).iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out_dir / "model" / f.name)
    scaled = []
    for name, src in loras:
        dst = out_dir / f"lora-{name}"
        shutil.copytree(src, dst)
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        for key, t in tensors.items():
            if "lora_B" in key and ("o_proj" in key or "down_proj" in key):
                t.mul_(factor)
        save_file(tensors, str(dst / "adapter_model.safetensors"))
        scaled.append((name, dst))
    return out_dir / "model", scaled
