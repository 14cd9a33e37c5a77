"""The compose recipe's data (recipes/compose/data.py): the sizes the issue asks for, sets that
do not overlap, the same sets for the same seed (and the very sets the committed results were
computed on), held-out wordings that no training set uses, answers that are right, and the
language check that docs/RESULTS.md reports."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from recipes.compose import data as compose


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
    for name in ("math_train", "gate_train", "gate_dev", "test", "test_heldout"):
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
    assert not seen & {_problem(r)[:3] for r in sets["test_heldout"]}


def test_languages_of_the_sets(sets):
    assert all(compose.is_spanish(r["response"])
               for r in sets["test"] + sets["test_heldout"] + sets["gate_train"] + sets["lang_train"])
    assert not any(compose.is_spanish(r["response"]) for r in sets["math_train"])
    assert not compose.is_spanish("Ana has 12 + 7 = 19 apples now.")
    assert not compose.is_spanish("12 + 7 = 19")
    assert compose.is_spanish("A Ana le quedan 12 - 7 = 5 manzanas.")


# sha256 of each jsonl file write_sets(seed=0) writes, taken from the generator as it was when
# docs/RESULTS.md's compose table was computed (before the held-out set and the Language refactor)
COMMITTED_SETS = {
    "test": "1874886d67daab3e1c62fa4e17c217ef42ff956725bb1921e29c051537f4e84b",
    "gate_train": "734264fec6e3362b42b00bd8f2c5be87d6a40d9fa0f54f92716b58cf79f4cfd0",
    "gate_dev": "5f6bc978d4e16d92f5820fcfb25d217a0b59550453dc73aeca823ba46387c32c",
    "math_train": "e475d065b9f25e23e5064fd82ef76251652174c6d066c3f37c9c60b29ee656d4",
    "lang_train": "eff97ae24601e7088c457e21076b4fed3e61308868d4be097648e2c1c78f1769",
}


def test_the_committed_results_sets_are_unchanged(tmp_path):
    paths = compose.write_sets(tmp_path, seed=0)
    assert {name: hashlib.sha256(paths[name].read_bytes()).hexdigest() for name in COMMITTED_SETS} == COMMITTED_SETS
    assert json.loads(paths["test_heldout"].read_text().splitlines()[0])["prompt"]


def wording_pattern(template: str) -> re.Pattern:
    """A template ("{n} tiene {a} {es}...") as a regex that matches exactly the texts it writes."""
    return re.compile("".join(".+?" if part.startswith("{") else re.escape(part)
                              for part in re.split(r"(\{\w+\})", template)))


def wordings_of(text: str, wordings, side: int = 1) -> list[int]:
    return [i for i, w in enumerate(wordings) if wording_pattern(w[side]).fullmatch(text)]


def test_heldout_wordings_never_occur_in_training(sets):
    training, heldout = compose.SPANISH.problems, compose.SPANISH.heldout
    assert [op for op, _, _ in heldout].count("+") == [op for op, _, _ in heldout].count("-") == 2
    for name in ("gate_train", "gate_dev", "test"):
        for row in sets[name]:
            assert len(wordings_of(row["prompt"], training)) == 1 and not wordings_of(row["prompt"], heldout), row
    used = set()
    for row in sets["test_heldout"]:
        assert not wordings_of(row["prompt"], training), row
        (i,) = wordings_of(row["prompt"], heldout)
        assert wordings_of(row["response"], heldout, side=2) != []
        used.add(i)
    assert used == set(range(len(heldout)))                 # every held-out wording is tested
    english = compose.ENGLISH.problems
    assert all(len(wordings_of(r["prompt"], english)) == 1 for r in sets["math_train"])
    # the language data has no word problem at all, in any wording
    assert not any(wordings_of(r["prompt"], training + heldout) for r in sets["lang_train"])
