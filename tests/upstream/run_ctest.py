"""llama.cpp's own ctest suite, built from the released and from the patched source: the
patch must break nothing upstream tests.

    python tests/upstream/run_ctest.py [--jobs N] [--keep-going]      (make upstream-tests)

Both trees come from the pinned llama-cpp-python source distribution through
runtime/native/build.py (`fetch_sdist`, `prepare_source`, with and without the patch) and are
configured, built and tested the same way in $LORAFLOW_CACHE/upstream-tests/{pristine,patched}
(default ~/.cache/loraflow). Only the offline tests run: label `main`, without the ones that
download a model or a repository (EXCLUDED). The script prints both trees' results and exits 0
when the patched tree passes exactly the tests the pristine one passes. Not part of `make test`:
the two builds take a long time on a small machine (ccache shares the unchanged objects).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# label `main` tests left out: those that reach the network (a model download, which
# test-thread-safety needs as its fixture, and a clone of Hugging Face's vocab repository), and
# test-chat, which does not compile in this release (tests/test-chat.cpp includes the server's
# headers, which include mtmd.h, without mtmd's include folder: "fatal error: mtmd.h"), and
# test-arg-parser, whose last part makes a GET request (it fails in both trees without a network:
# "cannot make GET request")
EXCLUDED = ("test-download-model", "test-thread-safety", "test-tokenizers-ggml-vocabs", "test-chat",
            "test-arg-parser")
LABEL = "main"
# tests whose executable is named otherwise
OTHER_TARGET = {"test-generate-models": "test-llama-archs", "test-tokenizer-1-llama-spm": "test-tokenizer-1-spm"}
CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=ON",
    "-DLLAMA_CURL=OFF",            # older releases' downloader; unused by this one
    "-DLLAMA_OPENSSL=OFF",         # no HTTPS: nothing here fetches anything
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_MTMD=ON",       # test-mtmd-* link libmtmd
]  # tools stay on: test-chat links the server's library; only the tests' targets are built


def load_build_module():
    spec = importlib.util.spec_from_file_location("loraflow_native_build", REPO / "runtime" / "native" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], **kw)


def build_tree(native, root: Path, tree: str, jobs: int) -> Path:
    """Unpack (once), configure and build one tree; return its build folder."""
    base = root / tree
    marker = base / "source-ready"
    top = native.source_dir(base)
    if not marker.is_file():
        top = native.prepare_source(base, native.fetch_sdist(native.cache_root()), patched=tree == "patched")
        marker.write_text(str(top))
    build = base / "build"
    env = dict(os.environ)
    if shutil.which("ccache"):
        # the same relative paths in both trees, so the second build reuses the first one's objects
        env["CCACHE_BASEDIR"] = str(root)
        launcher = ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    else:
        launcher = []
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", top / "vendor" / "llama.cpp", "-B", build, *generator, *CMAKE_ARGS, *launcher],
        check=True, env=env)
    # only what the selected tests run (not the tools, the server or the unified binary)
    run(["cmake", "--build", build, "-j", str(jobs), "--target", *test_targets(build)], check=True, env=env)
    return build


def ctest_args() -> list[str]:
    return ["-L", LABEL, "-E", "^(" + "|".join(EXCLUDED) + ")$"]


def test_targets(build: Path) -> list[str]:
    """The executables the selected tests run: for each test, its own target, the longest test
    target its name starts with (test-tokenizer-0-llama-bpe runs test-tokenizer-0), or OTHER_TARGET."""
    listing = subprocess.run(["ctest", "--test-dir", str(build), *ctest_args(), "--show-only=json-v1"],
                             check=True, capture_output=True, text=True).stdout
    names = [t["name"] for t in json.loads(listing)["tests"]]
    help_ = subprocess.run(["cmake", "--build", str(build), "--target", "help"], check=True, capture_output=True,
                           text=True).stdout
    targets = [line.split(":")[0] for line in help_.splitlines() if line.startswith("test-")]
    out = set()
    for name in names:
        match = [t for t in targets if name == t or name.startswith(t + "-")]
        out.add(max(match, key=len) if match else OTHER_TARGET[name])
    return sorted(out)


def run_ctest(build: Path, jobs: int) -> dict[str, str]:
    """{test name: "passed" | "failed" | "skipped" | ...} for the offline tests."""
    junit = build / "ctest-results.xml"
    junit.unlink(missing_ok=True)
    run(["ctest", "--test-dir", build, *ctest_args(), "--output-on-failure", "--timeout", "1800", "-j", str(jobs), "--output-junit", junit],
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    # ctest's JUnit statuses: "run" (ran and passed), "fail", "disabled", "notrun"
    words = {"run": "passed", "fail": "failed"}
    return {case.get("name"): words.get(case.get("status"), case.get("status"))
            for case in ET.parse(junit).getroot().iter("testcase")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs and tests (default 2)")
    ap.add_argument("--trees", default="pristine,patched", help="which trees (default: both)")
    args = ap.parse_args()

    native = load_build_module()
    root = Path(os.environ.get("LORAFLOW_CACHE", Path.home() / ".cache" / "loraflow")) / "upstream-tests"
    trees = args.trees.split(",")
    results = {}
    for tree in trees:
        build = build_tree(native, root, tree, args.jobs)
        results[tree] = run_ctest(build, args.jobs)
    (root / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))

    print(f"\nllama-cpp-python {native.LLAMA_CPP_PYTHON_VERSION}, ctest -L {LABEL}, excluded: {', '.join(EXCLUDED)}")
    for tree in trees:
        r = results[tree]
        passed = sorted(n for n, s in r.items() if s == "passed")
        other = sorted(f"{n} ({s})" for n, s in r.items() if s != "passed")
        print(f"{tree}: {len(passed)}/{len(r)} passed" + (f"; not passed: {', '.join(other)}" if other else ""))
    if len(trees) < 2:
        return 0
    a, b = (results[t] for t in trees[:2])
    differ = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
    for n in differ:
        print(f"DIFFERS: {n}: {trees[0]} {a.get(n, 'absent')}, {trees[1]} {b.get(n, 'absent')}")
    print("same results in both trees" if not differ else f"{len(differ)} tests differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
