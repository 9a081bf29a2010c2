"""Settings for the whole test session.

One persistent JAX compilation cache for the session and the processes its tests start (inherited through the
environment): every run compiles its nets and its learner's update step before it starts, and dozens of tests
start runs with the same nets; from the cache a compile takes a fraction of a second instead of seconds
(tests/test_cli.py: 35 s of CPU instead of 62). Set here, before any test module imports JAX, so that JAX reads
it when it starts; a fresh temporary folder for each session, removed at its end, so no test depends on an
earlier session's compiles.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CACHE = tempfile.mkdtemp(prefix="deepspm-test-jax-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)
