"""The layout the design asks for: loraflow/ (schema, errors, readers, the assembling CLI) imports
nothing of the parts above it (converter, runtime, gate_training); each part owns its commands;
the library layer sits below the front doors (no module of gate_training, recipes or benchmarks
imports a CLI module or a recipe script); private llama-cpp-python attributes are read in one
module; nothing edits sys.path."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "loraflow"
ABOVE = ("loraflow.converter", "loraflow.runtime", "loraflow.gate_training")
FRONT_DOORS = ("loraflow.cli", "loraflow.runtime.cli", "loraflow.gate_training.cli", "loraflow.converter.cli",
               "recipes.compose.run", "recipes.compose3.run")
SOURCES = [p for folder in ("loraflow", "runtime", "converter", "gate_training", "recipes", "benchmarks", "tests")
           for p in sorted((REPO / folder).rglob("*.py"))]


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            yield node.lineno, name


def test_core_imports_nothing_above_it():
    found = [f"{path.name}:{line} imports {n}" for path in sorted(CORE.glob("*.py"))
             for line, n in imports(path) if n.startswith(ABOVE)]
    assert found == []


def test_library_below_front_doors():
    found = [f"{path.relative_to(REPO)}:{line} imports {n}"
             for folder in ("gate_training", "recipes", "benchmarks") for path in sorted((REPO / folder).rglob("*.py"))
             for line, n in imports(path) if n in FRONT_DOORS and not (folder == "recipes" and n.startswith("recipes."))]
    assert found == [], "the library layer is loraflow.runtime.loading, .prompts, .sampling, ..."


def test_private_llama_cpp_attributes_in_one_module():
    private = re.compile(r"\._(ctx|model|lib|logits_all|stack|batch)\b|_internals")
    found = [f"{path.relative_to(REPO)}:{i}" for path in SOURCES if path.name not in ("llama_api.py", "test_llama_api.py", "test_layout.py")
             for i, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert found == [], "read llama-cpp-python's private attributes through loraflow.runtime.llama_api"


def test_nothing_edits_sys_path():
    found = [str(path.relative_to(REPO)) for path in SOURCES if path.name != "test_layout.py"
             and "sys.path." + "insert" in path.read_text()]
    assert found == []


def test_every_command_is_assembled_from_its_part():
    from click.testing import CliRunner

    from loraflow.cli import COMMANDS, main

    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0, res.output
    for name, module in COMMANDS.items():
        assert module.startswith(ABOVE) and name in res.output
        assert CliRunner().invoke(main, [name, "--help"]).exit_code == 0, name
