"""The layout the design asks for: loraflow/ (schema, errors, readers, the assembling CLI) imports
nothing of the parts above it (converter, runtime, gate_training); each part owns its commands."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "loraflow"
ABOVE = ("loraflow.converter", "loraflow.runtime", "loraflow.gate_training")


def test_core_imports_nothing_above_it():
    found = []
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.startswith(ABOVE)]
    assert found == []


def test_every_command_is_assembled_from_its_part():
    from click.testing import CliRunner

    from loraflow.cli import COMMANDS, main

    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0, res.output
    for name, module in COMMANDS.items():
        assert module.startswith(ABOVE) and name in res.output
        assert CliRunner().invoke(main, [name, "--help"]).exit_code == 0, name
