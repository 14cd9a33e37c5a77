"""How every converter command writes its output: checked first, written to a temporary file
in the output folder, renamed into place on success, removed on failure.

An existing output is kept unless `force`; an output that is one of the inputs (or a file
inside an input folder) is refused even with `force`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from loraflow.digest import check_digest
from loraflow.errors import ConversionError, FormatError
from loraflow.gguf_read import read_header


def check_output(out, force: bool, inputs: Iterable = ()) -> Path:
    """Refuse an output that exists (without `force`), is a folder, or would overwrite an input."""
    out = Path(out)
    if out.is_dir():
        raise ConversionError(f"{out} is a directory")
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists; pass --force to overwrite it")
    target = out.resolve()
    for p in map(Path, inputs):
        files = list(p.iterdir()) if p.is_dir() else [p]
        if any(f.exists() and f.resolve() == target for f in files):
            raise ConversionError(f"output {out} would overwrite the input {p}")
    return out


@contextlib.contextmanager
def temp_path(folder: Path, name: str, tag: str = "") -> Iterator[Path]:
    """A fresh temporary file path in `folder`, removed when the block ends (success or not)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=f"{tag}.tmp")
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(out, force: bool) -> Iterator[Path]:
    """Yield a temporary path next to `out` for a GGUF file; when the block succeeds and the file
    is complete, it becomes `out`."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with temp_path(out.parent, out.name) as tmp:
            yield tmp
            _check_complete(out, tmp)
            if out.exists() and not force:  # appeared while we worked
                raise ConversionError(f"{out} already exists; pass --force to overwrite it")
            ordinary_mode(tmp)  # mkstemp made it private
            os.replace(tmp, out)
    except OSError as e:  # a full disk, a file size limit, a folder we may not write
        # numpy's tofile reports a short write without an errno
        hint = "; is the disk full?" if e.errno in (None, errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        raise ConversionError(f"{out}: not written ({e}{hint})") from None


def _check_complete(out: Path, tmp: Path) -> None:
    """A failed write can go unreported (numpy's tofile ignores an error when its stream is
    closed): flush the file to disk and read its header back, which checks that every tensor's
    data lies inside it, and check the digest it records, if any."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        header = read_header(tmp)
    except FormatError as e:
        raise ConversionError(f"{out}: not written: the file came out incomplete ({e}); is the disk full?") from None
    try:
        check_digest(tmp, header)  # a file that records a digest hashes to it as written
    except FormatError as e:
        raise ConversionError(f"{out}: not written: {e}") from None


def ordinary_mode(path) -> None:
    """Give `path` the mode a new file gets here (0666 less the umask), as every output should have."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
