"""The compose3 recipe's data: recipes/compose's world and generator (recipes/compose/data.py)
with French added, seeded, no download.

    es_lang_train, math_train   compose's lang_train and math_train, the very same rows: the
                                Spanish and the math LoRA are compose's
    fr_lang_train               the French skill: English sentences translated into French, and
                                questions about a short French scene answered in French
    gate_train, gate_dev, test  word problems written in Spanish or in French (half each,
                                alternating; each row's "lang" says which), answered in the same
                                language with the computation and the result
    test_heldout                as test, only in the held-out wordings of both languages
    <set>_es, <set>_fr          the Spanish and the French half of each of those four (the
                                per-language static fusion trains on and is evaluated with them)

As in compose: the problem sets are disjoint, and no (operation, a, b) of test appears in any
training set (gate_train, gate_dev, math_train); test_heldout's (operation, a, b) appear in none
either, and its wordings in no other set.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recipes.compose import data as compose
from recipes.compose.data import (COLOURS, PLACES, THINGS, WHERE, Language, answer_language,
                                  draw_problems, language_tasks, problem_pairs, stream_rng, vocabularies)

FRENCH_NAMES = ["Léa", "Louis", "Chloé", "Jules", "Manon", "Lucas", "Camille", "Théo", "Zoé", "Nathan", "Jade", "Paul",
                "Marie", "Julien", "Sarah", "Pierre", "Claire", "Martin", "Juliette", "Baptiste", "Margot", "Victor",
                "Lucie", "Gabriel"]   # none starts with a vowel: "à Léa", "que Paul" need no elision
# aligned with compose's THINGS: (english, english plural, french, french plural, gender)
_FR_THINGS = [("pomme", "pommes", "f"), ("livre", "livres", "m"), ("crayon", "crayons", "m"),
              ("bonbon", "bonbons", "m"), ("biscuit", "biscuits", "m"), ("fleur", "fleurs", "f"),
              ("carte", "cartes", "f"), ("balle", "balles", "f"), ("orange", "oranges", "f"),
              ("pièce", "pièces", "f"), ("timbre", "timbres", "m"), ("œuf", "œufs", "m"),
              ("bouteille", "bouteilles", "f"), ("ballon", "ballons", "m"), ("jouet", "jouets", "m"),
              ("chemise", "chemises", "f"), ("cahier", "cahiers", "m"), ("banane", "bananes", "f"),
              ("fraise", "fraises", "f"), ("pierre", "pierres", "f"), ("gâteau", "gâteaux", "m"),
              ("chapeau", "chapeaux", "m"), ("tasse", "tasses", "f"), ("clé", "clés", "f"),
              ("coquillage", "coquillages", "m"), ("bille", "billes", "f"), ("citron", "citrons", "m"),
              ("tomate", "tomates", "f")]
FR_THINGS = [(t[0], t[1], *f) for t, f in zip(THINGS, _FR_THINGS, strict=True)]
# aligned with COLOURS: (english, m, f, m plural, f plural, before the noun, m before a vowel)
_FR_COLOURS = [("rouge", "rouge", "rouges", "rouges", False, "rouge"), ("bleu", "bleue", "bleus", "bleues", False, "bleu"),
               ("vert", "verte", "verts", "vertes", False, "vert"), ("jaune", "jaune", "jaunes", "jaunes", False, "jaune"),
               ("blanc", "blanche", "blancs", "blanches", False, "blanc"),
               ("noir", "noire", "noirs", "noires", False, "noir"), ("petit", "petite", "petits", "petites", True, "petit"),
               ("grand", "grande", "grands", "grandes", True, "grand"),
               ("nouveau", "nouvelle", "nouveaux", "nouvelles", True, "nouvel"),
               ("vieux", "vieille", "vieux", "vieilles", True, "vieil")]
FR_COLOURS = [(c[0], *f) for c, f in zip(COLOURS, _FR_COLOURS, strict=True)]
# aligned with PLACES: (english, french, gender, where a thing is "in" it: the scene's place)
_FR_PLACES = [("table", "f", "sur la table"), ("chaise", "f", "sur la chaise"), ("lit", "m", "sur le lit"),
              ("boîte", "f", "dans la boîte"), ("cuisine", "f", "dans la cuisine"), ("jardin", "m", "dans le jardin"),
              ("voiture", "f", "dans la voiture"), ("sac", "m", "dans le sac"), ("école", "f", "à l'école"),
              ("parc", "m", "au parc"), ("magasin", "m", "au magasin"), ("maison", "f", "à la maison")]
FR_PLACES = [(p[0], *f) for p, f in zip(PLACES, _FR_PLACES, strict=True)]
FR_WHERE = [(w[0], f) for w, f in zip(WHERE, ["sur", "sous", "dans", "à côté de"], strict=True)]

# the French word problems, one entry per wording, in compose's order of operations: (operation, prompt, answer)
FR_PROBLEMS = [
    ("+", "{n} a {a} {pl}. {n} achète {b} {pl} de plus. Combien {de_pl} a {n} maintenant ?",
          "{n} a {a} + {b} = {c} {pl} maintenant."),
    ("+", "{n} a {a} {pl} et {m} lui donne {b} {pl} de plus. Combien {de_pl} a {n} maintenant ?",
          "{n} a {a} + {b} = {c} {pl} maintenant."),
    ("+", "Il y a {a} {pl} dans une boîte. {n} met {b} {pl} de plus dans la boîte. "
          "Combien {de_pl} y a-t-il dans la boîte maintenant ?",
          "Il y a {a} + {b} = {c} {pl} dans la boîte maintenant."),
    ("-", "{n} a {a} {pl} et en donne {b} à {m}. Combien {de_pl} reste-t-il à {n} ?",
          "Il reste {a} - {b} = {c} {pl} à {n}."),
    ("-", "{n} avait {a} {pl}. {n} en a perdu {b}. Combien {de_pl} reste-t-il à {n} ?",
          "Il reste {a} - {b} = {c} {pl} à {n}."),
    ("-", "Il y a {a} {pl} dans une boîte. {n} sort {b} {pl} de la boîte. "
          "Combien {de_pl} y a-t-il dans la boîte maintenant ?",
          "Il y a {a} - {b} = {c} {pl} dans la boîte maintenant."),
    ("*", "{n} a {a} sacs avec {b} {pl} dans chaque sac. Combien {de_pl} a {n} en tout ?",
          "{n} a {a} * {b} = {c} {pl} en tout."),
    ("*", "{n} achète {a} paquets {de_pl}. Chaque paquet contient {b} {pl}. Combien {de_pl} achète {n} ?",
          "{n} achète {a} * {b} = {c} {pl}."),
]
# wordings that no training set uses (test_heldout), two per operation, as compose's HELDOUT_ES
HELDOUT_FR = [
    ("+", "{n} ramasse {a} {pl} le matin et {b} {pl} le soir. Combien {de_pl} ramasse {n} en tout ?",
          "{n} ramasse {a} + {b} = {c} {pl} en tout."),
    ("+", "Sur la table, il y a {a} {pl}. {m} apporte {b} {pl} de plus. Combien {de_pl} y a-t-il sur la table maintenant ?",
          "Il y a {a} + {b} = {c} {pl} sur la table maintenant."),
    ("-", "{n} a {a} {pl} et en vend {b} au marché. Combien {de_pl} reste-t-il à {n} ?",
          "Il reste {a} - {b} = {c} {pl} à {n}."),
    ("-", "Il y avait {a} {pl} sur la table. {m} en a pris {b}. Combien {de_pl} reste-t-il sur la table ?",
          "Il reste {a} - {b} = {c} {pl} sur la table."),
    ("*", "Dans un magasin, il y a {a} caisses et chaque caisse contient {b} {pl}. Combien {de_pl} y a-t-il dans le magasin ?",
          "Il y a {a} * {b} = {c} {pl} dans le magasin."),
    ("*", "{n} prépare {a} assiettes avec {b} {pl} sur chaque assiette. Combien {de_pl} utilise {n} ?",
          "{n} utilise {a} * {b} = {c} {pl}."),
]


# -- French grammar, as much as the templates need --------------------------------------------------

def _vowel(word: str) -> bool:
    return word[0] in "aeiouyàâéèêîïôœ"


def _de(words: str) -> str:
    return f"d'{words}" if _vowel(words) else f"de {words}"


def _the(gender: str, words: str) -> str:
    """The definite singular: la pomme, le livre, l'orange, le nouvel œuf."""
    return f"l'{words}" if _vowel(words) else f"{'le' if gender == 'm' else 'la'} {words}"


def _noun_phrase(t, colour, plural: bool) -> str:
    """The thing with the colour (or size, age) agreeing, before or after the noun as French puts it."""
    noun, gender = t[3] if plural else t[2], t[4]
    _, m, f, m_pl, f_pl, before, m_vowel = colour
    if plural:
        adj = m_pl if gender == "m" else f_pl
    else:
        adj = (m_vowel if before and _vowel(noun) else m) if gender == "m" else f
    return f"{adj} {noun}" if before else f"{noun} {adj}"


def _place(where, place) -> str:
    the = _the(place[2], place[1])
    if where[1] == "à côté de" and the.startswith("le "):
        return f"à côté du {place[1]}"
    return f"{where[1]} {the}"


def _capital(s: str) -> str:
    return s[0].upper() + s[1:]


def _french_sentence(kind, n, m, x, t, colour, where, place) -> str:
    return (f"{n} a {x} {t[3]}.", f"{n} achète {x} {_noun_phrase(t, colour, True)}.", f"{n} donne {x} {t[3]} à {m}.",
            f"{_capital(_the(t[4], _noun_phrase(t, colour, False)))} est {_place(where, place)}.",
            f"Il y a {x} {t[3]} {_place(where, place)}.", f"Combien {_de(t[3])} a {n} ?",
            f"{n} a perdu {x} {t[3]} {place[3]}.")[kind]


def _french_scene(kind, n, x, t1, m, y, t2, place) -> tuple[str, str]:
    scene = f"{n} a {x} {t1[3]} et {m} a {y} {t2[3]} {place[3]}."
    if kind == 0:
        return f"{scene} Combien {_de(t1[3])} a {n} ?", f"{n} a {x} {t1[3]}."
    if kind == 1:
        return f"{scene} Qu'est-ce que {m} a ?", f"{m} a {y} {t2[3]}."
    return f"{scene} Où sont les {t2[3]} de {m} ?", f"Les {t2[3]} de {m} sont {place[3]}."


FRENCH = Language(
    code="fr", name="French", names=FRENCH_NAMES, things=FR_THINGS, colours=FR_COLOURS, places=FR_PLACES,
    where=FR_WHERE, problems=FR_PROBLEMS, heldout=HELDOUT_FR, fill=lambda t: {"pl": t[3], "de_pl": _de(t[3])},
    lexicon=" ".join([t[2] + " " + t[3] for t in FR_THINGS] + [" ".join(c[1:5]) for c in FR_COLOURS]
                     + [p[1] + " " + p[3] for p in FR_PLACES] + [w[1] for w in FR_WHERE]
                     + ["le la les l un une et a il y est de du d à au sont où qu que ce maintenant reste combien"]),
    sentence=_french_sentence, scene=_french_scene)
LANGUAGES = {"es": compose.SPANISH, "fr": FRENCH}

# -- the language of an answer ------------------------------------------------------------------

WORD = r"[a-zàâäçéèêëîïôöûùüÿñæœáíóú]+"      # the letters of English, Spanish and French
VOCABULARY = vocabularies([compose.SPANISH, FRENCH, compose.ENGLISH], WORD, heldout=True)


def language_of(text: str) -> str | None:
    """"es", "fr", "en": the language with the most words of its own in an answer (None: no clear one)."""
    return answer_language(text, VOCABULARY, WORD)


def is_french(text: str) -> bool:
    return language_of(text) == "fr"


def is_spanish(text: str) -> bool:
    """Spanish against French and English (compose's is_spanish weighs Spanish against English only)."""
    return language_of(text) == "es"


# -- the sets ------------------------------------------------------------------------------------

HALVED = ("gate_train", "gate_dev", "test", "test_heldout")
MIXED_SIZES = {"gate_train": 200, "gate_dev": 50, "test": 300, "test_heldout": 200}    # half Spanish, half French
SIZES = {"es_lang_train": compose.SIZES["lang_train"], "fr_lang_train": 1000, "math_train": compose.SIZES["math_train"],
         **{f"{s}{half}": MIXED_SIZES[s] // (2 if half else 1) for s in HALVED for half in ("", "_es", "_fr")}}


def _mixed(rng, n: int, prompts: set, pairs=None, avoid=None, heldout: bool = False) -> dict[str, list[dict]]:
    """n problems, n/2 in each language, alternating (Spanish first), each row with its "lang"; and
    the two halves."""
    halves = {}
    for code, lang in LANGUAGES.items():
        rows = draw_problems(rng, lang, n // 2, prompts, pairs, avoid, lang.heldout if heldout else None)
        halves[code] = [{**r, "lang": code} for r in rows]
    mixed = [r for pair in zip(halves["es"], halves["fr"], strict=True) for r in pair]
    return {"": mixed, "_es": halves["es"], "_fr": halves["fr"]}


def make_sets(seed: int = 0) -> dict[str, list[dict]]:
    base = compose.make_sets(seed)
    sets = {"es_lang_train": base["lang_train"], "math_train": base["math_train"]}
    math_pairs, test_pairs, train_pairs, prompts = problem_pairs(base["math_train"]), set(), set(), set()
    rng = stream_rng(seed, "compose3")
    parts = {"test": _mixed(rng, MIXED_SIZES["test"], prompts, test_pairs, avoid=math_pairs)}
    for name in ("gate_train", "gate_dev"):
        parts[name] = _mixed(rng, MIXED_SIZES[name], prompts, train_pairs, avoid=test_pairs)
    sets["fr_lang_train"] = language_tasks(rng, FRENCH, SIZES["fr_lang_train"])
    parts["test_heldout"] = _mixed(stream_rng(seed, "compose3-heldout"), MIXED_SIZES["test_heldout"], prompts,
                                   avoid=train_pairs | math_pairs, heldout=True)
    for name, halves in parts.items():
        for half, rows in halves.items():
            sets[f"{name}{half}"] = rows
    return {name: sets[name] for name in SIZES}


def write_sets(out_dir, seed: int = 0) -> dict[str, Path]:
    return compose.write_sets(out_dir, seed, make_sets)


if __name__ == "__main__":
    for name, path in write_sets(sys.argv[1] if len(sys.argv) > 1 else "compose3-data").items():
        print(name, path)
