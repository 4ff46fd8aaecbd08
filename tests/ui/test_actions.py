"""ui.actions.SharedExclusiveLock with real threads (the app's guard around torch.fx model building)."""

from __future__ import annotations

import threading
import time

from ui.actions import SharedExclusiveLock


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
