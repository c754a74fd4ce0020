"""The connector's deadline watchdog: fails late handles, and holds only what is pending."""

import time

import numpy as np
import pytest

from kvxfer import TransferTimeoutError
from kvxfer._watchdog import _COMPACT_MIN, Watchdog
from kvxfer.handle import Op, TransferHandle


def _handle():
    return TransferHandle(Op.READ, "peer", 4096, "tcp", np.zeros(0, dtype=np.int64))


def test_a_late_handle_fails_and_a_finished_one_does_not():
    wd = Watchdog("t")
    try:
        late, ontime = _handle(), _handle()
        wd.add(late, 0.2)
        wd.add(ontime, 0.2)
        ontime.set_done()
        with pytest.raises(TransferTimeoutError, match="timed out"):
            late.wait(5)
        assert ontime.wait(0).nbytes == 4096
    finally:
        wd.close()


def test_an_earlier_deadline_added_later_still_fires_first():
    wd = Watchdog("t")
    try:
        slow, quick = _handle(), _handle()
        wd.add(slow, 30.0)  # the thread now sleeps toward 30 s
        wd.add(quick, 0.1)  # ... and must be woken for this one
        t0 = time.monotonic()
        with pytest.raises(TransferTimeoutError):
            quick.wait(5)
        assert time.monotonic() - t0 < 2.0
        assert not slow.done()
    finally:
        wd.close()


def test_finished_handles_are_purged_under_long_timeouts():
    wd = Watchdog("t")
    try:
        keep = [_handle() for _ in range(10)]
        for h in keep:
            wd.add(h, 60.0)
        for _ in range(20 * _COMPACT_MIN):  # many short transfers, each done at once
            h = _handle()
            wd.add(h, 60.0)
            h.set_done()
        assert len(wd) <= 2 * _COMPACT_MIN + 10  # not 20k entries waiting a minute
        assert not any(h.done() for h in keep)
    finally:
        wd.close()
