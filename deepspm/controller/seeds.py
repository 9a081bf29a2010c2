"""Seeds derived from the run's root seed: no global RNG anywhere."""

from __future__ import annotations

import hashlib
from typing import Any


def derived_seed(*parts: Any) -> int:
    """A 32-bit seed from any printable parts (a root seed, a file name, a frame index): the same parts give
    the same seed whatever order things happen in."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big")
