"""recipes/compose and recipes/compose3 end to end on a tiny random model: every step (data, LoRAs,
gates, flow file, evaluations in PyTorch and in the runtime, held-out wordings, report), the
tables, the docs section and the figures; compose3 reusing compose's Spanish and math LoRAs, and
compose reusing compose3's. The sets are shrunk and the commands run in this process (the real runs
take hours: docs/RESULTS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")


from click.testing import CliRunner

from recipes.compose import data as compose_data
from recipes.compose import run as compose_run
from recipes.compose import train_lora
from recipes.compose3 import data as compose3_data
from recipes.compose3 import run as compose3_run


def run_here(cmd: list[str], log) -> None:
    """compose_run.run, in this process: the CLIs through click, train_lora as a function."""
    from loraflow.cli import main as loraflow_main
    from loraflow.converter.cli import main as convert_main

    if cmd[1:3] == ["-m", "recipes.compose.train_lora"]:
        opts = dict(zip(cmd[3::2], cmd[4::2]))
        train_lora.train_lora(opts["--base"], opts["--data"], opts["--out"], seed=int(opts["--seed"]), threads=1)
        return
    cli = {"loraflow": loraflow_main, "loraflow-convert": convert_main}[Path(cmd[0]).name]
    result = CliRunner().invoke(cli, cmd[1:], catch_exceptions=False)
    assert result.exit_code == 0, (cmd, result.output)


def run_all_here(jobs, n) -> None:
    for cmd, log in jobs:
        run_here(cmd, log)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fixtures import convert_tiny_base, make_tiny_model

    root = tmp_path_factory.mktemp("recipe-model")
    hf = make_tiny_model("llama", root / "hf")
    return hf, convert_tiny_base(hf, root / "model-f32.gguf")


def tiny_recipe(module, tiny, docs: Path):
    hf, gguf = tiny

    class Tiny(module.Recipe):
        def __init__(self, *args):
            super().__init__(*args)
            self.gguf = gguf

        def step_base(self):
            (self.work / "base-hf.txt").write_text(f"{hf}\n")

    Tiny.docs = docs
    return Tiny


def run_recipe(recipe_class, monkeypatch, *args) -> None:
    monkeypatch.setattr(sys, "argv", ["run.py", "--threads", "1", "--docs", *map(str, args)])
    compose_run.main(recipe_class)


def test_compose_and_compose3_end_to_end(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compose_run, "run", run_here)
    monkeypatch.setattr(compose_run, "run_parallel", run_all_here)
    for name, n in (("lang_train", 24), ("math_train", 24), ("gate_train", 8), ("gate_dev", 4), ("test", 8),
                    ("test_heldout", 6)):
        monkeypatch.setitem(compose_data.SIZES, name, n)
    for name, n in (("gate_train", 8), ("gate_dev", 4), ("test", 8), ("test_heldout", 4)):
        monkeypatch.setitem(compose3_data.MIXED_SIZES, name, n)
    monkeypatch.setitem(compose3_data.SIZES, "fr_lang_train", 24)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# Results\n\n<!-- compose:begin -->\nold\n<!-- compose:end -->\n\nafter\n")

    compose_work = tmp_path / "compose"
    run_recipe(tiny_recipe(compose_run, tiny, docs), monkeypatch, "--work", compose_work,
               "--compose3-work", tmp_path / "no-compose3", "--f32-check")      # nothing to reuse: all trained here
    results = json.loads((compose_work / "results.json").read_text())["results"]
    assert {f"{b}/{m}" for b in ("torch", "runtime", "f32") for m in ("static", "dynamic")} <= set(results)
    assert results["torch/dynamic/heldout"]["examples"] == 6 and results["torch/off"]["examples"] == 8
    # the runtime on an F32 GGUF of the weights PyTorch runs gives PyTorch's answers, text for text
    f32 = [results[f"f32/{m}"]["vs_torch"] for _, m in compose_run.Recipe.METHODS]
    assert len(f32) == 6 and all(v == {"only_torch": 0, "only_runtime": 0, "text_differs": 0} for v in f32), f32
    assert not (compose_work / "base-f32.gguf").exists()
    text = (docs / "RESULTS.md").read_text()
    assert "old" not in text and text.endswith("after\n") and "Held-out wordings (`test_heldout`: 6 problems" in text
    assert "F32: answers differing in text" in text and "F32 runtime, all its rows together: 0 answers right only" in text
    for png in ("compose-trace.png", "compose-gates.png"):
        assert (docs / png).stat().st_size > 1000
    means = json.loads((compose_work / "compose-gates.json").read_text())
    assert means["adapters"] == ["lang", "math"] and len(means["groups"]["all"]["mean"]) == 2   # 2 layers

    work3 = tmp_path / "compose3"
    run_recipe(tiny_recipe(compose3_run, tiny, docs), monkeypatch, "--work", work3, "--compose-work", compose_work)
    out = capsys.readouterr().out
    assert "compose's lora-lang (the same data and seed)" in out and "compose's lora-math" in out
    for mine, theirs in (("es", "lang"), ("math", "math")):        # reused, not retrained
        assert (work3 / f"lora-{mine}" / "adapter_model.safetensors").read_bytes() == \
            (compose_work / f"lora-{theirs}" / "adapter_model.safetensors").read_bytes()
    assert (work3 / "lora-fr" / "train.json").is_file()
    rec = json.loads((work3 / "results.json").read_text())
    assert set(rec["static_weights"]) == {"static", "static-es", "static-fr"}
    assert all(len(w) == 3 for w in rec["static_weights"].values())
    r = rec["results"]
    assert r["torch/oracle"]["examples"] == 8 and r["torch/oracle"]["es"]["examples"] == 4
    assert not any(k.startswith("f32/") for k in r) and not (work3 / "eval-f32").exists()     # no --f32-check
    v = r["runtime/oracle"]["vs_torch"]
    assert 0 <= v["only_torch"] + v["only_runtime"] <= v["text_differs"] <= 8
    assert r["runtime/dynamic/heldout"]["examples"] == 4
    text = (docs / "RESULTS.md").read_text()
    assert "<!-- compose3:begin -->" in text and "per-language oracle static" in text and "Targets (issue 15)" in text
    for png in ("compose3-gates.png", "compose3-trace-es.png", "compose3-trace-fr.png"):
        assert (docs / png).stat().st_size > 1000
    groups = json.loads((work3 / "compose3-gates.json").read_text())["groups"]
    assert set(groups) == {"Spanish problems", "French problems"}

    # the other way round: compose in a new folder takes both its LoRAs from compose3's work folder
    again = tiny_recipe(compose_run, tiny, docs)(tmp_path / "again", 0, 1)
    again.shared_work = work3
    again.step_data()
    trained = []
    monkeypatch.setattr(again, "train_loras", trained.extend)
    again.step_loras()
    assert trained == []
    for mine, theirs in (("lang", "es"), ("math", "math")):
        assert (again.lora_dir(mine) / "adapter_model.safetensors").read_bytes() == \
            (work3 / f"lora-{theirs}" / "adapter_model.safetensors").read_bytes()
    # a LoRA trained on other data is not taken: the file compose3's math LoRA was trained on, changed
    Path(json.loads((work3 / "lora-math" / "train.json").read_text())["data"]).write_text("{}\n")
    other = tiny_recipe(compose_run, tiny, docs)(tmp_path / "other", 0, 1)
    other.shared_work = work3
    other.step_data()
    monkeypatch.setattr(other, "train_loras", trained.extend)
    other.step_loras()
    assert trained == ["math"] and other.lora_dir("lang").is_dir()


def test_paired_counts_and_sign_test():
    rows = lambda preds: [{"prediction": p, "reference": "4"} for p in preds]   # noqa: E731
    torch_rows, runtime_rows = rows(["2 + 2 = 4", "2 + 2 = 4.", "1 = 3", "x = 5"]), rows(["2 + 2 = 4", "2 + 2 = 5", "1 = 4", "y = 5"])
    assert compose_run.paired(torch_rows, runtime_rows) == {"only_torch": 1, "only_runtime": 1, "text_differs": 3}
    with pytest.raises(ValueError):
        compose_run.paired(torch_rows, runtime_rows[:3])
    # 9 to 1: 2 * (C(10,0) + C(10,1)) / 2^10
    assert compose_run.sign_test(9, 1) == pytest.approx(22 / 1024) == compose_run.sign_test(1, 9)
    assert compose_run.sign_test(5, 5) == 1.0 and compose_run.sign_test(0, 0) == 1.0
    assert compose_run.sign_test(6, 0) == pytest.approx(2 / 64)
