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
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

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


def two_names(rng):
    n, m = rng.sample(NAMES, 2)
    return n, m


def problem(rng, lang: str, pairs: set | None = None, avoid: set | None = None) -> dict:
    """One word problem in English ("en") or Spanish ("es"); (op, a, b) drawn outside `avoid`."""
    op, en_q, en_a, es_q, es_a = rng.choice(PROBLEMS)
    while True:
        a, b, c = operands(op, rng)
        if not avoid or (op, a, b) not in avoid:
            break
    if pairs is not None:
        pairs.add((op, a, b))
    n, m = two_names(rng)
    _, pl, _, es, gender = rng.choice(THINGS)
    fill = dict(n=n, m=m, a=a, b=b, c=c, pl=pl, es=es, cuantos="Cuántos" if gender == "m" else "Cuántas")
    q, ans = (en_q, en_a) if lang == "en" else (es_q, es_a)
    return {"prompt": q.format(**fill), "response": ans.format(**fill), "answer": str(c)}


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


def translation(rng) -> dict:
    """An English sentence of the world and its Spanish translation."""
    n, m = two_names(rng)
    t = rng.choice(THINGS)
    colour, where, place = rng.choice(COLOURS), rng.choice(WHERE), rng.choice(PLACES)
    x = rng.randint(2, 60)
    kind = rng.randrange(7)
    if kind == 0:
        en, es = f"{n} has {x} {t[1]}.", f"{n} tiene {x} {t[3]}."
    elif kind == 1:
        en, es = f"{n} buys {x} {colour[0]} {t[1]}.", f"{n} compra {x} {t[3]} {_adj(colour, t[4], True)}."
    elif kind == 2:
        en, es = f"{n} gives {x} {t[1]} to {m}.", f"{n} le da {x} {t[3]} a {m}."
    elif kind == 3:
        en = f"The {colour[0]} {t[0]} is {where[0]} the {place[0]}."
        es = f"{_article(t[4], False, True).capitalize()} {t[2]} {_adj(colour, t[4], False)} está {_place_es(where, place)}."
    elif kind == 4:
        en, es = f"There are {x} {t[1]} {where[0]} the {place[0]}.", f"Hay {x} {t[3]} {_place_es(where, place)}."
    elif kind == 5:
        cuantos = "Cuántos" if t[4] == "m" else "Cuántas"
        en, es = f"How many {t[1]} does {n} have?", f"¿{cuantos} {t[3]} tiene {n}?"
    else:
        en, es = f"{n} lost {x} {t[1]} in the {place[0]}.", f"{n} perdió {x} {t[3]} en {_article(place[2], False, True)} {place[1]}."
    if kind != 3 and es.startswith("el "):
        es = es.capitalize()
    return {"prompt": f"Translate into Spanish: {en}", "response": es}


def scene_question(rng) -> dict:
    """A short Spanish scene and a question about it, answered in Spanish."""
    (n, m), (t1, t2) = rng.sample(NAMES, 2), rng.sample(THINGS, 2)
    x, y = rng.randint(2, 60), rng.randint(2, 60)
    place = rng.choice(PLACES)
    en_place = f"en {_article(place[2], False, True)} {place[1]}"
    scene = f"{n} tiene {x} {t1[3]} y {m} tiene {y} {t2[3]} {en_place}."
    kind = rng.randrange(3)
    if kind == 0:
        cuantos = "Cuántos" if t1[4] == "m" else "Cuántas"
        return {"prompt": f"{scene} ¿{cuantos} {t1[3]} tiene {n}?", "response": f"{n} tiene {x} {t1[3]}."}
    if kind == 1:
        return {"prompt": f"{scene} ¿Qué tiene {m}?", "response": f"{m} tiene {y} {t2[3]}."}
    return {"prompt": f"{scene} ¿Dónde tiene {m} sus {t2[3]}?", "response": f"{m} tiene sus {t2[3]} {en_place}."}


def language_task(rng) -> dict:
    return translation(rng) if rng.random() < 0.5 else scene_question(rng)


# -- the language of an answer ------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"[a-záéíóúñü]+", re.sub(r"\{\w+\}", " ", text).lower())


def _vocabulary() -> tuple[set, set]:
    """Words that only the Spanish side or only the English side of the recipe uses."""
    es, en = set(), set()
    for _, en_q, en_a, es_q, es_a in PROBLEMS:
        en.update(_words(en_q + " " + en_a))
        es.update(_words(es_q + " " + es_a))
    for t in THINGS:
        en.update(_words(f"{t[0]} {t[1]}"))
        es.update(_words(f"{t[2]} {t[3]}"))
    for c in COLOURS:
        en.update(_words(c[0]))
        es.update(_words(f"{c[1]} {c[2]}"))
    for p in PLACES:
        en.update(_words(p[0]))
        es.update(_words(p[1]))
    en.update(["the", "is", "and", "has", "have", "there", "are", "now", "left", "total", "of"])
    es.update(["el", "la", "los", "las", "es", "y", "tiene", "hay", "ahora", "quedan", "le", "cuántos", "cuántas"])
    names = {w for n in NAMES for w in _words(n)}
    es, en = es - names, en - names
    return es - en, en - es


SPANISH_WORDS, ENGLISH_WORDS = _vocabulary()


def is_spanish(text: str) -> bool:
    """Whether an answer is written in Spanish: more words that only Spanish uses than words that only
    English uses, and at least one (numbers, names and symbols count for neither)."""
    words = _words(text)
    es = sum(w in SPANISH_WORDS for w in words)
    en = sum(w in ENGLISH_WORDS for w in words)
    return es > en


# -- the sets ------------------------------------------------------------------------------------

SIZES = {"lang_train": 1000, "math_train": 1000, "gate_train": 200, "gate_dev": 50, "test": 300}


def make_sets(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    test_pairs: set = set()
    test, prompts = [], set()
    while len(test) < SIZES["test"]:
        row = problem(rng, "es", test_pairs)
        if row["prompt"] not in prompts:
            prompts.add(row["prompt"])
            test.append(row)
    # everything below is drawn outside the test set's (op, a, b): a test problem is never a paraphrase
    # of one seen in training
    sets = {"test": test}
    for name, lang in (("gate_train", "es"), ("gate_dev", "es"), ("math_train", "en")):
        rows = []
        while len(rows) < SIZES[name]:
            row = problem(rng, lang, avoid=test_pairs)
            if row["prompt"] not in prompts:
                prompts.add(row["prompt"])
                rows.append(row)
        sets[name] = rows
    rows, seen = [], set()
    while len(rows) < SIZES["lang_train"]:
        row = language_task(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    sets["lang_train"] = rows
    return sets


def write_sets(out_dir, seed: int = 0) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in make_sets(seed).items():
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths[name] = path
    return paths


if __name__ == "__main__":
    import sys

    for name, path in write_sets(sys.argv[1] if len(sys.argv) > 1 else "compose-data").items():
        print(name, path)
