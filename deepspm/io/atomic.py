"""Files that are written whole or not at all: a temporary file in the same folder, flushed (and fsync'ed), then
renamed over the target. A kill at any moment leaves the old file or the new one, never half of one; a leftover
temporary file is named `.NAME.XXXX.tmp` (a resumed run removes them by TEMP_SUFFIX)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TEMP_SUFFIX = ".tmp"


def write_atomic(path: Path | str, data: bytes | Callable[[BinaryIO], object], *, fsync: bool = True) -> Path:
    """Write `data` (bytes, or a function that writes to the open file) to `path`, creating its folder. Returns
    the path. `fsync=False` skips the flush to disk (tests, and runs that chose speed over power-cut safety)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the write's own error is the one to report
            os.unlink(tmp)
        raise
    return path


def save_figure(fig: Any, path: Path | str, dpi: int) -> Path:
    """A pyplot figure laid out tightly, written whole as a PNG, then closed (pyplot keeps open figures alive)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return write_atomic(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
