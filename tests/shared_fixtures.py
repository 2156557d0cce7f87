"""Where the reference fixtures are: the shared/ folder beside the repository checkout. Tests that need
one skip cleanly where it is absent."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def fixture(name: str) -> Path:
    """The path of fixture `name`; skips the calling test if it is not there."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {name} not available")
    return path
