"""Shared fixtures: a real engine daemon (started through the CLI) in a short tmp CLORA_HOME.

Every home a test creates is registered; at teardown its engine is stopped cleanly, and
killed if that fails, so no engine process outlives the tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon_helpers import Daemon, Homes, pick_model, start_engine


@pytest.fixture(scope="session")
def model_path() -> Path:
    return pick_model()


@pytest.fixture
def homes():
    """Fresh CLORA_HOMEs under /tmp (short: AF_UNIX paths must stay under 108 bytes)."""
    registry = Homes()
    yield registry
    registry.cleanup()


@pytest.fixture
def home(homes) -> Path:
    return homes.new()


@pytest.fixture
def daemon(home, model_path) -> Daemon:
    """A running engine (embedded model, PEFT backend, 4 slots, max rank 16) in a fresh home."""
    return Daemon(home, model_path, start_engine(home, model_path))
