"""Fixtures shared by every test; helpers live in tests/helpers/. Tests under tests/system/ start
the real daemon and are marked `system` (`pytest -m "not system"` runs the fast part)."""
from __future__ import annotations

import pathlib

import pytest

from helpers.daemon import Daemon

SYSTEM = pathlib.Path(__file__).parent / "system"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SYSTEM in pathlib.Path(item.fspath).parents:
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The tiny demo GGUF, built once per test session."""
    from tidegate.core.llm.demo_model import make_demo
    return make_demo(str(tmp_path_factory.mktemp("model") / "demo.gguf"))


@pytest.fixture
def daemon_factory(tmp_path):
    started = []

    def make(workers: int = 1, start: bool = True, env: dict | None = None, nofile: int = 0, **sections) -> Daemon:
        sub = tmp_path / f"d{len(started)}"
        sub.mkdir()
        d = Daemon(sub, workers=workers, env=env, nofile=nofile, **sections)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def redis_server(tmp_path):
    """A real Redis server on loopback (tests/helpers/redis_server.py), stopped after the test."""
    from helpers.redis_server import RedisServer
    server = RedisServer(tmp_path)
    yield server
    server.stop()
