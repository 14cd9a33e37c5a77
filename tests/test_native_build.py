"""runtime/native/build.py's patch series: what `--without` leaves out and how it is keyed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BUILD = Path(__file__).resolve().parent.parent / "runtime" / "native" / "build.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("loraflow_native_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_leaves_out_the_named_patches_only(build):
    full = [p.name for p in build.patch_series()]
    assert full == sorted(full) and len(full) >= 4
    without = [p.name for p in build.patch_series(("0003", "0004"))]
    assert without == [n for n in full if not n.startswith(("0003", "0004"))]
    assert len(without) == len(full) - 2
    # each variant its own cache key, none the full build's
    keys = {build.build_key(""), build.build_key("", ("0003",)), build.build_key("", ("0004",))}
    assert len(keys) == 3


def test_without_refuses_a_patch_that_is_not_there(build):
    with pytest.raises(SystemExit, match=r"no patch named 0099\* .*0001-flow-hooks\.patch"):
        build.patch_series(("0099",))
