"""Flow files gone wrong (tests/bad_flow_files.py: truncated, corrupt headers, wrong types and
shapes, k that disagrees, names repeated or missing, NaN and infinity, another base, metadata of
the wrong type, bytes changed after writing): every one is refused with a FormatError that names
the file, by the runtime's loader and by the Python reader, in a process that then exits
normally. No abort, no crash, and none loads silently: the files only the digest can tell from
the good one (the C++ loader alone accepts them) are refused by it."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("torch")

from bad_flow_files import KINDS, make_corpus  # noqa: E402
from tiny_flow import build_tiny_flow  # noqa: E402

HERE = Path(__file__).resolve().parent


def limit_memory():
    """In the worker: a regression that allocates wildly fails there (and is reported) instead
    of taking the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def run_corpus(base, cases, work: Path) -> tuple[dict, list]:
    """Load every case in worker subprocesses; a worker that dies is reported and replaced.
    Returns ({case index: outcomes}, [crash reports])."""
    listing = work / "cases.json"
    listing.write_text(json.dumps([c.__dict__ for c in cases]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    results, crashes, start = {}, [], 0
    while start < len(cases):
        proc = subprocess.run([sys.executable, str(HERE / "bad_flow_files.py"), str(base), str(listing), str(start)],
                              capture_output=True, text=True, env=env, timeout=1800, preexec_fn=limit_memory)
        current = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if msg.get("start"):
                current = msg["i"]
            else:
                results[msg["i"]] = msg
                current = None
        if proc.returncode == 0 and current is None:
            break
        where = current if current is not None else start
        crashes.append(f"{cases[where].name}: exit {proc.returncode} (negative: signal); "
                       f"stderr: {proc.stderr[-2000:]}")
        start = where + 1
    return results, crashes


@pytest.fixture(scope="module")
def corpus(tiny_models, tmp_path_factory):
    tm = tiny_models.get("llama")
    work = tmp_path_factory.mktemp("bad-files")
    good = build_tiny_flow(tm, work / "good")
    cases = make_corpus(good, work / "corpus", tm.n_layer, tm.n_embd)
    results, crashes = run_corpus(tm.gguf, cases, work)
    return dict(cases=cases, results=results, crashes=crashes)


def test_corpus_is_large_and_covers_every_kind(corpus):
    counts = Counter(c.kind for c in corpus["cases"])
    print("\nbad flow files by kind:", dict(counts), "total", sum(counts.values()))
    assert sum(counts.values()) >= 200
    assert set(counts) == set(KINDS)


def test_no_crash(corpus):
    assert not corpus["crashes"], "\n".join(corpus["crashes"])
    assert len(corpus["results"]) == len(corpus["cases"])


def test_runtime_refuses_every_file_with_a_message(corpus):
    bad = []
    for i, case in enumerate(corpus["cases"]):
        r = corpus["results"].get(i, {}).get("runtime")
        if r is None:
            continue  # test_no_crash reports it
        name = Path(case.path).name
        if r["ok"]:
            bad.append(f"{case.name}: loaded")
        elif r["error"] != "FormatError" or name not in r["message"] or case.expect.lower() not in r["message"].lower():
            bad.append(f"{case.name}: {r['error']}: {r['message']!r} (expected a FormatError naming the file"
                       f"{' and ' + repr(case.expect) if case.expect else ''})")
    assert not bad, f"{len(bad)} of {len(corpus['cases'])}:\n" + "\n".join(bad)


def test_python_reader_refuses_or_reads(corpus):
    bad = []
    for i, case in enumerate(corpus["cases"]):
        r = corpus["results"].get(i, {}).get("python")
        if r is None:
            continue
        if r["ok"] and not case.needs_base:
            bad.append(f"{case.name}: accepted")
        elif not r["ok"] and (not r["lf"] or Path(case.path).name not in r["message"]):
            bad.append(f"{case.name}: {r['error']}: {r['message']!r} (expected a LoraFlowError naming the file)")
    assert not bad, f"{len(bad)} of {len(corpus['cases'])}:\n" + "\n".join(bad)


def test_only_the_digest_tells_the_data_cases(corpus):
    """The C++ loader alone (FlowAdapter(check_digest=False)) refuses every case but those marked
    digest_only, and accepts those: without the digest they would load and compute other numbers."""
    bad, silent = [], 0
    for i, case in enumerate(corpus["cases"]):
        r = corpus["results"].get(i, {}).get("native")
        if r is None:
            continue
        if case.digest_only:
            silent += r["ok"]
            if not r["ok"]:
                bad.append(f"{case.name}: marked digest_only, but the C++ loader refuses it: {r['message']!r}")
        elif r["ok"]:
            bad.append(f"{case.name}: the C++ loader alone accepts it")
        elif r["error"] != "FormatError" or Path(case.path).name not in r["message"]:
            bad.append(f"{case.name}: {r['error']}: {r['message']!r} (expected a FormatError naming the file)")
    digest_only = sum(c.digest_only for c in corpus["cases"])
    print(f"\n{silent} of {digest_only} digest-only files load through the C++ loader alone")
    assert digest_only >= 15
    assert not bad, f"{len(bad)} of {len(corpus['cases'])}:\n" + "\n".join(bad)
