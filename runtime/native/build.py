"""Build and install the patched llama-cpp-python that loraflow's runtime needs.

    python runtime/native/build.py [--force] [--jobs N]
    python runtime/native/build.py --released    # the unpatched release's wheel (benchmarks)
    python runtime/native/build.py --llama-server    # stock llama-server from the same source (benchmarks.serve)
    python runtime/native/build.py --rpc-server      # llama.cpp's rpc-server from the patched source (--rpc)
    python runtime/native/build.py --without 0003    # the wheel without a patch (what it gains: benchmarks.decode)

Downloads the pinned llama-cpp-python source distribution from the package index,
copies our sources (runtime/native/src) into its vendored llama.cpp, applies the patch
series runtime/native/patches/*.patch in sorted order (each one change, its header says
what and why), builds a wheel and installs it into the running interpreter. The wheel is
cached under $LORAFLOW_CACHE/native (default ~/.cache/loraflow) keyed by the version, our
sources, the patches (names, order and text) and CMAKE_ARGS, so a rebuild with nothing
changed costs seconds. CMAKE_ARGS passes through untouched
(e.g. CMAKE_ARGS="-DGGML_CUDA=on" for CUDA, Metal is on by default on macOS).

Offline (a machine with no package index, as runtime/native/cuda_check.sh runs on):
LORAFLOW_OFFLINE_WHEELS=DIR builds without an isolated build environment (the interpreter's
own scikit-build-core) and installs dependencies from DIR only; the source distribution must
already be in $LORAFLOW_CACHE/native/sdist.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
HERE = Path(__file__).resolve().parent
PATCHES = HERE / "patches"  # the series, applied in sorted order: 0001-*.patch, 0002-*.patch, ...
OUR_SOURCES = {  # our file -> where it goes inside vendor/llama.cpp
    HERE / "src" / "llama-flow.h": "include/llama-flow.h",
    HERE / "src" / "llama-flow-impl.h": "src/llama-flow-impl.h",
    HERE / "src" / "llama-flow.cpp": "src/llama-flow.cpp",
}
# ggml's AMX matmul (chosen by -march=native on Sapphire Rapids and newer) faults in ldtilecfg
# at the first batch (llama.cpp#20824, open; seen here on a Xeon VM). Undefining the compiler's
# macro builds the CPU backend as on a CPU without AMX (its AVX-512 kernels instead). Every
# build takes these, the released ones too, so the benchmarks compare like with like.
NO_AMX_CMAKE_ARGS = ["-DCMAKE_C_FLAGS=-U__AMX_INT8__", "-DCMAKE_CXX_FLAGS=-U__AMX_INT8__"]
# Only the shared library is needed; upstream tools, tests and the multimodal library are not.
BASE_CMAKE_ARGS = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    *NO_AMX_CMAKE_ARGS,
]


def cache_root() -> Path:
    return Path(os.environ.get("LORAFLOW_CACHE", Path.home() / ".cache" / "loraflow")) / "native"


def patch_series(without: tuple[str, ...] = ()) -> list[Path]:
    """The patches, in the order they apply; `without`: name prefixes ("0003") left out."""
    series = sorted(PATCHES.glob("*.patch"))
    if not series:
        raise SystemExit(f"loraflow: no patches in {PATCHES}")
    for prefix in without:
        if not any(p.name.startswith(prefix) for p in series):
            raise SystemExit(f"loraflow: no patch named {prefix}* in {PATCHES} "
                             f"(there are {', '.join(p.name for p in series)})")
    return [p for p in series if not p.name.startswith(tuple(without))]


def build_key(user_cmake_args: str, without: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256(LLAMA_CPP_PYTHON_VERSION.encode())
    for path in [*patch_series(without), *sorted(OUR_SOURCES)]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(cmake_args_key(user_cmake_args).encode())
    return h.hexdigest()[:16]


def cmake_args_key(user_cmake_args: str) -> str:
    """The CMAKE_ARGS part of a build or wheel folder's name (ours and the user's)."""
    return hashlib.sha256(" ".join([*BASE_CMAKE_ARGS, user_cmake_args]).encode()).hexdigest()[:8]


def pip(*args: str) -> list[str]:
    """A pip command line; offline (LORAFLOW_OFFLINE_WHEELS) installs look in that folder only."""
    cmd = [sys.executable, "-m", "pip", *args]
    offline = os.environ.get("LORAFLOW_OFFLINE_WHEELS")
    if offline and args[0] == "install":
        cmd += ["--no-index", "--find-links", offline]
    if offline and args[0] == "wheel":
        cmd += ["--no-build-isolation"]
    return cmd


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def fetch_sdist(root: Path) -> Path:
    sdist_dir = root / "sdist"
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not (sdist_dir / name).exists():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        run([*pip("download", "--no-deps", "--no-binary", ":all:"),
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(sdist_dir)])
    return sdist_dir / name


def source_dir(root: Path) -> Path:
    return root / f"src-{LLAMA_CPP_PYTHON_VERSION}" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"


def prepare_source(root: Path, sdist: Path, patched: bool = True, without: tuple[str, ...] = ()) -> Path:
    """A fresh, patched source tree at a fixed path, so the CMake build folder can be reused:
    a file whose bytes are those of the tree it replaces keeps that file's timestamp and is not
    recompiled; every other file is stamped now (see keep_unchanged_timestamps). `patched=False`
    leaves it as released (tests/upstream/run_ctest.py compares the two)."""
    top = source_dir(root)
    fresh = top.parent.with_name(top.parent.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(fresh, filter="tar") if hasattr(tarfile, "data_filter") else tar.extractall(fresh)
    llama_dir = fresh / top.name / "vendor" / "llama.cpp"
    if patched:
        for ours, dest in OUR_SOURCES.items():
            shutil.copyfile(ours, llama_dir / dest)
        for patch in patch_series(without):
            run(["patch", "-p1", "--batch", "--forward", "-i", str(patch)], cwd=llama_dir)
    if top.parent.exists():
        keep_unchanged_timestamps(top.parent, fresh)
        shutil.rmtree(top.parent)
    fresh.rename(top.parent)
    return top


def keep_unchanged_timestamps(old: Path, new: Path) -> None:
    """Timestamps for `new` that make the build folder's objects exactly as fresh as their
    sources: a file with the bytes of its namesake in `old` keeps that file's timestamp, any other
    (changed, new, or back to the tarball's text because the patch that touched it was dropped)
    is stamped now. Without the last case a dropped hunk stayed compiled in: the file came back
    with the tarball's old timestamp, older than its object."""
    now = time.time_ns()
    for path in new.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        prev = old / path.relative_to(new)
        st = path.stat()
        pst = prev.stat() if prev.is_file() and not prev.is_symlink() else None
        # same size and timestamp: both came untouched from the tarball; otherwise compare bytes
        if pst and pst.st_size == st.st_size and (
                pst.st_mtime_ns == st.st_mtime_ns or filecmp.cmp(prev, path, shallow=False)):
            os.utime(path, ns=(pst.st_atime_ns, pst.st_mtime_ns))
        else:
            os.utime(path, ns=(now, now))


def build_wheel(root: Path, top: Path, out: Path, user_cmake_args: str, jobs: int | None) -> Path:
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(BASE_CMAKE_ARGS + ([user_cmake_args] if user_cmake_args else []))
    if shutil.which("ccache"):
        env["CMAKE_ARGS"] += " -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache"
    if jobs:
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs)
    build_dir = root / f"build-{LLAMA_CPP_PYTHON_VERSION}-{cmake_args_key(user_cmake_args)}"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run([*pip("wheel", "--no-deps", "-w", str(tmp)),
         "-C", f"build-dir={build_dir}", str(top)], env=env)
    tmp.rename(out)
    (wheel,) = out.glob("llama_cpp_python-*.whl")
    return wheel


def released_wheel(jobs: int | None = None) -> Path:
    """llama-cpp-python as released, without our sources or patch, built the same way and cached
    (not installed): the benchmarks' stock llama.cpp. Its own root, so the patched source tree
    that the converters read is left alone."""
    user_cmake_args = os.environ.get("CMAKE_ARGS", "")
    root = cache_root() / "released"
    out = root / f"wheel-{LLAMA_CPP_PYTHON_VERSION}-{cmake_args_key(user_cmake_args)}"
    if not out.exists():
        print(f"loraflow: building released llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (several minutes)", flush=True)
        top = prepare_source(root, fetch_sdist(cache_root()), patched=False)
        build_wheel(root, top, out, user_cmake_args, jobs)
    (wheel,) = out.glob("llama_cpp_python-*.whl")
    return wheel


def released_llama_server(jobs: int | None = None) -> Path:
    """Stock llama.cpp's `llama-server`, built from the pinned source as released (no patch),
    cached: what benchmarks.serve compares `loraflow serve` with."""
    user_cmake_args = os.environ.get("CMAKE_ARGS", "")
    root = cache_root() / "released"
    out = root / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}-{cmake_args_key(user_cmake_args)}"
    binary = out / "llama-server"
    if not binary.exists():
        print(f"loraflow: building stock llama-server from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s llama.cpp "
              "(several minutes)", flush=True)
        top = source_dir(root)
        if not top.exists():
            top = prepare_source(root, fetch_sdist(cache_root()), patched=False)
        build = root / f"server-build-{LLAMA_CPP_PYTHON_VERSION}-{cmake_args_key(user_cmake_args)}"
        run(["cmake", "-S", str(top / "vendor" / "llama.cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
             *NO_AMX_CMAKE_ARGS, *user_cmake_args.split()])
        run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs or os.cpu_count() or 2)])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(build / "bin" / "llama-server", binary)
    return binary


def variant_wheel(without: tuple[str, ...], jobs: int | None = None) -> Path:
    """The patched wheel without the patches named by `without` (prefixes: "0003"), cached, not
    installed: what benchmarks.decode's `CONFIG~0003` configurations run, to measure what a
    patch gains. One root for all variants, so going from one to the next recompiles only the
    files their patches touch."""
    user_cmake_args = os.environ.get("CMAKE_ARGS", "")
    root = cache_root() / "variants"
    out = root / f"wheel-{LLAMA_CPP_PYTHON_VERSION}-{build_key(user_cmake_args, without)}"
    if not out.exists():
        print(f"loraflow: building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} without {', '.join(without)} "
              "(several minutes the first time)", flush=True)
        top = prepare_source(root, fetch_sdist(cache_root()), without=without)
        build_wheel(root, top, out, user_cmake_args, jobs)
    (wheel,) = out.glob("llama_cpp_python-*.whl")
    return wheel


def rpc_server(jobs: int | None = None) -> Path:
    """llama.cpp's `rpc-server` from the patched source (its CPU backend has our kernel patches,
    which the flow graph runs there), cached under the patched wheel's key, then copied next to
    the running interpreter as `loraflow-rpc-server`. Its own root, so the patched source tree that
    the converters read (and a build running from it) is left alone. It binds 127.0.0.1 unless
    given -H: it has no authentication."""
    user_cmake_args = os.environ.get("CMAKE_ARGS", "")
    root = cache_root() / "rpc"
    out = root / f"rpc-server-{LLAMA_CPP_PYTHON_VERSION}-{build_key(user_cmake_args)}"
    binary = out / "rpc-server"
    if not binary.exists():
        print(f"loraflow: building rpc-server from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s patched llama.cpp "
              "(several minutes)", flush=True)
        top = prepare_source(root, fetch_sdist(cache_root()))
        build = root / f"build-{LLAMA_CPP_PYTHON_VERSION}-{cmake_args_key(user_cmake_args)}"
        run(["cmake", "-S", str(top / "vendor" / "llama.cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             "-DGGML_RPC=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
             *NO_AMX_CMAKE_ARGS, *user_cmake_args.split()])
        run(["cmake", "--build", str(build), "--target", "ggml-rpc-server", "-j", str(jobs or os.cpu_count() or 2)])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(build / "bin" / "ggml-rpc-server", binary)
    installed = Path(sys.executable).parent / "loraflow-rpc-server"
    shutil.copy(binary, installed)
    return installed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached wheel exists")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    ap.add_argument("--released", action="store_true",
                    help="only build (cached) the unpatched release's wheel and print its path; install nothing")
    ap.add_argument("--llama-server", action="store_true",
                    help="only build (cached) stock llama-server from the unpatched source and print its path")
    ap.add_argument("--rpc-server", action="store_true",
                    help="only build (cached) llama.cpp's rpc-server from the patched source, install it next to "
                         "this interpreter as loraflow-rpc-server and print its path")
    ap.add_argument("--without", metavar="PATCH[,PATCH]",
                    help="only build (cached) the patched wheel without these patches (name prefixes, e.g. 0003) "
                         "and print its path; install nothing (benchmarks.decode's CONFIG~0003)")
    args = ap.parse_args()
    if args.without:
        print(variant_wheel(tuple(args.without.split(",")), args.jobs))
        return 0
    if args.rpc_server:
        print(rpc_server(args.jobs))
        return 0
    if args.released:
        print(released_wheel(args.jobs))
        return 0
    if args.llama_server:
        print(released_llama_server(args.jobs))
        return 0

    user_cmake_args = os.environ.get("CMAKE_ARGS", "")
    root = cache_root()
    key = build_key(user_cmake_args)
    out = root / f"wheel-{LLAMA_CPP_PYTHON_VERSION}-{key}"
    top = source_dir(root)
    if args.force and out.exists():
        shutil.rmtree(out)
    if not out.exists():
        print(f"loraflow: building patched llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (key {key}); "
              "the first build takes several minutes", flush=True)
        top = prepare_source(root, fetch_sdist(root))
        build_wheel(root, top, out, user_cmake_args, args.jobs)
    else:
        print(f"loraflow: using cached patched llama-cpp-python build {out}", flush=True)
        if not top.exists():  # the wheel survived but its source did not: the converters need it
            top = prepare_source(root, fetch_sdist(root))
    (wheel,) = out.glob("llama_cpp_python-*.whl")
    run(pip("install", "--force-reinstall", "--no-deps", str(wheel)))
    # llama-cpp-python's own dependencies, and gguf-py from the same llama.cpp (its converters need it)
    run(pip("install", "typing-extensions>=4.5.0", "numpy>=1.20.0",
            "diskcache>=5.6.1", "jinja2>=2.11.3", str(top / "vendor" / "llama.cpp" / "gguf-py")))
    # where loraflow finds llama.cpp's convert_hf_to_gguf.py (see loraflow/llama_source.py)
    (root / "current-source").write_text(str(top / "vendor" / "llama.cpp"))
    print("loraflow: patched llama_cpp installed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
