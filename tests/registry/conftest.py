"""Fixtures: an embedded registry server, a real redis-server on a free port, both as URLs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvxfer.registry.server import RegistryServer
from regutil import RedisProcess, need_redis


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    need_redis()
    rp = RedisProcess(tmp_path_factory.mktemp("redis"))
    rp.start()
    yield rp
    rp.stop()


@pytest.fixture
def redis_url(redis_proc: RedisProcess) -> str:
    redis_proc.flush()
    return redis_proc.url


@pytest.fixture
def server() -> Iterator[RegistryServer]:
    with RegistryServer() as srv:
        yield srv


@pytest.fixture(params=["kvxfer", "redis"])
def registry_url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh registry of each kind; the client API must not tell them apart."""
    if request.param == "kvxfer":
        return request.getfixturevalue("server").url
    return request.getfixturevalue("redis_url")
