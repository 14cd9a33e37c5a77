"""`loraflow demo` (the README's main job): the committed compose flow adapter on the default
model answers its held-out Spanish word problem with the computation, prints the gates of every
answer token, and the baselines from the same file answer differently."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from loraflow.cli import main
from loraflow.runtime.demo import COMPOSE_FLOW, DEFAULT_PROMPT


@pytest.mark.slow
def test_demo_answers_with_the_computation_and_shows_the_gates():
    assert COMPOSE_FLOW.is_file() and COMPOSE_FLOW.stat().st_size < 10_000_000   # the committed file stays small
    res = CliRunner().invoke(main, ["demo", "--threads", "2"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert DEFAULT_PROMPT in out and "adapters: lang, math" in out
    answer = re.search(r"assistant \(LoRA-Flow\): (.*)", out).group(1)
    assert "8 * 2 = 16" in answer, answer                 # the test set's reference: 8 * 2 = 16
    rows = re.findall(r"^  '.*?'\s+(-?\d+\.\d\d)\s+(-?\d+\.\d\d)", out, re.M)
    assert len(rows) >= 10                                # one row of (lang, math) weights per answer token
    baselines = dict(re.findall(r"^  (single:lang|single:math|average)\s+(.*)$", out, re.M))
    assert set(baselines) == {"single:lang", "single:math", "average"}
    assert all("= 16" not in text for text in baselines.values())   # neither LoRA alone nor their average computes it


def test_demo_refuses_a_missing_flow_file(tmp_path):
    res = CliRunner().invoke(main, ["demo", "-f", str(tmp_path / "nope.gguf")])
    assert res.exit_code == 1 and "no such flow file" in res.output
