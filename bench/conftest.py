"""Options of the pytest-benchmark suite (pytest bench/). Read with defaults, so the suite also runs when
pytest is started from the repository root and this conftest is not an initial one."""
from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    g = parser.getgroup("grokfast bench")
    g.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    g.addoption("--bench-preset", default=None, help="workload preset (default: nanda on a GPU, small on a CPU)")
    g.addoption("--bench-compile", action="store_true",
                help="also time the torch.compile backends on a CPU (compiling takes tens of seconds there)")


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    from grokfast.bench import make_plan
    from grokfast.config import ConfigError

    try:
        return make_plan(quick=True, device=_opt("--bench-device"), grok=False, scaling=False).device
    except ConfigError as e:
        pytest.exit(f"--bench-device: {e}", returncode=2)


@pytest.fixture(scope="session")
def bench_preset(bench_device) -> str:
    from grokfast.train import default_preset_name

    return _opt("--bench-preset") or default_preset_name(bench_device)


@pytest.fixture(scope="session")
def bench_compile() -> bool:
    return bool(_opt("--bench-compile"))


_CONFIG = {}


def pytest_configure(config):
    _CONFIG["config"] = config


def _opt(name):
    config = _CONFIG.get("config")
    return None if config is None else config.getoption(name, default=None)
