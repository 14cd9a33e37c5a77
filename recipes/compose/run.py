"""The compose recipe, end to end: a Spanish LoRA and a math LoRA on SmolLM2-135M-Instruct,
fused by LoRA-Flow gates, against the baselines, in PyTorch and in the quantized runtime.

    .venv/bin/python recipes/compose/run.py [--work DIR] [--seed 0] [--docs]

Steps (each is skipped when its output exists in the work folder, so a rerun only redoes what
is missing; `--redo STEP` redoes one step and everything after it):
    data      the five jsonl sets (recipes/compose/data.py)
    base      SmolLM2-135M-Instruct as a Hugging Face folder, dequantized from the Q4_1 GGUF
    loras     the two LoRAs with PEFT, in two processes of one thread each
    gates     `loraflow train-gate`: the gates (dynamic) and the task-level static weights
    convert   `loraflow-convert flow`: both LoRAs + the gates into one GGUF (f16)
    eval      `loraflow eval` on the test set: six methods x two backends
    report    the table (exact answer, answer in Spanish), results.json; --docs also writes it
              into docs/RESULTS.md and draws docs/compose-trace.png
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import data as compose_data  # noqa: E402

STEPS = ["data", "base", "loras", "gates", "convert", "eval", "report"]
ADAPTERS = ["lang", "math"]
# (row label, fusion mode of `loraflow eval`)
METHODS = [("base model", "off"), ("Spanish LoRA alone", "single:lang"), ("math LoRA alone", "single:math"),
           ("average (1/2, 1/2)", "average"), ("task-level static (learned)", "static"),
           ("LoRA-Flow (dynamic gates)", "dynamic")]
BACKENDS = ("torch", "runtime")
MAX_TOKENS = 40
# exact answer: the number right after the first "=" is the result (the answer must show the
# computation; a right number elsewhere in a rambling answer does not count)
EXTRACT = r"regex:=\s*(-?\d+)"
# the computation an answer writes out: "a op b ="
COMPUTATION = re.compile(r"(\d+) ([-+*]) (\d+) =")
STATIC_LRS = (0.01, 0.1)
BEGIN, END = "<!-- compose:begin -->", "<!-- compose:end -->"


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


class Recipe:
    def __init__(self, work: Path, seed: int, threads: int):
        self.work, self.seed, self.threads = work, seed, threads
        self.data = work / "data"
        self.log = work / "log.txt"
        self.timings_path = work / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}
        from loraflow.models import default_model_path

        self.gguf = default_model_path()
        self.flow = work / "compose.flow.gguf"

    # -- where each step leaves its output ---------------------------------------------------
    def outputs(self, step: str) -> list[Path]:
        return {
            "data": [self.data],
            "base": [self.work / "base-hf.txt"],
            "loras": [self.work / f"lora-{n}" for n in ADAPTERS],
            "gates": [self.work / "gate-dynamic", self.work / "gate-static",
                      *(self.work / f"gate-static-lr{lr}" for lr in STATIC_LRS)],
            "convert": [self.flow],
            "eval": [self.work / "eval"],
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

    def adapter_args(self) -> list[str]:
        return [a for n in ADAPTERS for a in ("--adapter", f"{n}={self.work / f'lora-{n}'}")]

    # -- the steps ---------------------------------------------------------------------------
    def step_data(self):
        compose_data.write_sets(self.data, self.seed)

    def step_base(self):
        from loraflow.gate_training.load import dequantized_folder

        (self.work / "base-hf.txt").write_text(str(dequantized_folder(self.gguf)) + "\n")

    def step_loras(self):
        # two processes of one thread each: as fast as one of two threads here, and each run is
        # deterministic (one thread: the same order of every reduction)
        procs = []
        for n in ADAPTERS:
            cmd = [sys.executable, str(HERE / "train_lora.py"), "--base", self.base_hf,
                   "--data", str(self.data / f"{n}_train.jsonl"), "--out", str(self.work / f"lora-{n}.tmp"),
                   "--seed", str(self.seed), "--threads", "1"]
            print("$ " + " ".join(cmd), flush=True)
            procs.append((n, subprocess.Popen(cmd, stdout=open(self.work / f"lora-{n}.log", "w"),
                                              stderr=subprocess.STDOUT)))
        for n, p in procs:
            if p.wait() != 0:
                sys.exit(f"LoRA {n} failed; see {self.work / f'lora-{n}.log'}")
        for n in ADAPTERS:
            (self.work / f"lora-{n}.tmp").rename(self.work / f"lora-{n}")

    def train_gate_cmd(self, fusion: str, out: Path, threads: int, lr: float | None = None) -> list[str]:
        return [bin_path("loraflow"), "train-gate", "--base", self.base_hf, *self.adapter_args(),
                "--data", str(self.data / "gate_train.jsonl"), "--dev", str(self.data / "gate_dev.jsonl"),
                "--fusion", fusion, "--seed", str(self.seed), "--threads", str(threads), "-q",
                *(["--lr", str(lr)] if lr is not None else []), "-o", str(out), "--force"]

    def step_gates(self):
        dynamic = self.work / "gate-dynamic"
        if not dynamic.exists():
            run(self.train_gate_cmd("dynamic", Path(f"{dynamic}.tmp"), self.threads), self.log)
            Path(f"{dynamic}.tmp").rename(dynamic)
        # the static baseline gets its learning rate tuned on the dev set (two weights: Adam moves
        # each by about lr a step, and a poor lr would make it a strawman); the gates keep the
        # defaults, untuned
        sweep = {}
        procs = []
        for lr in STATIC_LRS:
            out = self.work / f"gate-static-lr{lr}"
            if not (out / "run.json").exists():
                cmd = self.train_gate_cmd("static", out, 1, lr)
                print("$ " + " ".join(cmd), flush=True)
                procs.append(subprocess.Popen(cmd, stdout=open(f"{out}.log", "w"), stderr=subprocess.STDOUT))
        if any(p.wait() != 0 for p in procs):
            sys.exit(f"static training failed; see {self.work}/gate-static-lr*.log")
        for lr in STATIC_LRS:
            rec = json.loads((self.work / f"gate-static-lr{lr}" / "run.json").read_text())
            sweep[lr] = {"dev_loss": rec["best"]["dev_loss"], "weights": rec["static_weights"]}
        best = min(sweep, key=lambda lr: sweep[lr]["dev_loss"])
        shutil.copytree(self.work / f"gate-static-lr{best}", self.work / "gate-static.tmp", dirs_exist_ok=True)
        (self.work / "gate-static.tmp" / "sweep.json").write_text(json.dumps({"chosen_lr": best, "sweep": sweep},
                                                                           indent=2) + "\n")
        (self.work / "gate-static.tmp").rename(self.work / "gate-static")

    def step_convert(self):
        run([bin_path("loraflow-convert"), "flow", "--base", str(self.gguf), *self.adapter_args(),
             "--gate", str(self.work / "gate-dynamic" / "gate.safetensors"), "--outtype", "f16",
             "-o", str(self.flow), "--force"], self.log)

    def eval_path(self, backend: str, mode: str, folder: str = "eval") -> Path:
        return self.work / folder / f"{backend}-{mode.replace(':', '-')}.json"

    def eval_cmd(self, backend: str, mode: str, out: Path) -> list[str]:
        cmd = [bin_path("loraflow"), "eval", "--backend", backend, "--mode", mode,
               "--data", str(self.data / "test.jsonl"), "--extract", EXTRACT,
               "--max-tokens", str(MAX_TOKENS), "--threads", str(self.threads), "--show", "0", "-q", "-o", str(out)]
        if mode == "static":
            cmd += ["--static-weights", str(self.work / "gate-static" / "static.json")]
        if backend == "torch":
            cmd += ["--base", self.base_hf, *self.adapter_args(), "--batch-size", "16"]
            if mode == "dynamic":
                cmd += ["--gate", str(self.work / "gate-dynamic" / "gate.safetensors")]
        else:
            cmd += ["-m", str(self.gguf), "-f", str(self.flow)]
        return cmd

    def step_eval(self):
        tmp = self.work / "eval.tmp"
        tmp.mkdir(exist_ok=True)
        for backend in BACKENDS:
            for _, mode in METHODS:
                out = self.eval_path(backend, mode, "eval.tmp")
                if not out.exists():
                    run(self.eval_cmd(backend, mode, out), self.log)
        tmp.rename(self.work / "eval")

    def step_report(self):
        from loraflow.gate_training.evaluate import make_extractor

        extract = make_extractor(EXTRACT)      # the eval's own rule, re-applied: scores stay EXTRACT's
        reports = {(backend, mode): json.loads(self.eval_path(backend, mode).read_text())
                   for backend in BACKENDS for _, mode in METHODS}
        results = {}
        for backend in BACKENDS:
            for label, mode in METHODS:
                rows = reports[backend, mode]["results"]
                spanish = [compose_data.is_spanish(r["prediction"]) for r in rows]
                exact = [extract(r["prediction"]) == r["reference"] for r in rows]
                results[f"{backend}/{mode}"] = {
                    "method": label, "backend": backend, "mode": mode, "examples": len(rows),
                    "exact": sum(exact) / len(rows),
                    "spanish": sum(spanish) / len(rows),
                    "both": sum(e and s for e, s in zip(exact, spanish)) / len(rows),
                    "seconds": reports[backend, mode]["seconds"]}
        # by operation, PyTorch: exact, and whether the right computation "a op b =" was written
        test = [json.loads(line) for line in (self.data / "test.jsonl").read_text().splitlines()]
        problems = [COMPUTATION.search(row["response"]).groups() for row in test]
        by_op = {}
        for mode in ("static", "dynamic"):
            rows = reports["torch", mode]["results"]
            for op in "+-*":
                mine = [(p, r) for p, r in zip(problems, rows) if p[1] == op]
                written = [COMPUTATION.search(r["prediction"]) for _, r in mine]
                by_op[f"{mode}/{op}"] = {
                    "examples": len(mine),
                    "exact": sum(extract(r["prediction"]) == r["reference"] for _, r in mine) / len(mine),
                    "computation": sum(w is not None and w.groups() == p for (p, _), w in zip(mine, written)) / len(mine)}
        static = json.loads((self.work / "gate-static" / "static.json").read_text())["weights"]
        # from the runs' own records (a step can span several invocations): the LoRAs and the
        # static runs train in parallel, so a step takes as long as its longest run; the evaluations
        # run one after another
        self.timings["loras"] = max(json.loads((self.work / f"lora-{n}" / "train.json").read_text())["seconds"]
                                    for n in ADAPTERS)
        self.timings["eval"] = sum(rep["seconds"] for rep in reports.values())
        self.timings["gates"] = json.loads((self.work / "gate-dynamic" / "run.json").read_text())["timings"]["total_s"] + max(
            json.loads((self.work / f"gate-static-lr{lr}" / "run.json").read_text())["timings"]["total_s"]
            for lr in STATIC_LRS)
        record = {"seed": self.seed, "threads": self.threads, "results": results, "by_operation": by_op,
                  "static_weights": static,
                  "timings_s": self.timings}
        (self.work / "results.json").write_text(json.dumps(record, indent=2) + "\n")

    # -- the table -------------------------------------------------------------------------------
    def table(self) -> str:
        rec = json.loads((self.work / "results.json").read_text())
        res = rec["results"]
        lines = ["| method | PyTorch exact | PyTorch in Spanish | PyTorch both | runtime Q4_1 exact | "
                 "runtime Q4_1 in Spanish | runtime Q4_1 both | exact: runtime - PyTorch |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, mode in METHODS:
            t, r = res[f"torch/{mode}"], res[f"runtime/{mode}"]
            lines.append(f"| {label} | {100 * t['exact']:.1f} | {100 * t['spanish']:.1f} | {100 * t['both']:.1f} | "
                         f"{100 * r['exact']:.1f} | {100 * r['spanish']:.1f} | {100 * r['both']:.1f} | "
                         f"{100 * (r['exact'] - t['exact']):+.1f} |")
        n = res["torch/dynamic"]["examples"]
        best_static = max(("average", "static"), key=lambda m: res[f"torch/{m}"]["exact"])
        gap = 100 * (res["torch/dynamic"]["exact"] - res[f"torch/{best_static}"]["exact"])
        w = rec["static_weights"]
        lines += ["", f"{n} test problems (seed {rec['seed']}); accuracies in %. Learned task-level static weights "
                  f"(lang, math): {', '.join(f'{x:.3f}' for x in w)}. LoRA-Flow minus the best static fusion "
                  f"({best_static}), PyTorch exact answer: {gap:+.1f} points."]
        lines += ["", "By operation (PyTorch): exact answer / the right computation written (`a op b =`):", "",
                  "| operation | test problems | static exact | static computation | LoRA-Flow exact | LoRA-Flow computation |",
                  "|---|---:|---:|---:|---:|---:|"]
        for op, name in (("+", "addition"), ("-", "subtraction"), ("*", "multiplication")):
            st, dy = rec["by_operation"][f"static/{op}"], rec["by_operation"][f"dynamic/{op}"]
            lines.append(f"| {name} | {st['examples']} | {100 * st['exact']:.1f} | {100 * st['computation']:.1f} | "
                         f"{100 * dy['exact']:.1f} | {100 * dy['computation']:.1f} |")
        t = rec["timings_s"]
        lines += ["", "Time per step on this machine (2 cores): " +
                  ", ".join(f"{s} {t[s] / 60:.1f} min" if t[s] >= 60 else f"{s} {t[s]:.0f} s"
                            for s in STEPS if s in t) + "."]
        return "\n".join(lines)

    def write_docs(self) -> None:
        doc = REPO / "docs" / "RESULTS.md"
        text = doc.read_text()
        a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
        doc.write_text(text[:a] + "\n" + self.table() + "\n" + text[b:])
        example = json.loads((self.data / "test.jsonl").read_text().splitlines()[0])
        run([bin_path("loraflow"), "trace", "-m", str(self.gguf), "-f", str(self.flow), "-p", example["prompt"],
             "-n", str(MAX_TOKENS), "-t", str(self.threads), "-o", str(REPO / "docs" / "compose-trace.png"),
             "--csv", str(self.work / "trace.csv"), "--title", "LoRA-Flow gates: Spanish LoRA vs math LoRA"], self.log)
        print(f"wrote {doc} and docs/compose-trace.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None,
                    help="work folder  [default: $LORAFLOW_CACHE/compose/seed-SEED]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="threads of the gate training and evaluation")
    ap.add_argument("--redo", choices=STEPS, default=None, help="redo this step and the ones after it")
    ap.add_argument("--docs", action="store_true", help="write the table into docs/RESULTS.md, draw the trace")
    args = ap.parse_args()
    if args.work is None:
        from loraflow.models import cache_dir

        args.work = cache_dir("compose", f"seed-{args.seed}")
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(args.work, args.seed, args.threads)
    redo = STEPS.index(args.redo) if args.redo else len(STEPS)
    for i, step in enumerate(STEPS):
        if i >= redo:
            recipe.clear(step)
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
