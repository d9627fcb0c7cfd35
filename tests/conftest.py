"""Shared test fixtures: repo root on sys.path, the ../shared fixture, small helpers."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the clone; CRBL_SHARED_DIR points elsewhere (e.g. a copy on a GPU machine).
SHARED = Path(os.environ.get("CRBL_SHARED_DIR") or ROOT.parent / "shared")
FIXTURES = SHARED / "fixtures"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def shared_fixture():
    """Paths of the Keras reference fixture; skips cleanly in a user's clone without ../shared."""
    h5 = FIXTURES / "crbl_k2_128.weights.h5"
    ref = FIXTURES / "crbl_k2_128_reference.npz"
    if not (h5.is_file() and ref.is_file()):
        pytest.skip("../shared/fixtures not present (only CI and developers have it)")
    return h5, ref
