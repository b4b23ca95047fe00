"""Shared fixtures: tiny random models (no downloads), and the ZOTUNE_SLOW switch for slow tests.

The tiny_* fixtures are shared by every test of a module: do not change their weights or wrap
them with adapters (``select_trainable`` modifies a model in place); build a fresh
``zotune.testing.tiny_model(arch)`` for that, it takes milliseconds.
"""

from __future__ import annotations

import os

import pytest

from zotune.testing import tiny_model


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ZOTUNE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set ZOTUNE_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tiny_opt():
    return tiny_model("opt")


@pytest.fixture(scope="module")
def tiny_gpt2():
    return tiny_model("gpt2")


@pytest.fixture(scope="module")
def tiny_roberta():
    return tiny_model("roberta")


@pytest.fixture(scope="session")
def benchmark_script():
    """``benchmark_script("speed")``: a script of ``benchmarks/`` loaded as a module (they are
    scripts, not a package, so their tests load them by path)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"zotune_benchmark_{name}", root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
