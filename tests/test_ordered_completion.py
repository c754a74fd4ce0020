"""OrderedCompletion and the completion thread: each queued item finished once, oldest first,
whichever thread settles; driven items finished without waking the thread, yet never stranded."""

import random
import threading
import time

from kvxfer.backends.cuda_ipc.completion import CompletionThread
from kvxfer.backends.cuda_ipc.ordered import OrderedCompletion


class _FnDriver:
    """A HandleDriver from a function (drive) that records watch() calls."""

    def __init__(self, fn):
        self.fn, self.watched = fn, 0

    def drive(self, timeout):
        self.fn(timeout)

    def watch(self):
        self.watched += 1


def test_settling_an_item_finishes_the_earlier_ones_first_and_once():
    done = []
    oc = OrderedCompletion(lambda item, err: done.append((item, err)))
    items = [object() for _ in range(4)]
    for it in items:
        oc.add(it)
    assert oc.settle(items[2]) is True
    assert [d[0] for d in done] == items[:3] and all(e is None for _, e in done)
    assert oc.settle(items[1]) is False and oc.settle(items[2]) is False  # already finished
    assert oc.pending(items[3]) and not oc.pending(items[0])
    err = RuntimeError("sticky device error")
    assert oc.settle(items[3], err) is True
    assert done[-1] == (items[3], err) and len(done) == 4 and len(oc) == 0


def test_racing_settlers_finish_every_item_once_in_order():
    order = []
    oc = OrderedCompletion(lambda item, err: order.append(item))
    items = list(range(2000))
    for it in items:
        oc.add(it)
    rng = random.Random(0)

    def settler(seq):
        for it in seq:
            oc.settle(it)

    threads = []
    for _ in range(4):  # several waiters, each settling some items in a random order
        seq = items[:]
        rng.shuffle(seq)
        threads.append(threading.Thread(target=settler, args=(seq,)))
    threads.append(threading.Thread(target=settler, args=(items,)))  # the completion thread, in order
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert order == items


def test_wait_lets_the_backend_finish_the_transfer_on_the_waiting_thread():
    import numpy as np

    from kvxfer.handle import Op, TransferHandle

    h = TransferHandle(Op.WRITE, "peer", 64, "cuda_ipc", np.zeros(0, dtype=np.int64))
    seen = []

    def driver(timeout):
        seen.append((threading.current_thread(), timeout))
        h.set_done()

    h.set_driver(_FnDriver(driver))
    assert h.wait(2.0).nbytes == 64
    assert seen == [(threading.current_thread(), 2.0)]
    # a driver that gives up or fails leaves the ordinary wait in charge
    h2 = TransferHandle(Op.READ, "peer", 8, "cuda_ipc", np.zeros(0, dtype=np.int64))
    h2.set_driver(_FnDriver(lambda timeout: (_ for _ in ()).throw(RuntimeError("query failed"))))
    threading.Timer(0.05, h2.set_done).start()
    assert h2.wait(5.0).nbytes == 8


class _Copy:
    """A queued copy whose 'event' completes when the test says so."""

    def __init__(self, name):
        self.name, self.complete, self.synced = name, threading.Event(), 0


def _thread_over(copies_done, released, **kw):
    oc = OrderedCompletion(lambda item, err: copies_done.append((item.name, err)))

    def sync(c):
        c.synced += 1
        assert c.complete.wait(10)
        return None

    ct = CompletionThread(oc, sync=sync, query=lambda c: c.complete.is_set(),
                          release=lambda c: released.append(c.name), name="test-done", **kw)
    return oc, ct


def _queue(oc, ct, *copies, driven=True):
    for c in copies:  # in stream order, as the backend does
        oc.add(c)
        ct.submit(c, driven=driven)


def _until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_driven_items_nobody_waits_for_are_swept_in_order_and_released_once():
    done, released = [], []
    oc, ct = _thread_over(done, released, sweep_s=0.002, max_age_s=10.0)
    copies = [_Copy(f"c{i}") for i in range(4)]
    _queue(oc, ct, *copies)
    time.sleep(0.02)
    assert done == [] and released == []  # not complete: the sweep only queries, never blocks
    assert all(c.synced == 0 for c in copies)
    copies[0].complete.set()
    copies[1].complete.set()
    _until(lambda: len(released) == 2)
    assert [d[0] for d in done] == ["c0", "c1"]
    for c in copies[2:]:
        c.complete.set()
    _until(lambda: len(released) == 4)
    assert [d[0] for d in done] == ["c0", "c1", "c2", "c3"] and released == ["c0", "c1", "c2", "c3"]
    assert ct.close(5)


def test_an_eager_item_finishes_the_driven_ones_before_it_and_each_is_released_once():
    done, released = [], []
    oc, ct = _thread_over(done, released, sweep_s=10.0, linger_s=0.0, max_age_s=10.0)
    d, e = _Copy("driven"), _Copy("eager")
    _queue(oc, ct, d)
    _queue(oc, ct, e, driven=False)
    d.complete.set()
    e.complete.set()
    _until(lambda: len(released) == 2)
    assert [x[0] for x in done] == ["driven", "eager"]
    assert sorted(released) == ["driven", "eager"]
    assert ct.close(5)


def test_a_kicked_item_is_waited_for_at_once_and_a_caller_may_settle_first():
    done, released = [], []
    oc, ct = _thread_over(done, released, sweep_s=10.0, linger_s=10.0, max_age_s=10.0)
    a, b = _Copy("a"), _Copy("b")
    _queue(oc, ct, a, b)
    assert oc.settle(a) is True  # its caller saw it complete and finished it (a is then released by a sweep)
    ct.kick(b)  # b's caller gave up driving: the thread blocks on it
    _until(lambda: b.synced == 1)
    assert done == [("a", None)]
    b.complete.set()
    _until(lambda: len(released) == 2)
    assert done == [("a", None), ("b", None)] and released == ["a", "b"] and a.synced == 0
    assert ct.close(5)


def test_a_driven_item_left_alone_past_its_age_is_waited_for():
    done, released = [], []
    oc, ct = _thread_over(done, released, sweep_s=0.002, linger_s=0.0, max_age_s=0.02)
    c = _Copy("forgotten")
    _queue(oc, ct, c)
    _until(lambda: c.synced == 1)  # nobody drove or kicked it: after max_age the thread blocks on it
    assert done == []
    c.complete.set()
    _until(lambda: released == ["forgotten"])
    assert done == [("forgotten", None)]
    assert ct.close(5)


def test_closing_finishes_every_outstanding_driven_item():
    done, released = [], []
    oc, ct = _thread_over(done, released, sweep_s=10.0, linger_s=10.0, max_age_s=10.0)
    c = _Copy("late")
    _queue(oc, ct, c)
    threading.Timer(0.05, c.complete.set).start()
    assert ct.close(5)
    assert done == [("late", None)] and released == ["late"]


def test_a_done_callback_on_a_driven_handle_asks_the_backend_to_finish_it_alone():
    import numpy as np

    from kvxfer.handle import Op, TransferHandle

    h = TransferHandle(Op.WRITE, "peer", 64, "cuda_ipc", np.zeros(0, dtype=np.int64))
    drv = _FnDriver(lambda timeout: None)
    h.set_driver(drv)
    got = []
    h.add_done_callback(got.append)
    assert drv.watched == 1 and got == []
    h.set_done()
    assert got == [h]
    h.add_done_callback(got.append)  # finished: called at once, nothing to watch
    assert drv.watched == 1 and got == [h, h]
