"""Where the read-only sample data lives (`../shared/data` beside the checkout, or
$MARGINFACE_SHARED_DATA), and a skip with a reason when a test's file is absent."""
import os
from pathlib import Path

import pytest


def shared_data() -> Path:
    env = os.environ.get("MARGINFACE_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def need(rel: str) -> Path:
    path = shared_data() / rel
    if not path.exists():
        pytest.skip(f"shared sample data {path} is absent (set MARGINFACE_SHARED_DATA)")
    return path
