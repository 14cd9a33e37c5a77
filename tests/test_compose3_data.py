"""The compose3 recipe's data (recipes/compose3/data.py): the sizes the issue asks for, half
Spanish and half French, sets that do not overlap, test and held-out problems unseen in training,
held-out wordings in no other set, the Spanish and math LoRAs' data the very rows compose trains
them on, French that reads right, and the language metric."""

from __future__ import annotations


import pytest

from test_compose_data import wordings_of

from recipes.compose import data as compose
from recipes.compose3 import data as c3

MIXED = ("gate_train", "gate_dev", "test", "test_heldout")
TRAINING = ("gate_train", "gate_dev", "math_train")


@pytest.fixture(scope="module")
def sets():
    return c3.make_sets(seed=0)


def test_sizes_and_language_balance(sets):
    assert {name: len(rows) for name, rows in sets.items()} == c3.SIZES
    assert c3.SIZES["gate_train"] == 200 and c3.SIZES["gate_dev"] == 50 and c3.SIZES["test"] >= 300
    for name in MIXED:
        rows = sets[name]
        assert [r["lang"] for r in rows] == ["es", "fr"] * (len(rows) // 2)       # half each, alternating
        for code in ("es", "fr"):
            assert sets[f"{name}_{code}"] == [r for r in rows if r["lang"] == code]


def test_same_seed_same_sets(sets):
    assert c3.make_sets(seed=0) == sets
    assert c3.make_sets(seed=1)["test"] != sets["test"]


def test_spanish_and_math_loras_train_on_composes_data(sets):
    base = compose.make_sets(seed=0)
    assert sets["es_lang_train"] == base["lang_train"] and sets["math_train"] == base["math_train"]


def test_sets_are_disjoint_and_test_problems_unseen(sets):
    prompts = {name: {r["prompt"] for r in sets[name]} for name in (*MIXED, "fr_lang_train", "es_lang_train", "math_train")}
    names = list(prompts)
    for i, x in enumerate(names):
        assert len(prompts[x]) == len(sets[x]), f"{x} repeats a prompt"
        for y in names[i + 1:]:
            assert not prompts[x] & prompts[y], f"{x} and {y} share prompts"
    seen = set().union(*(compose.problem_pairs(sets[name]) for name in TRAINING))
    assert not seen & compose.problem_pairs(sets["test"])
    assert not seen & compose.problem_pairs(sets["test_heldout"])


def test_answers_are_right(sets):
    for name in MIXED:
        for row in sets[name]:
            a, op, b = compose.COMPUTATION.search(row["response"]).groups()
            c = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert f"= {c} " in row["response"] and row["answer"] == str(c) and a in row["prompt"] and b in row["prompt"]


def test_heldout_wordings_never_occur_in_training(sets):
    used = {"es": set(), "fr": set()}
    for name in MIXED:
        for row in sets[name]:
            lang = c3.LANGUAGES[row["lang"]]
            train, held = wordings_of(row["prompt"], lang.problems), wordings_of(row["prompt"], lang.heldout)
            if name == "test_heldout":
                assert not train and len(held) == 1, row
                used[row["lang"]] |= set(held)
            else:
                assert len(train) == 1 and not held, row
    assert used == {code: set(range(len(lang.heldout))) for code, lang in c3.LANGUAGES.items()}
    assert len(c3.FRENCH.heldout) == len(c3.FRENCH.problems) - 2 == 6      # two per operation
    assert not any(wordings_of(r["prompt"], c3.FRENCH.problems + c3.FRENCH.heldout) for r in sets["fr_lang_train"])


def test_language_metric(sets):
    for name in MIXED:                           # every reference answer reads as its problem's language
        for row in sets[name]:
            assert c3.language_of(row["response"]) == row["lang"], (name, row)
    for name in ("fr_lang_train", "es_lang_train"):
        # nearly every language row too; a few are too short to tell ("Baptiste a 21 tomates." has no
        # word that only French uses), and none reads as another language
        got = [c3.language_of(r["response"]) for r in sets[name]]
        assert got.count(name[:2]) > 0.95 * len(got) and set(got) <= {name[:2], None}, name
    assert all(c3.language_of(r["response"]) == "en" for r in sets["math_train"])
    assert c3.is_french("Il reste 12 - 7 = 5 pommes à Léa.") and not c3.is_spanish("Il reste 12 - 7 = 5 pommes à Léa.")
    assert c3.is_spanish("A Ana le quedan 12 - 7 = 5 manzanas.") and not c3.is_french("A Ana le quedan 12 - 7 = 5 manzanas.")
    assert c3.language_of("Léa has 12 + 7 = 19 apples now.") == "en"
    assert c3.language_of("12 + 7 = 19") is None and c3.language_of("Léa, Ana") is None


def test_french_grammar():
    egg, orange, apple = (next(t for t in c3.FR_THINGS if t[0] == w) for w in ("egg", "orange", "apple"))
    colour = {c[0]: c for c in c3.FR_COLOURS}
    place = {p[0]: p for p in c3.FR_PLACES}
    where = {w[0]: w for w in c3.FR_WHERE}
    assert c3._the(orange[4], c3._noun_phrase(orange, colour["red"], False)) == "l'orange rouge"
    assert c3._the(egg[4], c3._noun_phrase(egg, colour["new"], False)) == "le nouvel œuf"
    assert c3._the(orange[4], c3._noun_phrase(orange, colour["small"], False)) == "la petite orange"
    assert c3._noun_phrase(apple, colour["white"], True) == "pommes blanches"
    assert c3._noun_phrase(egg, colour["old"], True) == "vieux œufs"
    assert c3._place(where["next to"], place["garden"]) == "à côté du jardin"
    assert c3._place(where["next to"], place["school"]) == "à côté de l'école"
    assert c3._place(where["under"], place["table"]) == "sous la table"
    assert c3.FRENCH.fill(orange) == {"pl": "oranges", "de_pl": "d'oranges"}
