"""The compose recipe's data (recipes/compose/data.py): the sizes the issue asks for, sets that
do not overlap, the same sets for the same seed, answers that are right, and the language check
that docs/RESULTS.md reports."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "compose"))

import data as compose  # noqa: E402


@pytest.fixture(scope="module")
def sets():
    return compose.make_sets(seed=0)


def test_sizes(sets):
    assert {name: len(rows) for name, rows in sets.items()} == compose.SIZES
    assert compose.SIZES["gate_train"] == 200 and compose.SIZES["test"] >= 300


def test_same_seed_same_sets_other_seed_other_sets(sets):
    assert compose.make_sets(seed=0) == sets
    assert compose.make_sets(seed=1)["test"] != sets["test"]


def _problem(row) -> tuple:
    a, op, b, c = re.search(r"(\d+) ([-+*]) (\d+) = (\d+)", row["response"]).groups()
    return op, int(a), int(b), int(c)


def test_answers_are_right(sets):
    for name in ("math_train", "gate_train", "gate_dev", "test"):
        for row in sets[name]:
            op, a, b, c = _problem(row)
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op] and row["answer"] == str(c)
            assert f"{a}" in row["prompt"] and f"{b}" in row["prompt"]


def test_sets_are_disjoint_and_test_problems_unseen(sets):
    prompts = {name: {r["prompt"] for r in rows} for name, rows in sets.items()}
    names = list(prompts)
    for i, x in enumerate(names):
        assert len(prompts[x]) == len(sets[x]), f"{x} repeats a prompt"
        for y in names[i + 1:]:
            assert not prompts[x] & prompts[y], f"{x} and {y} share prompts"
    seen = {_problem(r)[:3] for name in ("math_train", "gate_train", "gate_dev") for r in sets[name]}
    assert not seen & {_problem(r)[:3] for r in sets["test"]}


def test_languages_of_the_sets(sets):
    assert all(compose.is_spanish(r["response"]) for r in sets["test"] + sets["gate_train"] + sets["lang_train"])
    assert not any(compose.is_spanish(r["response"]) for r in sets["math_train"])
    assert not compose.is_spanish("Ana has 12 + 7 = 19 apples now.")
    assert not compose.is_spanish("12 + 7 = 19")
    assert compose.is_spanish("A Ana le quedan 12 - 7 = 5 manzanas.")
