"""The compose3 recipe: three LoRAs at once. A Spanish, a French and a math LoRA on
SmolLM2-135M-Instruct, fused by one LoRA-Flow gate (k = 3) for arithmetic word problems written in
Spanish or in French (half each, mixed), against the baselines, in PyTorch and in the runtime.

    .venv/bin/python -m recipes.compose3.run [--work DIR] [--seed 0] [--docs] [--compose-work DIR] [--f32-check]

The steps are recipes/compose's (its Recipe, subclassed here), with:
    data      recipes/compose3/data.py: compose's language and math sets, French ones, mixed problems
    loras     es, fr, math; es and math are compose's (the same data and seed): copied from compose's
              work folder when it has them (--compose-work), else trained here as compose trains them
              (and compose copies them from here in turn)
    gates     the gate (dynamic, on the mixed set), the task-level static weights (mixed set), and
              the per-language static weights (the Spanish and the French half)
    eval      eight methods x two backends on the mixed test set; the per-language oracle static
              evaluates each language's half with that language's static weights
    heldout   static, oracle and LoRA-Flow on test_heldout (wordings no training set uses)
    f32       with --f32-check only, as in compose: eval's runtime evaluations on an F32 GGUF of the base
    report    the tables, results.json; --docs writes them into docs/RESULTS.md (a compose3 section,
              added at the end if missing) and draws docs/compose3-gates.png and a trace of one
              Spanish and one French test problem
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

from recipes.compose import run as compose
from recipes.compose.run import BACKENDS, percent, read_jsonl
from recipes.compose3 import data as compose3_data

LANGUAGES = {"es": "Spanish", "fr": "French"}


class Recipe(compose.Recipe):
    name = "compose3"
    data = compose3_data
    ADAPTERS = {"es": "es_lang_train", "fr": "fr_lang_train", "math": "math_train"}
    SHARED_LORAS = ("compose", {"es": "lang", "math": "math"})      # compose's Spanish and math LoRAs
    METHODS = [("base model", "off"), ("Spanish LoRA alone", "single:es"), ("French LoRA alone", "single:fr"),
               ("math LoRA alone", "single:math"), ("average (1/3 each)", "average"),
               ("task-level static (learned on the mixed set)", "static"),
               ("per-language oracle static", "oracle"), ("LoRA-Flow (one gate, k = 3)", "dynamic")]
    HELDOUT_METHODS = ("static", "oracle", "dynamic")
    STATIC = {"static": ("gate_train", "gate_dev"), "static-es": ("gate_train_es", "gate_dev_es"),
              "static-fr": ("gate_train_fr", "gate_dev_fr")}
    MARKERS = ("<!-- compose3:begin -->", "<!-- compose3:end -->")

    def method_jobs(self, step: str, mode: str) -> list[tuple[str, list]]:
        if mode != "oracle":
            return super().method_jobs(step, mode)
        # each language's half with that language's static weights
        data = self.test_set(step)
        return [(f"{backend}-oracle-{code}.json", [backend, "static", f"{data}_{code}", f"static-{code}"])
                for backend in BACKENDS for code in LANGUAGES]

    def results_of(self, step: str, backend: str, mode: str) -> tuple[list[dict], list[dict]]:
        if mode != "oracle":
            return super().results_of(step, backend, mode)
        folder, data = self.outputs(step)[0], self.test_set(step)
        problems, results = [], []
        for code in LANGUAGES:
            problems += read_jsonl(self.data_dir / f"{data}_{code}.jsonl")
            results += json.loads((folder / f"{backend}-oracle-{code}.json").read_text())["results"]
        return problems, results

    def in_language(self, problem: dict, row: dict) -> bool:
        return compose3_data.language_of(row["prediction"]) == problem["lang"]

    def scores(self, problems: list[dict], rows: list[dict]) -> dict:
        out = super().scores(problems, rows)
        for code in LANGUAGES:       # each language's problems apart
            mine = [i for i, p in enumerate(problems) if p["lang"] == code]
            out[code] = super().scores([problems[i] for i in mine], [rows[i] for i in mine])
        return out

    def static_weights(self) -> dict:
        return {s: json.loads((self.work / f"gate-{s}" / "static.json").read_text())["weights"] for s in self.STATIC}

    def table(self) -> str:
        rec = json.loads((self.work / "results.json").read_text())
        res = rec["results"]
        lines = self.method_table(res, self.METHODS, language="in-language")
        t = {m: res[f"torch/{m}"] for _, m in self.METHODS}
        worst = {b: max(abs(res[f"{b}/{m}"]["exact"] - t[m]["exact"]) for _, m in self.METHODS)
                 for b in ("runtime", "f32") if f"{b}/dynamic" in res}
        names = ", ".join(self.ADAPTERS)
        weights = "; ".join(f"{s}: " + ", ".join(f"{x:.3f}" for x in w) for s, w in rec["static_weights"].items())
        lines += ["", f"{t['dynamic']['examples']} test problems (half Spanish, half French; seed {rec['seed']}); "
                  f"accuracies in %; in-language: the answer is in the problem's language. Learned static weights "
                  f"({names}): {weights}.", "",
                  "Targets (issue 15), PyTorch exact answer: LoRA-Flow minus task-level static "
                  f"{100 * (t['dynamic']['exact'] - t['static']['exact']):+.1f} points (target +5), minus the "
                  f"per-language oracle static {100 * (t['dynamic']['exact'] - t['oracle']['exact']):+.1f} (target >= 0); "
                  f"LoRA-Flow in-language {percent(t['dynamic']['language'])}% (target 95); the runtime within "
                  f"{100 * worst['runtime']:.1f} points of PyTorch for every method (target 2)"
                  + (f"; on an F32 GGUF of the base, within {100 * worst['f32']:.1f}." if "f32" in worst else "."), "",
                  "The runtime against PyTorch, problem by problem:", "", *self.backend_table(res), "",
                  "By the problem's language (PyTorch): exact answer / in-language:", "",
                  "| method | Spanish exact | Spanish in Spanish | French exact | French in French |",
                  "|---|---:|---:|---:|---:|"]
        for label, mode in self.METHODS:
            es, fr = t[mode]["es"], t[mode]["fr"]
            lines.append(f"| {label} | {percent(es['exact'])} | {percent(es['language'])} | "
                         f"{percent(fr['exact'])} | {percent(fr['language'])} |")
        lines += ["", "By operation (PyTorch): exact answer / the right computation written (`a op b =`):", "",
                  *self.operation_table(rec["by_operation"])]
        held = [m for m in self.METHODS if m[1] in self.HELDOUT_METHODS]
        h = {m: res[f"torch/{m}/heldout"] for m in self.HELDOUT_METHODS}
        lines += ["", f"Held-out wordings (`test_heldout`: {h['dynamic']['examples']} problems, half in each language, "
                  f"in wordings that no training set uses, two per operation and language; (operation, a, b) unseen "
                  "too; nothing was tuned on them):", "", *self.method_table(res, held, "/heldout", "in-language"),
                  "", f"On held-out wordings, PyTorch exact answer: LoRA-Flow minus static "
                  f"{100 * (h['dynamic']['exact'] - h['static']['exact']):+.1f} points, minus the oracle static "
                  f"{100 * (h['dynamic']['exact'] - h['oracle']['exact']):+.1f}; Spanish / French problems: LoRA-Flow "
                  f"{percent(h['dynamic']['es']['exact'])} / {percent(h['dynamic']['fr']['exact'])}, static "
                  f"{percent(h['static']['es']['exact'])} / {percent(h['static']['fr']['exact'])}."]
        lines += ["", self.timing_line(rec)]
        return "\n".join(lines)

    def write_docs(self) -> None:
        doc = self.docs / "RESULTS.md"
        begin, end = self.MARKERS
        if begin not in doc.read_text():
            with open(doc, "a") as f:
                f.write(f"\n## Three LoRAs at once: Spanish, French and math (compose3)\n\n{begin}\n{end}\n")
        compose.replace_between(doc, begin, end, self.table())
        test = read_jsonl(self.data_dir / "test.jsonl")
        for code, language in LANGUAGES.items():
            example = next(r for r in test if r["lang"] == code)
            self.trace_doc(example["prompt"], f"compose3-trace-{code}.png",
                           f"LoRA-Flow gates (k = 3) on a {language} test problem", f"trace-{code}.csv")
        groups = {f"{language} problems": [i for i, r in enumerate(test) if r["lang"] == code]
                  for code, language in LANGUAGES.items()}
        self.gate_figure(groups, "compose3-gates.png", "LoRA-Flow gates (k = 3) over the test problems")
        print(f"wrote {doc}, docs/compose3-gates.png, docs/compose3-trace-es.png and docs/compose3-trace-fr.png")


if __name__ == "__main__":
    compose.main(Recipe, __doc__)
