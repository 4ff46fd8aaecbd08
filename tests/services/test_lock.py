"""services.lock.SharedExclusiveLock with real threads (the app's guard around torch.fx model building)."""

from __future__ import annotations

import threading
import time

from services.lock import SharedExclusiveLock


def test_readers_share_and_writer_is_alone():
    lock = SharedExclusiveLock()
    events: list[str] = []
    inside = {"readers": 0, "max_readers": 0, "writer_saw_readers": None}
    guard = threading.Lock()
    started = threading.Barrier(3)

    def reader(i):
        started.wait()
        with lock.shared():
            with guard:
                inside["readers"] += 1
                inside["max_readers"] = max(inside["max_readers"], inside["readers"])
            time.sleep(0.2)
            with guard:
                inside["readers"] -= 1
            events.append(f"r{i}")

    def writer():
        time.sleep(0.05)  # the readers are inside by now
        with lock.exclusive():
            inside["writer_saw_readers"] = inside["readers"]
            events.append("w")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert inside["max_readers"] == 3  # readers overlapped
    assert inside["writer_saw_readers"] == 0 and events[-1] == "w"  # the writer waited for all of them


def test_waiting_writer_blocks_new_readers():
    lock = SharedExclusiveLock()
    order: list[str] = []
    first_in = threading.Event()

    def long_reader():
        with lock.shared():
            first_in.set()
            time.sleep(0.3)
            order.append("reader1")

    def writer():
        first_in.wait()
        with lock.exclusive():
            order.append("writer")

    def late_reader():
        first_in.wait()
        time.sleep(0.1)  # arrives while the writer waits
        with lock.shared():
            order.append("reader2")

    threads = [threading.Thread(target=f) for f in (long_reader, writer, late_reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert order == ["reader1", "writer", "reader2"]


def test_a_reader_may_take_the_lock_again_and_upgrade():
    """Re-entrant per thread: shared inside shared never waits, exclusive inside shared waits only for
    the other threads' holds (a first bank load inside a request)."""
    lock = SharedExclusiveLock()
    order: list[str] = []
    other_in, other_may_leave = threading.Event(), threading.Event()

    def other_reader():
        with lock.shared():
            other_in.set()
            other_may_leave.wait(5)
            order.append("other left")

    t = threading.Thread(target=other_reader)
    t.start()
    other_in.wait(5)
    with lock.shared():
        with lock.shared():  # nested: no wait
            order.append("nested")
        threading.Timer(0.2, other_may_leave.set).start()
        with lock.exclusive():  # waits for the other reader only, not for this thread's own hold
            order.append("upgraded")
        with lock.shared():
            order.append("shared again")
    t.join(5)
    assert order == ["nested", "other left", "upgraded", "shared again"]


def test_two_upgrading_readers_do_not_deadlock():
    lock = SharedExclusiveLock()
    done: list[int] = []
    both_in = threading.Barrier(2)

    def reader(i):
        with lock.shared():
            both_in.wait(5)
            with lock.exclusive():
                done.append(i)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(done) == [0, 1]
