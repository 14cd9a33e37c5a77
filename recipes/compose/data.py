"""The compose recipe's data, generated from templates with a fixed seed (no download).

Three tasks over one small world of people, things and numbers:
    lang      the language skill: English sentences translated into Spanish, and questions about a
              short Spanish scene answered in Spanish (numbers are copied, never computed)
    math      the math skill: English word problems answered with the computation and the result,
              "Tom has 12 + 7 = 19 apples now."
    compose   both at once: the word problems written in Spanish, answered in Spanish with the
              computation and the result, "Ana tiene 12 + 7 = 19 manzanas ahora."
The compose problems of the gate, dev and test sets are disjoint from each other, and no
(operation, a, b) of the test set appears in any training set (math, gate or dev).
`test_heldout` is written only in wordings that no other set uses (HELDOUT_ES: two per
operation), its (operation, a, b) outside every training set too; it is drawn from a random
stream of its own, after the others, so the other sets are what they were before it existed.

The generator takes a Language (its words, wordings and grammar): recipes/compose3 adds French.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

NAMES = ["Ana", "Luis", "María", "Carlos", "Sofía", "Pedro", "Lucía", "Diego", "Elena", "Jorge", "Marta", "Pablo",
         "Laura", "Javier", "Carmen", "Miguel", "Isabel", "Andrés", "Paula", "Raúl", "Tom", "Emma", "Sam", "Lily"]
# english singular, english plural, spanish singular, spanish plural, spanish gender
THINGS = [
    ("apple", "apples", "manzana", "manzanas", "f"), ("book", "books", "libro", "libros", "m"),
    ("pencil", "pencils", "lápiz", "lápices", "m"), ("candy", "candies", "caramelo", "caramelos", "m"),
    ("cookie", "cookies", "galleta", "galletas", "f"), ("flower", "flowers", "flor", "flores", "f"),
    ("card", "cards", "tarjeta", "tarjetas", "f"), ("ball", "balls", "pelota", "pelotas", "f"),
    ("orange", "oranges", "naranja", "naranjas", "f"), ("coin", "coins", "moneda", "monedas", "f"),
    ("stamp", "stamps", "sello", "sellos", "m"), ("egg", "eggs", "huevo", "huevos", "m"),
    ("bottle", "bottles", "botella", "botellas", "f"), ("balloon", "balloons", "globo", "globos", "m"),
    ("toy", "toys", "juguete", "juguetes", "m"), ("shirt", "shirts", "camisa", "camisas", "f"),
    ("notebook", "notebooks", "cuaderno", "cuadernos", "m"), ("banana", "bananas", "plátano", "plátanos", "m"),
    ("strawberry", "strawberries", "fresa", "fresas", "f"), ("stone", "stones", "piedra", "piedras", "f"),
    ("cake", "cakes", "pastel", "pasteles", "m"), ("hat", "hats", "sombrero", "sombreros", "m"),
    ("cup", "cups", "taza", "tazas", "f"), ("key", "keys", "llave", "llaves", "f"),
    ("shell", "shells", "concha", "conchas", "f"), ("marble", "marbles", "canica", "canicas", "f"),
    ("lemon", "lemons", "limón", "limones", "m"), ("tomato", "tomatoes", "tomate", "tomates", "m"),
]
# english, spanish masculine singular, feminine singular (plural adds -s / -es)
COLOURS = [("red", "rojo", "roja"), ("blue", "azul", "azul"), ("green", "verde", "verde"),
           ("yellow", "amarillo", "amarilla"), ("white", "blanco", "blanca"), ("black", "negro", "negra"),
           ("small", "pequeño", "pequeña"), ("big", "grande", "grande"), ("new", "nuevo", "nueva"),
           ("old", "viejo", "vieja")]
# english, spanish, spanish gender
PLACES = [("table", "mesa", "f"), ("chair", "silla", "f"), ("bed", "cama", "f"), ("box", "caja", "f"),
          ("kitchen", "cocina", "f"), ("garden", "jardín", "m"), ("car", "coche", "m"), ("bag", "bolsa", "f"),
          ("school", "escuela", "f"), ("park", "parque", "m"), ("shop", "tienda", "f"), ("house", "casa", "f")]
WHERE = [("on", "sobre"), ("under", "debajo de"), ("in", "en"), ("next to", "al lado de")]

# the English word problems and their Spanish versions, one entry per wording:
# (operation, english prompt, english answer, spanish prompt, spanish answer)
PROBLEMS = [
    ("+", "{n} has {a} {pl}. {n} buys {b} more. How many {pl} does {n} have now?",
          "{n} has {a} + {b} = {c} {pl} now.",
          "{n} tiene {a} {es}. {n} compra {b} más. ¿{cuantos} {es} tiene {n} ahora?",
          "{n} tiene {a} + {b} = {c} {es} ahora."),
    ("+", "{n} has {a} {pl} and {m} gives {n} {b} more. How many {pl} does {n} have now?",
          "{n} has {a} + {b} = {c} {pl} now.",
          "{n} tiene {a} {es} y {m} le da {b} más. ¿{cuantos} {es} tiene {n} ahora?",
          "{n} tiene {a} + {b} = {c} {es} ahora."),
    ("+", "There are {a} {pl} in a box. {n} puts {b} more {pl} in the box. How many {pl} are in the box now?",
          "There are {a} + {b} = {c} {pl} in the box now.",
          "Hay {a} {es} en una caja. {n} pone {b} {es} más en la caja. ¿{cuantos} {es} hay en la caja ahora?",
          "Hay {a} + {b} = {c} {es} en la caja ahora."),
    ("-", "{n} has {a} {pl} and gives {b} to {m}. How many {pl} does {n} have left?",
          "{n} has {a} - {b} = {c} {pl} left.",
          "{n} tiene {a} {es} y le da {b} a {m}. ¿{cuantos} {es} le quedan a {n}?",
          "A {n} le quedan {a} - {b} = {c} {es}."),
    ("-", "{n} had {a} {pl}. {n} lost {b} of them. How many {pl} does {n} have left?",
          "{n} has {a} - {b} = {c} {pl} left.",
          "{n} tenía {a} {es}. {n} perdió {b}. ¿{cuantos} {es} le quedan a {n}?",
          "A {n} le quedan {a} - {b} = {c} {es}."),
    ("-", "There are {a} {pl} in a box. {n} takes {b} {pl} out of the box. How many {pl} are in the box now?",
          "There are {a} - {b} = {c} {pl} in the box now.",
          "Hay {a} {es} en una caja. {n} saca {b} {es} de la caja. ¿{cuantos} {es} hay en la caja ahora?",
          "Hay {a} - {b} = {c} {es} en la caja ahora."),
    ("*", "{n} has {a} bags with {b} {pl} in each bag. How many {pl} does {n} have in total?",
          "{n} has {a} * {b} = {c} {pl} in total.",
          "{n} tiene {a} bolsas con {b} {es} en cada bolsa. ¿{cuantos} {es} tiene {n} en total?",
          "{n} tiene {a} * {b} = {c} {es} en total."),
    ("*", "{n} buys {a} packs of {pl}. Each pack has {b} {pl}. How many {pl} does {n} buy?",
          "{n} buys {a} * {b} = {c} {pl}.",
          "{n} compra {a} paquetes de {es}. Cada paquete tiene {b} {es}. ¿{cuantos} {es} compra {n}?",
          "{n} compra {a} * {b} = {c} {es}."),
]


# wordings that no training set uses (compose's test_heldout): (operation, spanish prompt, spanish answer)
HELDOUT_ES = [
    ("+", "{n} recoge {a} {es} por la mañana y {b} {es} por la tarde. ¿{cuantos} {es} recoge {n} en total?",
          "{n} recoge {a} + {b} = {c} {es} en total."),
    ("+", "En la mesa hay {a} {es}. {m} trae {b} {es} más. ¿{cuantos} {es} hay en la mesa ahora?",
          "Hay {a} + {b} = {c} {es} en la mesa ahora."),
    ("-", "{n} tiene {a} {es} y vende {b} en el mercado. ¿{cuantos} {es} le quedan a {n}?",
          "A {n} le quedan {a} - {b} = {c} {es}."),
    ("-", "Había {a} {es} en la mesa. {m} se llevó {b}. ¿{cuantos} {es} quedan en la mesa?",
          "Quedan {a} - {b} = {c} {es} en la mesa."),
    ("*", "En una tienda hay {a} cajas y cada caja tiene {b} {es}. ¿{cuantos} {es} hay en la tienda?",
          "Hay {a} * {b} = {c} {es} en la tienda."),
    ("*", "{n} prepara {a} platos con {b} {es} en cada plato. ¿{cuantos} {es} usa {n}?",
          "{n} usa {a} * {b} = {c} {es}."),
]


def operands(op: str, rng: random.Random) -> tuple[int, int, int]:
    if op == "+":
        a, b = rng.randint(2, 50), rng.randint(2, 30)
        return a, b, a + b
    if op == "-":
        a = rng.randint(10, 60)
        b = rng.randint(2, a - 2)
        return a, b, a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return a, b, a * b


# the computation a problem's answer writes out: "a op b ="
COMPUTATION = re.compile(r"(\d+) ([-+*]) (\d+) =")
# how the recipes (and benchmarks.eval_batch) evaluate an answer: at most MAX_TOKENS tokens, and
# exact: the number right after the first "=" is the result (the answer must show the
# computation; a right number elsewhere in a rambling answer does not count)
MAX_TOKENS = 40
EXTRACT = r"regex:=\s*(-?\d+)"


def problem_pairs(rows) -> set:
    """The (operation, a, b) of word problem rows, read from their answers."""
    out = set()
    for row in rows:
        a, op, b = COMPUTATION.search(row["response"]).groups()
        out.add((op, int(a), int(b)))
    return out


def two_names(rng, names=NAMES):
    n, m = rng.sample(names, 2)
    return n, m


# -- languages -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Language:
    """One language of the recipes' world. Its tables are aligned with the English ones (THINGS,
    COLOURS, PLACES, WHERE: the same entries in the same order, English first in each tuple), so
    that one draw picks the same thing in every language, and its problems with PROBLEMS."""

    code: str                 # "es"
    name: str                 # "Spanish", as in "Translate into Spanish: ..."
    names: list               # the people of its problems
    things: list              # (english, english plural, singular, plural, gender)
    colours: list             # (english, ...): the language's forms, for its sentence()
    places: list              # (english, word, gender, ...)
    where: list               # (english, preposition)
    problems: list            # the training wordings: (operation, prompt, answer)
    heldout: list             # wordings that no training set uses: (operation, prompt, answer)
    fill: Callable            # thing -> the template fields it sets
    lexicon: str              # its words beyond the problems (things, colours, places, function words)
    sentence: Callable | None = None   # (kind, n, m, x, thing, colour, where, place) -> ENGLISH_SENTENCES[kind] translated
    scene: Callable | None = None      # (kind, n, x, thing1, m, y, thing2, place) -> (prompt, response)


def _spanish_fill(t) -> dict:
    return {"es": t[3], "cuantos": "Cuántos" if t[4] == "m" else "Cuántas"}


def _adj(colour, gender: str, plural: bool) -> str:
    word = colour[1] if gender == "m" else colour[2]
    if plural:
        word += "es" if word[-1] not in "aeo" else "s"
    return word


def _article(gender: str, plural: bool, definite: bool) -> str:
    if definite:
        return {("m", False): "el", ("f", False): "la", ("m", True): "los", ("f", True): "las"}[gender, plural]
    return {("m", False): "un", ("f", False): "una", ("m", True): "unos", ("f", True): "unas"}[gender, plural]


def _place_es(where, place) -> str:
    prep = where[1]
    art = _article(place[2], False, True)
    if prep.endswith(" de") and art == "el":
        return f"{prep[:-3]} del {place[1]}"
    return f"{prep} {art} {place[1]}"


def _english_sentence(kind, n, m, x, t, colour, where, place) -> str:
    return (f"{n} has {x} {t[1]}.", f"{n} buys {x} {colour[0]} {t[1]}.", f"{n} gives {x} {t[1]} to {m}.",
            f"The {colour[0]} {t[0]} is {where[0]} the {place[0]}.", f"There are {x} {t[1]} {where[0]} the {place[0]}.",
            f"How many {t[1]} does {n} have?", f"{n} lost {x} {t[1]} in the {place[0]}.")[kind]


def _spanish_sentence(kind, n, m, x, t, colour, where, place) -> str:
    if kind == 0:
        return f"{n} tiene {x} {t[3]}."
    if kind == 1:
        return f"{n} compra {x} {t[3]} {_adj(colour, t[4], True)}."
    if kind == 2:
        return f"{n} le da {x} {t[3]} a {m}."
    if kind == 3:
        return f"{_article(t[4], False, True).capitalize()} {t[2]} {_adj(colour, t[4], False)} está {_place_es(where, place)}."
    if kind == 4:
        return f"Hay {x} {t[3]} {_place_es(where, place)}."
    if kind == 5:
        return f"¿{_spanish_fill(t)['cuantos']} {t[3]} tiene {n}?"
    return f"{n} perdió {x} {t[3]} en {_article(place[2], False, True)} {place[1]}."


def _spanish_scene(kind, n, x, t1, m, y, t2, place) -> tuple[str, str]:
    en_place = f"en {_article(place[2], False, True)} {place[1]}"
    scene = f"{n} tiene {x} {t1[3]} y {m} tiene {y} {t2[3]} {en_place}."
    if kind == 0:
        return f"{scene} ¿{_spanish_fill(t1)['cuantos']} {t1[3]} tiene {n}?", f"{n} tiene {x} {t1[3]}."
    if kind == 1:
        return f"{scene} ¿Qué tiene {m}?", f"{m} tiene {y} {t2[3]}."
    return f"{scene} ¿Dónde tiene {m} sus {t2[3]}?", f"{m} tiene sus {t2[3]} {en_place}."


ENGLISH = Language(
    code="en", name="English", names=NAMES, things=[(t[0], t[1], t[0], t[1], None) for t in THINGS],
    colours=COLOURS, places=PLACES, where=WHERE, problems=[(op, q, a) for op, q, a, _, _ in PROBLEMS], heldout=[],
    fill=lambda t: {"pl": t[3]},
    lexicon=" ".join([t[0] + " " + t[1] for t in THINGS] + [c[0] for c in COLOURS] + [p[0] for p in PLACES]
                     + ["the is and has have there are now left total of"]))
SPANISH = Language(
    code="es", name="Spanish", names=NAMES, things=THINGS, colours=COLOURS, places=PLACES, where=WHERE,
    problems=[(op, q, a) for op, _, _, q, a in PROBLEMS], heldout=HELDOUT_ES, fill=_spanish_fill,
    lexicon=" ".join([t[2] + " " + t[3] for t in THINGS] + [c[1] + " " + c[2] for c in COLOURS] + [p[1] for p in PLACES]
                     + ["el la los las es y tiene hay ahora quedan le cuántos cuántas"]),
    sentence=_spanish_sentence, scene=_spanish_scene)


# -- the tasks -----------------------------------------------------------------------------------

def problem(rng, lang: Language, pairs: set | None = None, avoid: set | None = None, wordings=None) -> dict:
    """One word problem in `lang`, in one of its training wordings (or of `wordings`); (op, a, b)
    drawn outside `avoid`, and added to `pairs`."""
    op, q, ans = rng.choice(lang.problems if wordings is None else wordings)
    while True:
        a, b, c = operands(op, rng)
        if not avoid or (op, a, b) not in avoid:
            break
    if pairs is not None:
        pairs.add((op, a, b))
    n, m = two_names(rng, lang.names)
    fill = dict(n=n, m=m, a=a, b=b, c=c, **lang.fill(rng.choice(lang.things)))
    return {"prompt": q.format(**fill), "response": ans.format(**fill), "answer": str(c)}


def draw_problems(rng, lang: Language, n: int, prompts: set, pairs: set | None = None, avoid: set | None = None,
                  wordings=None) -> list[dict]:
    """n problems (problem()) whose prompts are not in `prompts` yet, which gains them."""
    rows = []
    while len(rows) < n:
        row = problem(rng, lang, pairs, avoid, wordings)
        if row["prompt"] not in prompts:
            prompts.add(row["prompt"])
            rows.append(row)
    return rows


def translation(rng, lang: Language = SPANISH) -> dict:
    """An English sentence of the world and its translation into `lang`."""
    n, m = two_names(rng, lang.names)
    t = rng.choice(lang.things)
    colour, where, place = rng.choice(lang.colours), rng.choice(lang.where), rng.choice(lang.places)
    x = rng.randint(2, 60)
    parts = (rng.randrange(7), n, m, x, t, colour, where, place)
    return {"prompt": f"Translate into {lang.name}: {_english_sentence(*parts)}", "response": lang.sentence(*parts)}


def scene_question(rng, lang: Language = SPANISH) -> dict:
    """A short scene in `lang` and a question about it, answered in `lang`."""
    (n, m), (t1, t2) = rng.sample(lang.names, 2), rng.sample(lang.things, 2)
    x, y = rng.randint(2, 60), rng.randint(2, 60)
    place = rng.choice(lang.places)
    prompt, response = lang.scene(rng.randrange(3), n, x, t1, m, y, t2, place)
    return {"prompt": prompt, "response": response}


def language_task(rng, lang: Language = SPANISH) -> dict:
    return translation(rng, lang) if rng.random() < 0.5 else scene_question(rng, lang)


def language_tasks(rng, lang: Language, n: int) -> list[dict]:
    """n distinct language_task rows."""
    rows, seen = [], set()
    while len(rows) < n:
        row = language_task(rng, lang)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


# -- the language of an answer ------------------------------------------------------------------

WORD = r"[a-záéíóúñü]+"       # the letters of English and Spanish


def _words(text: str, word: str = WORD) -> list[str]:
    return re.findall(word, re.sub(r"\{\w+\}", " ", text).lower())


def vocabularies(langs: list[Language], word: str = WORD, heldout: bool = False) -> dict[str, set]:
    """For each language, the words that only it uses among `langs`: in its training wordings (and
    its held-out ones, with `heldout`) and its lexicon (names count for none). compose leaves the
    held-out wordings out: its metric stays the one its committed results were computed with."""
    names = {w for lang in langs for n in lang.names for w in _words(n, word)}
    own = {lang.code: set(_words(" ".join(q + " " + a for _, q, a in lang.problems + (lang.heldout if heldout else []))
                                 + " " + lang.lexicon, word)) - names
           for lang in langs}
    return {code: words - set().union(*(v for c, v in own.items() if c != code)) for code, words in own.items()}


def answer_language(text: str, vocab: dict[str, set], word: str = WORD) -> str | None:
    """The language with the most words of its own in `text` (vocabularies()), if one has strictly
    the most and at least one; None otherwise (numbers, names and symbols count for none)."""
    counts = {code: 0 for code in vocab}
    for w in _words(text, word):
        for code, words in vocab.items():
            counts[code] += w in words
    best = max(counts.values())
    top = [code for code, c in counts.items() if c == best]
    return top[0] if best > 0 and len(top) == 1 else None


SPANISH_OR_ENGLISH = vocabularies([SPANISH, ENGLISH])
SPANISH_WORDS, ENGLISH_WORDS = SPANISH_OR_ENGLISH["es"], SPANISH_OR_ENGLISH["en"]


def is_spanish(text: str) -> bool:
    """Whether an answer is written in Spanish: more words that only Spanish uses than words that only
    English uses (numbers, names and symbols count for neither)."""
    return answer_language(text, SPANISH_OR_ENGLISH) == "es"


# -- the sets ------------------------------------------------------------------------------------

SIZES = {"lang_train": 1000, "math_train": 1000, "gate_train": 200, "gate_dev": 50, "test": 300, "test_heldout": 150}


def stream_rng(seed: int, stream: str) -> random.Random:
    """A random stream of its own (for a held-out set, another recipe's sets): drawing from it
    leaves the sets drawn from random.Random(seed) as they are."""
    return random.Random(f"{stream}-{seed}")


def make_sets(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    test_pairs, train_pairs, prompts = set(), set(), set()
    sets = {"test": draw_problems(rng, SPANISH, SIZES["test"], prompts, test_pairs)}
    # everything below is drawn outside the test set's (op, a, b): a test problem is never a paraphrase
    # of one seen in training
    for name, lang in (("gate_train", SPANISH), ("gate_dev", SPANISH), ("math_train", ENGLISH)):
        sets[name] = draw_problems(rng, lang, SIZES[name], prompts, train_pairs, avoid=test_pairs)
    sets["lang_train"] = language_tasks(rng, SPANISH, SIZES["lang_train"])
    sets["test_heldout"] = draw_problems(stream_rng(seed, "heldout"), SPANISH, SIZES["test_heldout"], prompts,
                                         avoid=train_pairs, wordings=SPANISH.heldout)
    return sets


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_sets(out_dir, seed: int = 0, make=make_sets) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: write_jsonl(out_dir / f"{name}.jsonl", rows) for name, rows in make(seed).items()}


if __name__ == "__main__":
    import sys

    for name, path in write_sets(sys.argv[1] if len(sys.argv) > 1 else "compose-data").items():
        print(name, path)
