"""Shared fixtures: tests never need a GPU unless marked; GPU tests skip with a reason."""

import pytest


def pytest_report_header(config):
    try:
        import torch  # noqa: F401

        t = f"torch {torch.__version__}"
    except ImportError:
        t = "torch not installed"
    return [f"kvxfer tests: {t}"]


@pytest.fixture
def make_connectors():
    """``make(name, spec, seed, backend=..., **kw)`` -> (Connector, tensors, block_dim): a connector
    registered with ``spec`` (a kvpeers.LayoutSpec) filled from ``seed``; all closed afterwards."""
    from kvxfer import Connector

    made = []

    def make(name, spec, seed, *, backend, **kw):
        tensors, bd = spec.build(seed)
        c = Connector(name, backend=backend, **kw)
        c.register(tensors, block_dim=bd)
        made.append(c)
        return c, tensors, bd

    yield make
    for c in made:
        c.close()
