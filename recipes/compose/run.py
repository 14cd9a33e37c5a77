"""The compose recipe, end to end: a Spanish LoRA and a math LoRA on SmolLM2-135M-Instruct,
fused by LoRA-Flow gates, against the baselines, in PyTorch and in the quantized runtime.

    .venv/bin/python -m recipes.compose.run [--work DIR] [--seed 0] [--docs] [--compose3-work DIR] [--f32-check]

Steps (each is skipped when its output exists in the work folder, so a rerun only redoes what
is missing; `--redo STEP` redoes one step and everything after it):
    data      the jsonl sets (recipes/compose/data.py)
    base      SmolLM2-135M-Instruct as a Hugging Face folder, dequantized from the Q4_1 GGUF
    loras     the two LoRAs with PEFT, in two processes of one thread each (or copied from compose3's
              work folder when it trained the same ones: the same data and seed)
    gates     `loraflow train-gate`: the gates (dynamic) and the task-level static weights
    convert   `loraflow-convert flow`: both LoRAs + the gates into one GGUF (f16)
    eval      `loraflow eval` on the test set: six methods x two backends
    heldout   `loraflow eval` on test_heldout (wordings no training set uses): static and LoRA-Flow
    f32       with --f32-check only: the runtime's evaluations of the test set again, on an F32 GGUF
              of the very weights PyTorch runs: what the runtime gives without Q4_1's rounding
    report    the tables (exact answer, answer in Spanish; the runtime against PyTorch problem by
              problem), results.json; --docs also writes them into docs/RESULTS.md and draws
              docs/compose-trace.png and docs/compose-gates.png

recipes/compose3 is this recipe with three LoRAs: its Recipe is a subclass of this one.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recipes.compose import data as compose_data

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

BACKENDS = ("torch", "runtime")
MAX_TOKENS = compose_data.MAX_TOKENS
EXTRACT = compose_data.EXTRACT
COMPUTATION = compose_data.COMPUTATION       # "a op b =", the computation an answer writes out
STATIC_LRS = (0.01, 0.1)
OPERATIONS = (("+", "addition"), ("-", "subtraction"), ("*", "multiplication"))


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run(cmd: list[str], log) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}); see {log}")


def run_parallel(jobs: list[tuple[list[str], Path]], n: int) -> None:
    """Run each (command, log file), n at a time; stop with the failed one's log named."""
    waiting, active = list(jobs), []
    while waiting or active:
        while waiting and len(active) < n:
            cmd, log = waiting.pop(0)
            print("$ " + " ".join(cmd), flush=True)
            active.append((subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT), log))
        proc, log = active.pop(0)
        if proc.wait() != 0:
            for other, _ in active:
                other.wait()
            sys.exit(f"failed (exit {proc.returncode}); see {log}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def exact_answers(results: list[dict]) -> list[bool]:
    """Whether each answer is exactly right (EXTRACT's rule re-applied to the prediction)."""
    from loraflow.gate_training.evaluate import make_extractor

    extract = make_extractor(EXTRACT)
    return [extract(r["prediction"]) == r["reference"] for r in results]


def score(results: list[dict], in_language: list[bool]) -> dict:
    """Exact answer, answer in the problem's language, and both."""
    exact = exact_answers(results)
    n = len(results)
    return {"examples": n, "exact": sum(exact) / n, "language": sum(in_language) / n,
            "both": sum(e and s for e, s in zip(exact, in_language)) / n}


def by_operation(problems: list[dict], results: list[dict]) -> dict:
    """Per operation: exact answer, and whether the right computation "a op b =" was written."""
    asked = [COMPUTATION.search(p["response"]).groups() for p in problems]
    out = {}
    for op, _ in OPERATIONS:
        mine = [(a, r) for a, r in zip(asked, results) if a[1] == op]
        written = [COMPUTATION.search(r["prediction"]) for _, r in mine]
        n = len(mine) or None                  # None: no problem of that operation (a tiny test set)
        out[op] = {"examples": len(mine),
                   "exact": n and sum(exact_answers([r for _, r in mine])) / n,
                   "computation": n and sum(w is not None and w.groups() == a for (a, _), w in zip(mine, written)) / n}
    return out


def paired(torch_rows: list[dict], runtime_rows: list[dict]) -> dict:
    """Problem by problem, one backend against the other: the answers right in PyTorch only, right
    in the runtime only, and the answers whose text differs at all."""
    right = list(zip(exact_answers(torch_rows), exact_answers(runtime_rows), strict=True))
    return {"only_torch": sum(t and not r for t, r in right), "only_runtime": sum(r and not t for t, r in right),
            "text_differs": sum(t["prediction"] != r["prediction"] for t, r in zip(torch_rows, runtime_rows))}


def sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test: the chance of a split of a + b answers at least as uneven as a to b
    when each answer is as likely to go either way."""
    n = a + b
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n) if n else 1.0


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def replace_between(doc: Path, begin: str, end: str, text: str) -> None:
    """Put `text` between the markers in `doc` (both must be there)."""
    old = doc.read_text()
    if begin not in old or end not in old:
        raise SystemExit(f"{doc}: the markers {begin} and {end} are missing")
    a, b = old.index(begin) + len(begin), old.index(end)
    doc.write_text(old[:a] + "\n" + text + "\n" + old[b:])


class Recipe:
    """The compose recipe's steps over a work folder. A subclass changes the class attributes and
    the methods that differ (recipes/compose3/run.py)."""

    name = "compose"
    data = compose_data
    STEPS = ["data", "base", "loras", "gates", "convert", "eval", "heldout", "f32", "report"]
    ADAPTERS = {"lang": "lang_train", "math": "math_train"}       # adapter -> the set it is trained on
    # (row label, fusion mode of `loraflow eval`)
    METHODS = [("base model", "off"), ("Spanish LoRA alone", "single:lang"), ("math LoRA alone", "single:math"),
               ("average (1/2, 1/2)", "average"), ("task-level static (learned)", "static"),
               ("LoRA-Flow (dynamic gates)", "dynamic")]
    HELDOUT_METHODS = ("static", "dynamic")
    # static fusions learned by gradient: name -> (training set, dev set); each gets STATIC_LRS
    STATIC = {"static": ("gate_train", "gate_dev")}
    MARKERS = ("<!-- compose:begin -->", "<!-- compose:end -->")
    # LoRAs another recipe trains the same way: (its name, {our adapter: its adapter}). step_loras
    # copies them from its work folder instead of training them again when they were trained there
    # with our seed on a file of the same bytes as ours
    SHARED_LORAS = ("compose3", {"lang": "es", "math": "math"})
    shared_work: Path | None = None      # that recipe's work folder
    f32_check = False                     # run step f32
    docs = REPO / "docs"                  # where write_docs writes RESULTS.md and the figures

    def __init__(self, work: Path, seed: int, threads: int):
        self.work, self.seed, self.threads = work, seed, threads
        self.data_dir = work / "data"
        self.log = work / "log.txt"
        self.timings_path = work / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}
        from loraflow.models import default_model_path

        self.gguf = default_model_path()
        self.flow = work / f"{self.name}.flow.gguf"
        self.f32_gguf = work / "base-f32.gguf"

    @classmethod
    def add_arguments(cls, ap) -> None:
        other = cls.SHARED_LORAS[0]
        ap.add_argument(f"--{other}-work", dest="shared_work", metavar="DIR", type=Path, default=None,
                        help=f"{other}'s work folder, whose LoRAs ({', '.join(cls.SHARED_LORAS[1].values())}) are "
                             f"reused when they are the same  [default: $LORAFLOW_CACHE/{other}/seed-SEED]")
        ap.add_argument("--f32-check", action="store_true",
                        help="also evaluate the runtime on an F32 GGUF of the base PyTorch runs (step f32), "
                             "to tell the runtime's own differences from Q4_1's rounding")

    def configure(self, args) -> None:
        if args.shared_work is None:
            from loraflow.models import cache_dir

            args.shared_work = cache_dir(self.SHARED_LORAS[0], f"seed-{args.seed}")
        self.shared_work = args.shared_work
        self.f32_check = args.f32_check

    def wanted(self, step: str) -> bool:
        """Step f32 runs only with --f32-check (a run of it done before stays in the report)."""
        return step != "f32" or self.f32_check or self.done(step)

    # -- where each step leaves its output ---------------------------------------------------
    def outputs(self, step: str) -> list[Path]:
        return {
            "data": [self.data_dir / f"{name}.jsonl" for name in self.data.SIZES],
            "base": [self.work / "base-hf.txt"],
            "loras": [self.lora_dir(n) for n in self.ADAPTERS],
            "gates": [self.work / "gate-dynamic",
                      *(self.work / f"gate-{s}{suffix}" for s in self.STATIC
                        for suffix in ("", *(f"-lr{lr}" for lr in STATIC_LRS)))],
            "convert": [self.flow],
            "eval": [self.work / "eval"],
            "heldout": [self.work / "eval-heldout"],
            "f32": [self.work / "eval-f32"],
            "report": [self.work / "results.json"],
        }[step]

    def done(self, step: str) -> bool:
        return all(p.exists() for p in self.outputs(step))

    def clear(self, step: str) -> None:
        for p in self.outputs(step):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    @property
    def base_hf(self) -> str:
        return (self.work / "base-hf.txt").read_text().strip()

    def lora_dir(self, name: str) -> Path:
        return self.work / f"lora-{name}"

    def adapter_args(self) -> list[str]:
        return [a for n in self.ADAPTERS for a in ("--adapter", f"{n}={self.lora_dir(n)}")]

    # -- the steps ---------------------------------------------------------------------------
    def step_data(self):
        self.data.write_sets(self.data_dir, self.seed)

    def step_base(self):
        from loraflow.gate_training.load import dequantized_folder

        (self.work / "base-hf.txt").write_text(str(dequantized_folder(self.gguf)) + "\n")

    def lora_cmd(self, name: str, out: Path) -> list[str]:
        return [sys.executable, "-m", "recipes.compose.train_lora", "--base", self.base_hf,
                "--data", str(self.data_dir / f"{self.ADAPTERS[name]}.jsonl"), "--out", str(out),
                "--seed", str(self.seed), "--threads", "1"]

    def train_loras(self, names: list[str]) -> None:
        # one process of one thread per LoRA: as fast as one of two threads here, and each run is
        # deterministic (one thread: the same order of every reduction)
        run_parallel([(self.lora_cmd(n, Path(f"{self.lora_dir(n)}.tmp")), self.work / f"lora-{n}.log") for n in names],
                     len(names))
        for n in names:
            Path(f"{self.lora_dir(n)}.tmp").rename(self.lora_dir(n))

    def step_loras(self):
        other, shared = self.SHARED_LORAS
        for mine, theirs in shared.items():
            dest = self.lora_dir(mine)
            if not dest.exists() and self.same_lora_there(mine, theirs):
                print(f"{dest}: {other}'s lora-{theirs} (the same data and seed)", flush=True)
                shutil.copytree(self.shared_work / f"lora-{theirs}", Path(f"{dest}.tmp"))
                Path(f"{dest}.tmp").rename(dest)
        self.train_loras([n for n in self.ADAPTERS if not self.lora_dir(n).exists()])

    def same_lora_there(self, mine: str, theirs: str) -> bool:
        """Whether the other recipe's work folder holds LoRA `theirs` trained with our seed on a file
        of the same bytes as the one ours trains on."""
        if self.shared_work is None:
            return False
        record = self.shared_work / f"lora-{theirs}" / "train.json"
        if not record.is_file():
            return False
        rec = json.loads(record.read_text())
        data = Path(rec["data"])           # the file it was trained on (a copied LoRA: in a third folder)
        if not data.is_file():             # a work folder moved since
            data = self.shared_work / "data" / data.name
        return (rec["seed"] == self.seed and data.is_file()
                and data.read_bytes() == (self.data_dir / f"{self.ADAPTERS[mine]}.jsonl").read_bytes())

    def train_gate_cmd(self, fusion: str, out: Path, threads: int, lr: float | None = None,
                       data: str = "gate_train", dev: str = "gate_dev") -> list[str]:
        return [bin_path("loraflow"), "train-gate", "--base", self.base_hf, *self.adapter_args(),
                "--data", str(self.data_dir / f"{data}.jsonl"), "--dev", str(self.data_dir / f"{dev}.jsonl"),
                "--fusion", fusion, "--seed", str(self.seed), "--threads", str(threads), "-q",
                *(["--lr", str(lr)] if lr is not None else []), "-o", str(out), "--force"]

    def step_gates(self):
        dynamic = self.work / "gate-dynamic"
        if not dynamic.exists():
            run(self.train_gate_cmd("dynamic", Path(f"{dynamic}.tmp"), self.threads), self.log)
            Path(f"{dynamic}.tmp").rename(dynamic)
        # each static baseline gets its learning rate tuned on its dev set (a few weights: Adam
        # moves each by about lr a step, and a poor lr would make it a strawman); the gates keep
        # the defaults, untuned. The runs take one thread each, `threads` at a time.
        jobs = []
        for name, (data, dev) in self.STATIC.items():
            for lr in STATIC_LRS:
                out = self.work / f"gate-{name}-lr{lr}"
                if not (out / "run.json").exists():
                    jobs.append((self.train_gate_cmd("static", out, 1, lr, data, dev), Path(f"{out}.log")))
        run_parallel(jobs, self.threads)
        for name in self.STATIC:
            sweep = {}
            for lr in STATIC_LRS:
                rec = json.loads((self.work / f"gate-{name}-lr{lr}" / "run.json").read_text())
                sweep[lr] = {"dev_loss": rec["best"]["dev_loss"], "weights": rec["static_weights"]}
            best = min(sweep, key=lambda lr: sweep[lr]["dev_loss"])
            tmp = self.work / f"gate-{name}.tmp"
            shutil.copytree(self.work / f"gate-{name}-lr{best}", tmp, dirs_exist_ok=True)
            (tmp / "sweep.json").write_text(json.dumps({"chosen_lr": best, "sweep": sweep}, indent=2) + "\n")
            tmp.rename(self.work / f"gate-{name}")

    def step_convert(self):
        run([bin_path("loraflow-convert"), "flow", "--base", str(self.gguf), *self.adapter_args(),
             "--gate", str(self.work / "gate-dynamic" / "gate.safetensors"), "--outtype", "f16",
             "-o", str(self.flow), "--force"], self.log)

    @staticmethod
    def eval_name(backend: str, mode: str) -> str:
        return f"{backend}-{mode.replace(':', '-')}.json"

    def eval_path(self, backend: str, mode: str, folder: str = "eval") -> Path:
        return self.work / folder / self.eval_name(backend, mode)

    def eval_cmd(self, backend: str, mode: str, out: Path, data: str = "test", static: str = "static",
                 model: Path | None = None) -> list[str]:
        """`loraflow eval` of one mode on one set; mode static takes the weights of gate-{static}; the
        runtime runs on `model` (default: the Q4_1 GGUF)."""
        cmd = [bin_path("loraflow"), "eval", "--backend", backend, "--mode", mode,
               "--data", str(self.data_dir / f"{data}.jsonl"), "--extract", EXTRACT,
               "--max-tokens", str(MAX_TOKENS), "--threads", str(self.threads), "--show", "0", "-q", "-o", str(out)]
        if mode == "static":
            cmd += ["--weights", str(self.work / f"gate-{static}" / "static.json")]
        if backend == "torch":
            cmd += ["--base", self.base_hf, *self.adapter_args(), "--batch-size", "16"]
            if mode == "dynamic":
                cmd += ["--gate", str(self.work / "gate-dynamic" / "gate.safetensors")]
        else:
            cmd += ["-m", str(model or self.gguf), "-f", str(self.flow)]
        return cmd

    @staticmethod
    def test_set(step: str) -> str:
        """The problems evaluation step `step` (eval, heldout or f32) runs on."""
        return "test_heldout" if step == "heldout" else "test"

    def modes(self, step: str) -> list[str]:
        return [m for _, m in self.METHODS] if step in ("eval", "f32") else list(self.HELDOUT_METHODS)

    def method_jobs(self, step: str, mode: str) -> list[tuple[str, list]]:
        """The evaluations of one method: (file name in the step's folder, eval_cmd args)."""
        return [(self.eval_name(b, mode), [b, mode, self.test_set(step)]) for b in BACKENDS]

    def eval_jobs(self, step: str) -> list[tuple[str, list]]:
        """The evaluations of step eval, heldout or f32 (eval's runtime ones), backend by backend."""
        jobs = [j for m in self.modes(step) for j in self.method_jobs(step, m)]
        jobs.sort(key=lambda job: BACKENDS.index(job[1][0]))
        return [j for j in jobs if j[1][0] == "runtime"] if step == "f32" else jobs

    def run_evals(self, step: str, model: Path | None = None) -> None:
        folder = self.outputs(step)[0]
        tmp = Path(f"{folder}.tmp")
        tmp.mkdir(exist_ok=True)
        for name, (backend, mode, *rest) in self.eval_jobs(step):
            if not (tmp / name).exists():
                run(self.eval_cmd(backend, mode, tmp / name, *rest, model=model), self.log)
        tmp.rename(folder)

    def step_eval(self):
        self.run_evals("eval")

    def step_heldout(self):
        self.run_evals("heldout")

    def step_f32(self):
        # the F32 GGUF holds exactly the weights PyTorch runs (base-hf, dequantized from the Q4_1 GGUF);
        # 4 times the Q4_1 file's size, so it is removed once the evaluations are done
        if not self.f32_gguf.exists():
            tmp = self.work / "base-f32.tmp.gguf"
            run([bin_path("loraflow-convert"), "base", self.base_hf, "--outtype", "f32", "-o", str(tmp),
                 "--force", "-q"], self.log)
            tmp.rename(self.f32_gguf)
        self.run_evals("f32", self.f32_gguf)
        self.f32_gguf.unlink()

    def eval_seconds(self, step: str) -> float:
        folder = self.outputs(step)[0]
        return sum(json.loads((folder / name).read_text())["seconds"] for name, _ in self.eval_jobs(step))

    def step_timings(self) -> None:
        """Step times from the runs' own records (a step can span several invocations): the LoRAs
        and the static runs train in parallel, so a step takes as long as its longest run."""
        loras = [self.lora_dir(n) / "train.json" for n in self.ADAPTERS]
        self.timings["loras"] = max(json.loads(p.read_text())["seconds"] for p in loras if p.exists())
        self.timings["gates"] = json.loads((self.work / "gate-dynamic" / "run.json").read_text())["timings"]["total_s"] + max(
            json.loads((self.work / f"gate-{s}-lr{lr}" / "run.json").read_text())["timings"]["total_s"]
            for s in self.STATIC for lr in STATIC_LRS)
        for step in ("eval", "heldout", "f32"):
            if self.done(step):
                self.timings[step] = self.eval_seconds(step)

    def results_of(self, step: str, backend: str, mode: str) -> tuple[list[dict], list[dict]]:
        """(the problems, the eval's results for them, in the same order)."""
        folder = self.outputs(step)[0]
        return (read_jsonl(self.data_dir / f"{self.test_set(step)}.jsonl"),
                json.loads((folder / self.eval_name(backend, mode)).read_text())["results"])

    def in_language(self, problem: dict, row: dict) -> bool:
        return compose_data.is_spanish(row["prediction"])

    def scores(self, problems: list[dict], rows: list[dict]) -> dict:
        return score(rows, [self.in_language(p, r) for p, r in zip(problems, rows)])

    def static_weights(self):
        return json.loads((self.work / "gate-static" / "static.json").read_text())["weights"]

    def report_keys(self):
        """(key in results.json, step, backend, mode) of every evaluation; key: BACKEND/MODE on the
        test set, BACKEND/MODE/heldout on held-out wordings, f32/MODE for step f32's runtime."""
        for step, suffix in (("eval", ""), ("heldout", "/heldout"), ("f32", "")):
            if step == "f32" and not self.done(step):
                continue
            for backend in BACKENDS if step != "f32" else ("runtime",):
                for mode in self.modes(step):
                    yield f"{'f32' if step == 'f32' else backend}/{mode}{suffix}", step, backend, mode

    def step_report(self):
        results, by_op, rows_of = {}, {}, {}
        for key, step, backend, mode in self.report_keys():
            problems, rows = self.results_of(step, backend, mode)
            assert [p["prompt"] for p in problems] == [r["prompt"] for r in rows], key
            results[key], rows_of[key] = self.scores(problems, rows), rows
            if backend == "torch" and mode in ("static", "dynamic"):
                by_op[key.removeprefix("torch/")] = by_operation(problems, rows)
        for key, rows in rows_of.items():
            if not key.startswith("torch/"):
                results[key]["vs_torch"] = paired(rows_of["torch/" + key.split("/", 1)[1]], rows)
        self.step_timings()
        record = {"seed": self.seed, "threads": self.threads, "results": results, "by_operation": by_op,
                  "static_weights": self.static_weights(), "timings_s": self.timings}
        (self.work / "results.json").write_text(json.dumps(record, indent=2) + "\n")

    # -- the tables ------------------------------------------------------------------------------
    def method_table(self, res: dict, methods, suffix: str = "", language: str = "in Spanish") -> list[str]:
        lines = [f"| method | PyTorch exact | PyTorch {language} | PyTorch both | runtime Q4_1 exact | "
                 f"runtime Q4_1 {language} | runtime Q4_1 both | exact: runtime - PyTorch |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, mode in methods:
            t, r = res[f"torch/{mode}{suffix}"], res[f"runtime/{mode}{suffix}"]
            lines.append(f"| {label} | {percent(t['exact'])} | {percent(t['language'])} | {percent(t['both'])} | "
                         f"{percent(r['exact'])} | {percent(r['language'])} | {percent(r['both'])} | "
                         f"{100 * (r['exact'] - t['exact']):+.1f} |")
        return lines

    def backend_table(self, res: dict) -> list[str]:
        """Problem by problem, the runtime against PyTorch on the same problems: the answers right in
        one backend only and the answers whose text differs, in the Q4_1 runtime, and in the runtime
        on the F32 GGUF (step f32, test set) when it ran."""
        backends = [("runtime", "Q4_1")] + [("f32", "F32")] * any(k.startswith("f32/") for k in res)
        lines = ["| method | problems | " + " | ".join(f"{name}: right only in PyTorch / only in the runtime | "
                                                      f"{name}: answers differing in text" for _, name in backends) + " |",
                 "|---|---:|" + "---:|---:|" * len(backends)]
        rows = [(label, mode, "") for label, mode in self.METHODS] + \
               [(f"{label}, held-out wordings", mode, "/heldout") for label, mode in self.METHODS if mode in self.HELDOUT_METHODS]
        totals = {b: {"only_torch": 0, "only_runtime": 0, "text_differs": 0, "examples": 0} for b, _ in backends}
        for label, mode, suffix in rows:
            n = res[f"torch/{mode}{suffix}"]["examples"]
            cells = [label, str(n)]
            for b, _ in backends:
                if f"{b}/{mode}{suffix}" not in res:         # f32 evaluates the test set only
                    cells += ["-", "-"]
                    continue
                v = res[f"{b}/{mode}{suffix}"]["vs_torch"]
                cells += [f"{v['only_torch']} / {v['only_runtime']}", str(v["text_differs"])]
                for field in ("only_torch", "only_runtime", "text_differs"):
                    totals[b][field] += v[field]
                totals[b]["examples"] += n
            lines.append("| " + " | ".join(cells) + " |")
        for b, name in backends:
            t = totals[b]
            lines += ["", f"{name} runtime, all its rows together: {t['only_torch']} answers right only in PyTorch, "
                      f"{t['only_runtime']} only in the runtime (two-sided sign test p = "
                      f"{sign_test(t['only_torch'], t['only_runtime']):.2f}); {t['text_differs']} of {t['examples']} "
                      "answers differ in text."]
        return lines

    def operation_table(self, by_op: dict, suffix: str = "") -> list[str]:
        lines = ["| operation | problems | static exact | static computation | LoRA-Flow exact | LoRA-Flow computation |",
                 "|---|---:|---:|---:|---:|---:|"]
        for op, name in OPERATIONS:
            st, dy = by_op[f"static{suffix}"][op], by_op[f"dynamic{suffix}"][op]
            lines.append(f"| {name} | {st['examples']} | {percent(st['exact'])} | {percent(st['computation'])} | "
                         f"{percent(dy['exact'])} | {percent(dy['computation'])} |")
        return lines

    def timing_line(self, rec: dict) -> str:
        t = rec["timings_s"]
        return "Time per step on this machine (2 cores): " + ", ".join(
            f"{s} {t[s] / 60:.1f} min" if t[s] >= 60 else f"{s} {t[s]:.0f} s" for s in self.STEPS if s in t) + "."

    def table(self) -> str:
        rec = json.loads((self.work / "results.json").read_text())
        res = rec["results"]
        lines = self.method_table(res, self.METHODS)
        n = res["torch/dynamic"]["examples"]
        best_static = max(("average", "static"), key=lambda m: res[f"torch/{m}"]["exact"])
        gap = 100 * (res["torch/dynamic"]["exact"] - res[f"torch/{best_static}"]["exact"])
        w = rec["static_weights"]
        lines += ["", f"{n} test problems (seed {rec['seed']}); accuracies in %. Learned task-level static weights "
                  f"(lang, math): {', '.join(f'{x:.3f}' for x in w)}. LoRA-Flow minus the best static fusion "
                  f"({best_static}), PyTorch exact answer: {gap:+.1f} points."]
        lines += ["", "The runtime against PyTorch, problem by problem:", "", *self.backend_table(res)]
        lines += ["", "By operation (PyTorch): exact answer / the right computation written (`a op b =`):", "",
                  *self.operation_table(rec["by_operation"])]
        held = [m for m in self.METHODS if m[1] in self.HELDOUT_METHODS]
        h = res["torch/dynamic/heldout"]
        gap_h = 100 * (h["exact"] - res["torch/static/heldout"]["exact"])
        lines += ["", f"Held-out wordings (`test_heldout`: {h['examples']} problems in "
                  f"{len(compose_data.SPANISH.heldout)} wordings that no training set uses, two per operation; "
                  "(operation, a, b) unseen too; nothing was tuned on them):", "",
                  *self.method_table(res, held, "/heldout"),
                  "", f"LoRA-Flow minus static on held-out wordings, PyTorch exact answer: {gap_h:+.1f} points "
                  f"(on the test set's wordings: {100 * (res['torch/dynamic']['exact'] - res['torch/static']['exact']):+.1f}).",
                  "", "By operation, held-out wordings (PyTorch):", "", *self.operation_table(rec["by_operation"], "/heldout")]
        lines += ["", self.timing_line(rec)]
        return "\n".join(lines)

    # -- the docs --------------------------------------------------------------------------------
    def trace_doc(self, prompt: str, png: str, title: str, csv: str) -> None:
        run([bin_path("loraflow"), "trace", "-m", str(self.gguf), "-f", str(self.flow), "-p", prompt,
             "-n", str(MAX_TOKENS), "-t", str(self.threads), "-o", str(self.docs / png),
             "--csv", str(self.work / csv), "--title", title], self.log)

    def gate_figure(self, groups: dict[str, list[int]] | None, png: str, title: str) -> None:
        """docs/PNG: the mean gate weight of each LoRA per layer over the test set's answers, in the
        runtime (recipes/compose/analysis.py); `groups` splits the test rows (by language)."""
        from recipes.compose import analysis

        rows = json.loads(self.eval_path("runtime", "dynamic").read_text())["results"]
        means = analysis.gate_means(self.gguf, self.flow, self.data_dir / "test.jsonl", rows, groups, self.threads)
        (self.work / f"{Path(png).stem}.json").write_text(json.dumps(means, indent=2) + "\n")
        analysis.plot_gate_means(means, self.docs / png, title)

    def write_docs(self) -> None:
        doc = self.docs / "RESULTS.md"
        replace_between(doc, *self.MARKERS, self.table())
        example = read_jsonl(self.data_dir / "test.jsonl")[0]
        self.trace_doc(example["prompt"], "compose-trace.png", "LoRA-Flow gates: Spanish LoRA vs math LoRA", "trace.csv")
        self.gate_figure(None, "compose-gates.png", "LoRA-Flow gates over the 300 test problems: Spanish LoRA vs math LoRA")
        print(f"wrote {doc}, docs/compose-trace.png and docs/compose-gates.png")


def main(recipe_class=Recipe, doc=__doc__):
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None,
                    help=f"work folder  [default: $LORAFLOW_CACHE/{recipe_class.name}/seed-SEED]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="threads of the gate training and evaluation")
    ap.add_argument("--redo", choices=recipe_class.STEPS, default=None, help="redo this step and the ones after it")
    ap.add_argument("--docs", action="store_true", help="write the tables into docs/RESULTS.md, draw the figures")
    recipe_class.add_arguments(ap)
    args = ap.parse_args()
    if args.work is None:
        from loraflow.models import cache_dir

        args.work = cache_dir(recipe_class.name, f"seed-{args.seed}")
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = recipe_class(args.work, args.seed, args.threads)
    recipe.configure(args)
    steps = recipe.STEPS
    redo = steps.index(args.redo) if args.redo else len(steps)
    for i, step in enumerate(steps):
        if i >= redo:
            recipe.clear(step)
        if not recipe.wanted(step):
            continue
        if recipe.done(step):
            print(f"[{step}] done before ({', '.join(str(p) for p in recipe.outputs(step))})")
            continue
        print(f"[{step}] ...", flush=True)
        t0 = time.time()
        getattr(recipe, f"step_{step}")()
        recipe.timings[step] = round(time.time() - t0, 1)
        recipe.timings_path.write_text(json.dumps(recipe.timings, indent=2) + "\n")
    recipe.step_report()                 # the timings of this run into results.json
    print(recipe.table())
    if args.docs:
        recipe.write_docs()


if __name__ == "__main__":
    main()
