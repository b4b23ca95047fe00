from pathlib import Path

import pytest

# In CI the repository is cloned next to shared/, so <repo>/../shared/data always works.
DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture
def data_root() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared task data not found at {DATA.resolve()} (expected <repo>/../shared/data)")
    return DATA
