"""What a checkpoint directory is, read cheaply: no JAX, no orbax, no arrays.

`deepspm.nets.checkpoints` writes two orbax items, `arrays` and `meta`; orbax's JSON handler stores the
`meta` item as the plain JSON file `meta/metadata`. Reading that file directly lets the command line
refuse a wrong path (a missing directory, a folder that is no checkpoint, a classifier where an agent is
expected) in milliseconds, before JAX is imported. A test checks that this reading equals orbax's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT = "deepspm.nets.checkpoint/1"
KINDS = ("classifier", "agent", "dqn_training")
META_FILE = Path("meta") / "metadata"


class CheckpointError(ValueError):
    """A path is not a readable deepspm checkpoint, or holds another kind of net than the one asked for."""


def _article(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def read_checkpoint_meta(path: Path | str) -> dict[str, Any]:
    """The checkpoint's JSON metadata (format, kind, preset, layer plan, caller metadata), or `CheckpointError`
    naming the path and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a deepspm checkpoint (it has no {META_FILE.as_posix()})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {meta_file}: {e.strerror or e}") from None
    except ValueError as e:
        raise CheckpointError(f"{meta_file} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format {found!r})")
    if meta.get("kind") not in KINDS:
        raise CheckpointError(f"{path}: unknown checkpoint kind {meta.get('kind')!r} (expected one of {KINDS})")
    if not (path / "arrays").is_dir():
        raise CheckpointError(f"{path} is an incomplete checkpoint (no arrays/)")
    return meta


def checkpoint_kind(path: Path | str) -> str:
    """'classifier', 'agent' or 'dqn_training'; `CheckpointError` when `path` is not a checkpoint."""
    return str(read_checkpoint_meta(path)["kind"])


def require_kind(path: Path | str, kind: str) -> dict[str, Any]:
    """The metadata of `path`, which must be a checkpoint of `kind` (else `CheckpointError`)."""
    meta = read_checkpoint_meta(path)
    if meta["kind"] != kind:
        raise CheckpointError(f"{path} holds {_article(meta['kind'])} checkpoint, not {_article(kind)}")
    return meta
