"""The flow file's digest (loraflow.digest, docs/FORMAT.md *Digest*): the converter writes one
that the file's bytes hash to (F32, F16 and Q8_0 tensors as stored); a byte changed in any
tensor's data, in any metadata value or in a tensor's name is refused at load with the digest
message; a file written before digests existed loads with one notice; stamp_digest adds the
digest to such a file without changing any other byte of it; `inspect --verify` checks it."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from bad_flow_files import header_fields, read_good, write  # noqa: E402
from fixtures import make_random_gate, make_tiny_lora  # noqa: E402
from tiny_flow import NAMES, build_tiny_flow  # noqa: E402

from loraflow import schema  # noqa: E402
from loraflow.converter.cli import main as cli  # noqa: E402
from loraflow.digest import check_digest, file_digest, stamp_digest  # noqa: E402
from loraflow.errors import FormatError  # noqa: E402
from loraflow.gguf_read import read_header  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "loraflow" / "adapters" / "compose-es-math.flow.gguf"


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    """The tiny llama model, a flow file in F32 and one in Q8_0 (flow_b, rows of R = 8, in F16)."""
    from loraflow.converter.flow import convert_flow

    tm = tiny_models.get("llama")
    work = tmp_path_factory.mktemp("digest")
    f32 = build_tiny_flow(tm, work / "f32")
    loras = [(n, make_tiny_lora(tm.hf_dir, work / f"q8-{n}", r=4, alpha=8, seed=i + 1)) for i, n in enumerate(NAMES)]
    gate = make_random_gate(tm.n_layer, len(NAMES), tm.n_embd, work / "q8-gate", NAMES, seed=5)
    q8 = convert_flow(tm.gguf, loras, gate, work / "q8.gguf", outtype="q8_0")
    return dict(tm=tm, work=work, f32=f32, q8=q8)


@pytest.fixture(scope="module")
def llm(files):
    from loraflow.runtime import FlowLlama

    llm = FlowLlama(str(files["tm"].gguf), n_ctx=64, n_threads=1, verbose=False)
    yield llm
    llm.close()


def flipped(src: Path, dst: Path, pos: int, mask: int = 0x01) -> Path:
    data = bytearray(src.read_bytes())
    data[pos] ^= mask
    dst.write_bytes(bytes(data))
    return dst


def without_digest(src: Path, dst: Path) -> Path:
    """`src` as a converter before digests wrote it: gguf's writer, every key but the digest, the
    tensors' bytes as stored."""
    kv, tensors = read_good(src)
    kv.pop(schema.KEY_DIGEST)
    return write(dst, kv, tensors, digest=False)


def test_the_converter_writes_a_digest_the_file_hashes_to(files):
    for path in (files["f32"], files["q8"]):
        h = read_header(path)
        assert list(h.meta)[-1] == schema.KEY_DIGEST
        stored, computed = file_digest(path)
        assert stored == computed == check_digest(path)
        assert stored.startswith("sha256:") and len(stored) == len("sha256:") + 64
    types = {t.type.name for t in read_header(files["q8"]).tensors.values()}
    assert types == {"F32", "F16", "Q8_0"}  # the quantized bytes are what is hashed


@pytest.mark.parametrize("which", ["f32", "q8"])
def test_a_byte_flipped_in_any_tensor_is_refused_at_load(files, llm, which, tmp_path):
    """Each tensor's data in turn (gates, both LoRA halves of every module, F32, F16 and Q8_0):
    the lowest bit of its middle byte flipped. The C++ loader has no rule that sees it; the
    digest refuses it, names the file, and the context keeps no adapter."""
    good = files[which]
    tensors = read_header(good).tensors
    assert len(tensors) >= 30
    for i, t in enumerate(tensors.values()):
        for pos in (t.offset + t.nbytes // 2, t.offset + t.nbytes - 1):
            bad = flipped(good, tmp_path / f"{which}-{i}.gguf", pos)
            with pytest.raises(FormatError) as info:
                llm.set_flow(str(bad))
            message = str(info.value)
            assert bad.name in message and "digest mismatch" in message, (t.name, message)
            assert "the tensor data or metadata changed since it was written" in message
            assert llm.flow is None
    llm.set_flow(str(good))  # and the good file still loads
    assert llm.adapter_names == NAMES
    llm._detach()


def test_a_byte_changed_in_any_metadata_value_or_tensor_name_is_refused(files, tmp_path):
    """Every key's value (its last byte: a string's last letter, a number's high byte, an array's
    last element) and every tensor's name: check_digest, the check the runtime and `inspect
    --verify` run."""
    good = files["f32"]
    fields, _ = header_fields(good.read_bytes())
    starts = [(desc, off) for desc, off, _ in fields
              if desc.startswith(("key ", "tensor ")) and desc.endswith(" length")]
    ends = {}  # the last byte of each key's value; the last letter of each tensor's name
    for (desc, off), (_, following) in zip(starts, starts[1:] + [(None, None)]):
        if desc.startswith("key ") and following is not None:
            ends[desc[len("key "):-len(" length")]] = following - 1
        elif desc.startswith("tensor "):
            ends[desc] = off + 8 + len(desc[len("tensor "):-len(" name length")]) - 1
    ends.pop(schema.KEY_DIGEST)  # what the others hash to
    assert set(ends) >= {schema.KEY_GENERAL_ARCH, schema.KEY_ADAPTER_ALPHAS, schema.KEY_ADAPTER_NAMES,
                         schema.KEY_GATE_TEMPERATURE, schema.KEY_N_EMBD, schema.KEY_VERSION}
    assert sum(d.startswith("tensor ") for d in ends) == len(read_header(good).tensors)
    for what, pos in ends.items():
        bad = flipped(good, tmp_path / "meta.gguf", pos)
        with pytest.raises(FormatError) as info:
            check_digest(bad)
        assert "digest mismatch" in str(info.value), (what, str(info.value))


def test_a_file_without_a_digest_loads_with_one_notice(files, llm, tmp_path, caplog):
    old = without_digest(files["f32"], tmp_path / "old.gguf")
    assert schema.KEY_DIGEST not in read_header(old).meta
    assert check_digest(old) is None
    with caplog.at_level(logging.WARNING, logger="loraflow.runtime"):
        llm.set_flow(str(old))
        llm._detach()
        llm.set_flow(str(old))  # the same file again: no second notice
        llm._detach()
        llm.set_flow(str(files["f32"]))  # a file with a digest: none
        assert llm.flow.digest == check_digest(files["f32"])
        llm._detach()
    notes = [r.getMessage() for r in caplog.records if r.name == "loraflow.runtime"]
    assert len(notes) == 1 and str(old) in notes[0] and schema.KEY_DIGEST in notes[0], notes
    assert "\n" not in notes[0]


def test_a_digest_of_the_wrong_form_is_refused(files, tmp_path):
    kv, tensors = read_good(files["f32"])
    value = kv[schema.KEY_DIGEST][0]
    from gguf import GGUFValueType as VT

    for bad_value in ((value.upper(), VT.STRING, None), ("sha1:" + value[7:47], VT.STRING, None),
                      (value + "0", VT.STRING, None), (1, VT.UINT32, None)):
        kv[schema.KEY_DIGEST] = bad_value
        path = write(tmp_path / "form.gguf", kv, tensors, digest=False)
        with pytest.raises(FormatError, match=schema.KEY_DIGEST.replace(".", r"\.")) as info:
            check_digest(path)
        assert path.name in str(info.value)


def test_stamp_adds_the_digest_and_copies_every_other_byte(files, tmp_path):
    """stamp_digest of a file written without a digest is, byte for byte, the file the converter
    writes with one: the metadata and the tensor infos unchanged but for the digest key at the
    end, every tensor's data the same bytes."""
    for which in ("f32", "q8"):
        good = files[which]
        old = without_digest(good, tmp_path / f"old-{which}.gguf")
        os.chmod(old, 0o644)
        digest = stamp_digest(old, tmp_path / f"stamped-{which}.gguf")
        stamped = tmp_path / f"stamped-{which}.gguf"
        assert digest == check_digest(stamped) == check_digest(good)
        assert stamped.read_bytes() == good.read_bytes()
        h_old, h_new = read_header(old), read_header(stamped)
        assert list(h_old.tensors) == list(h_new.tensors)
        for name in h_old.tensors:
            assert h_old.raw(name).tobytes() == h_new.raw(name).tobytes(), name
        assert {k: v for k, v in h_new.meta.items() if k != schema.KEY_DIGEST} == h_old.meta
        # in place, the file's mode kept; again: the same bytes (the digest already last)
        assert stamp_digest(old) == digest and old.read_bytes() == good.read_bytes()
        assert stat.S_IMODE(old.stat().st_mode) == 0o644
        assert stamp_digest(old) == digest and old.read_bytes() == good.read_bytes()
    # a file whose digest does not match is not stamped over
    bad = flipped(files["f32"], tmp_path / "bad.gguf", read_header(files["f32"]).data_offset + 5)
    before = bad.read_bytes()
    with pytest.raises(FormatError, match="digest mismatch"):
        stamp_digest(bad)
    assert bad.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_inspect_verify(files, tmp_path):
    good = files["q8"]
    res = CliRunner().invoke(cli, ["inspect", "--verify", str(good)])
    assert res.exit_code == 0 and res.stdout.strip() == f"{good}: digest ok ({check_digest(good)})", res.output
    res = CliRunner().invoke(cli, ["inspect", "--verify", "--json", str(good)])
    assert json.loads(res.stdout) == {"file": str(good), "digest": check_digest(good), "ok": True}
    res = CliRunner().invoke(cli, ["inspect", str(good)])
    assert res.exit_code == 0 and f"digest: {check_digest(good)} (not checked here" in res.stdout
    assert json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(good)]).stdout)["digest"] == check_digest(good)

    bad = flipped(good, tmp_path / "bad.gguf", read_header(good).data_offset + 100)
    res = CliRunner().invoke(cli, ["inspect", "--verify", str(bad)])
    assert res.exit_code == 1 and "digest mismatch" in res.stderr and str(bad) in res.stderr
    assert "Traceback" not in res.output
    old = without_digest(good, tmp_path / "old.gguf")
    res = CliRunner().invoke(cli, ["inspect", "--verify", str(old)])
    assert res.exit_code == 1 and f"no {schema.KEY_DIGEST}" in res.stderr, res.output
    res = CliRunner().invoke(cli, ["inspect", str(old)])
    assert res.exit_code == 0 and "digest: none" in res.stdout


def test_the_committed_flow_file_carries_a_digest_that_matches():
    """loraflow/adapters/compose-es-math.flow.gguf was written before digests existed and stamped
    with stamp_digest (its tensor data unchanged): it loads without the notice."""
    digest = check_digest(COMMITTED)
    assert digest is not None and list(read_header(COMMITTED).meta)[-1] == schema.KEY_DIGEST
