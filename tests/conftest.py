"""Shared fixtures: tests never need a GPU unless marked; GPU tests skip with a reason."""

import pytest


def pytest_report_header(config):
    try:
        import torch  # noqa: F401

        t = f"torch {torch.__version__}"
    except ImportError:
        t = "torch not installed"
    return [f"kvxfer tests: {t}"]
