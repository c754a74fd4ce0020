"""OrderedCompletion: each queued item finished once, oldest first, whichever thread settles."""

import random
import threading

from kvxfer.backends._ordered_completion import OrderedCompletion


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

    h._driver = driver
    assert h.wait(2.0).nbytes == 64
    assert seen == [(threading.current_thread(), 2.0)]
    # a driver that gives up or fails leaves the ordinary wait in charge
    h2 = TransferHandle(Op.READ, "peer", 8, "cuda_ipc", np.zeros(0, dtype=np.int64))
    h2._driver = lambda timeout: (_ for _ in ()).throw(RuntimeError("query failed"))
    threading.Timer(0.05, h2.set_done).start()
    assert h2.wait(5.0).nbytes == 8
