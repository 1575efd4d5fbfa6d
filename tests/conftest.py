"""Shared fixtures.

Models: the whole test session uses one FREESPEC_HOME (``$FREESPEC_TEST_HOME``, else the
persistent ``~/.cache/freespec-test``), so the real default model is downloaded and
converted once and reused by later runs, and tests never write to the user's own
``~/.cache/freespec``. The hub is switched off: no test may load weights from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _test_home() -> Path:
    env = os.environ.get("FREESPEC_TEST_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "freespec-test"


@pytest.fixture(scope="session", autouse=True)
def _freespec_test_env():
    mp = pytest.MonkeyPatch()
    mp.setenv("FREESPEC_HOME", str(_test_home()))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def default_model_home(_freespec_test_env) -> Path:
    """FREESPEC_HOME with the default catalog model pulled (downloaded at most once)."""
    from freespec import models

    home = _test_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["FREESPEC_HOME"] = str(home)  # in case a test changed it for the session
    models.pull(models.DEFAULT_MODEL, progress=False)
    return home


@pytest.fixture(scope="session")
def default_model(default_model_home):
    """``(model, tokenizer)`` of the default model, fp32 on CPU, via ``freespec.models.load``."""
    import torch

    from freespec import models

    return models.load(models.DEFAULT_MODEL, dtype=torch.float32, device="cpu", progress=False)
