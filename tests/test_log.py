"""The log handler's backlog bound, against a log that cannot be written.

The log is a FIFO nobody reads: once the pipe is full, the handler's writer
thread blocks in write(), as it would on a stalled disk. Whatever the
callers add, what waits for the writer stays under the bound; the rest is
dropped and counted, and once the pipe is read again one line says how many
lines were lost.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

from harness import wait_until

from prefork_smtpd.log import (
    FLUSH_AT, LOG_LINES_DROPPED, AppendLineHandler, close_log, flush_log, line_writer, open_log, reopen_log,
)
from prefork_smtpd.stats import SharedStats

BOUND = 256 * 1024
DROP_LINE = re.compile(r"(\d+) log lines dropped since \d\d:\d\d:\d\d: the log could not be written fast enough\n")


def stalled_log(tmp_path: Path) -> tuple[Path, int]:
    """(path, reading end) of a FIFO whose reader reads only when told."""
    path = tmp_path / "log.fifo"
    os.mkfifo(path)
    return path, os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # first: the handler's open waits for a reader


def read_available(reader: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(reader, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_log_that_cannot_be_written_holds_at_most_the_bound_then_says_what_it_dropped(tmp_path):
    path, reader = stalled_log(tmp_path)
    stats = SharedStats()
    slot = stats.slot(3)
    handler = AppendLineHandler(str(path), "worker 3: ", stats, buffered=True, max_backlog=BOUND, slot=slot)
    try:
        sent = [f"event {n:06d} " + "x" * 80 for n in range(20_000)]  # 2 MB of lines, 8 times the bound
        peak = 0
        for message in sent:
            handler.add_line(message)
            peak = max(peak, handler.backlog())
        assert peak <= BOUND, f"the backlog reached {peak} bytes, over the bound of {BOUND}"
        assert peak > BOUND - FLUSH_AT, f"the backlog peaked at {peak}: the bound was never reached"
        dropped = handler.dropped
        assert dropped > 10_000, "lines were kept past the bound"
        assert slot.get(LOG_LINES_DROPPED) == dropped, "the shared counter disagrees with the handler"

        # A crash line is never dropped, even while dropping.
        stats.set("logging", 1)
        crash = logging.LogRecord("prefork_smtpd", logging.CRITICAL, __file__, 1, "worker 3 crashed: boom", None, None)
        handler.emit(crash)
        handler.add_line("one more ordinary line, dropped")
        assert handler.dropped == dropped + 1 and slot.get(LOG_LINES_DROPPED) == dropped + 1

        # The pipe is read again: the writer catches up, and a flush (the
        # worker's tick) says what was lost, then lines flow again.
        received = bytearray()

        def drop_line_arrived():
            received.extend(read_available(reader))
            handler.flush()
            return DROP_LINE.search(received.decode())

        match = wait_until(drop_line_arrived, timeout=30, what="the drop line")
        assert int(match.group(1)) == dropped + 1
        assert slot.get(LOG_LINES_DROPPED) == dropped + 1
        handler.add_line("after the gap")
        handler.flush()
        wait_until(lambda: received.extend(read_available(reader)) or b"after the gap" in received, timeout=30)
        lines = received.decode().splitlines()
        assert all(line[:19].count(":") == 2 and " : worker 3: " in line for line in lines)
        kept = [line.split(" : worker 3: ", 1)[1] for line in lines]
        # What went out is the first lines in order, the crash line, the drop line, then the new line.
        ordinary = kept[: kept.index("worker 3 crashed: boom")]
        assert ordinary == sent[: len(ordinary)]
        assert len(ordinary) + dropped == len(sent)
        assert kept[len(ordinary):] == ["worker 3 crashed: boom", match.group(0)[:-1], "after the gap"]
        assert handler.dropped == 0 and handler.backlog() == 0
    finally:
        os.close(reader)  # a writer still blocked gets EPIPE and stops
        handler.close()


def test_an_unbuffered_log_never_drops(tmp_path):
    """The master writes each line at once: nothing waits, nothing is dropped."""
    stats = SharedStats()
    handler = AppendLineHandler(str(tmp_path / "log.txt"), "", stats, buffered=False, max_backlog=64 * 1024)
    for n in range(2000):
        handler.add_line(f"line {n} " + "y" * 100)
    handler.close()
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 2000
    assert handler.dropped == 0


def test_reopening_a_log_that_cannot_be_written_does_not_wait_for_it(tmp_path):
    """logrotate's USR1 makes a worker reopen its log from the event loop:
    a writer blocked on the old file must not hold the loop. The old
    writer finishes the old file on its own, then closes it; until it has,
    another reopen is refused with a line saying why (each would leave one
    more blocked writer and its lines behind)."""
    path, reader = stalled_log(tmp_path)
    stats = SharedStats()
    logger = open_log(str(path), stats, "worker 1", buffered=True, max_backlog=BOUND)
    old = line_writer(logger)
    sent = [f"before the rotation {n} " + "x" * 80 for n in range(5000)]  # 600 KB: the writer blocks
    for message in sent:
        old.add_line(message)
    old.flush()
    path.rename(tmp_path / "log.fifo.1")  # logrotate moves it; the name now opens a new plain file
    try:
        opened = threading.Event()
        reopen_log(logger, announce="log file reopened", on_open=opened.set)
        assert opened.wait(30), "the new file never opened"
        assert flush_log(logger) is line_writer(logger) is not old
        fresh = line_writer(logger)
        threads = threading.active_count()
        for _ in range(20):
            reopen_log(logger)
        assert threading.active_count() == threads, "a reopen started a thread beside the blocked writer"
        fresh.add_line("after the rotation")
        assert fresh.wait_written(30)
        assert [line.split(" : worker 1: ", 1)[1] for line in path.read_text().splitlines()] == (
            ["log file reopened"]
            + ["log file not reopened: the file left at the last reopen is still being written"] * 20
            + ["after the rotation"]
        )
        received = bytearray()

        def old_file_closed() -> bool:
            try:
                chunk = os.read(reader, 65536)
            except BlockingIOError:
                return False
            received.extend(chunk)
            return not chunk  # end of file: the old writer wrote everything and closed it

        wait_until(old_file_closed, timeout=30, interval=0.01, what="the old writer to finish")
        kept = [line.split(" : worker 1: ", 1)[1] for line in received.decode().splitlines()]
        dropped = DROP_LINE.fullmatch(kept[-1] + "\n")
        assert dropped, f"the last line of the old file is not the drop line: {kept[-1]!r}"
        assert kept[:-1] == sent[: len(kept) - 1] and len(kept) - 1 + int(dropped.group(1)) == len(sent)
        assert old.fd == -1
        # The old file written out, a reopen goes through again.
        wait_until(lambda: not old.writing(), timeout=30, what="the old writer to stop")
        reopen_log(logger, announce="reopened again")
        wait_until(lambda: flush_log(logger) is not fresh, timeout=30, what="the second reopen")
        assert line_writer(logger).wait_written(30)
        assert path.read_text().endswith(" : worker 1: reopened again\n")
    finally:
        os.close(reader)
        close_log(logger)


def test_a_reopen_whose_file_will_not_open_waits_for_nothing_and_swaps_once_it_does(tmp_path):
    """open() of a FIFO nobody reads blocks, as on a stalled disk or network
    file system: the reopen returns at once, the old file takes the lines
    meanwhile, a second reopen is refused, and the swap comes once the
    file opens, its first line the announcement."""
    path = tmp_path / "log.txt"
    stats = SharedStats()
    logger = open_log(str(path), stats, "", buffered=True, max_backlog=BOUND)
    old = line_writer(logger)
    rotated = tmp_path / "log.txt.1"
    path.rename(rotated)
    os.mkfifo(path)
    opened = threading.Event()
    reader = -1
    try:
        reopening = threading.Thread(target=reopen_log, args=(logger, "log file reopened", opened.set), daemon=True)
        reopening.start()
        reopening.join(10)
        assert not reopening.is_alive(), "the reopen waited for the file to open"
        old.add_line("while the new file will not open")
        assert flush_log(logger) is old and line_writer(logger) is old
        reopen_log(logger)  # refused: the first is still opening
        assert old.wait_written(30)
        lines = [line.split(" : ", 1)[1] for line in rotated.read_text().splitlines()]
        assert lines[-2] == "while the new file will not open"
        assert re.fullmatch(rf"log file not reopened: the reopen asked at \d\d:\d\d:\d\d is still opening {re.escape(str(path))}",
                            lines[-1]), lines[-1]

        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # someone reads: the open returns
        assert opened.wait(30)
        assert flush_log(logger) is line_writer(logger) is not old
        line_writer(logger).add_line("in the new file")
        assert line_writer(logger).wait_written(30)
        received = read_available(reader).decode()
        assert [line.split(" : ", 1)[1] for line in received.splitlines()] == ["log file reopened", "in the new file"]
        wait_until(lambda: not old.writing(), timeout=30, what="the old file closed")
    finally:
        if reader >= 0:
            os.close(reader)
        else:  # let the blocked open return, so its thread ends
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        close_log(logger)


def test_a_reopen_that_cannot_open_the_file_says_so_in_the_old_one(tmp_path):
    path = tmp_path / "log.txt"
    logger = open_log(str(path), SharedStats(), "worker 2", buffered=True, max_backlog=BOUND)
    old = line_writer(logger)
    rotated = tmp_path / "log.txt.1"
    path.rename(rotated)
    path.mkdir()  # opening it for writing fails: EISDIR
    opened = threading.Event()
    try:
        reopen_log(logger, on_open=opened.set)
        assert opened.wait(30)
        assert flush_log(logger) is old and line_writer(logger) is old
        old.add_line("still here")
        assert old.wait_written(30)
        lines = [line.split(" : worker 2: ", 1)[1] for line in rotated.read_text().splitlines()]
        assert re.fullmatch(rf"log file {re.escape(str(path))} could not be reopened \(\[Errno 21\] Is a directory: .*\); "
                            "still writing to the one open before", lines[-2]), lines[-2]
        assert lines[-1] == "still here"
    finally:
        close_log(logger)


def test_reopens_sent_in_a_loop_at_a_stalled_log_stay_within_the_bound(tmp_path):
    """USR1 in a loop while the log cannot be written: each failed or
    refused reopen's line is an ordinary one, held within the backlog's
    bound and counted when dropped. (As crash lines they grew the memory
    without limit, one line per signal.)"""
    path, reader = stalled_log(tmp_path)
    slot = SharedStats().slot(2)
    logger = open_log(str(path), SharedStats(), "worker 2", buffered=True, max_backlog=BOUND, slot=slot)
    old = line_writer(logger)
    path.rename(tmp_path / "log.fifo.1")  # the reader still holds it, and never reads
    try:
        for n in range(4000):  # fill the backlog to its bound
            old.add_line(f"filler {n:05d} " + "x" * 80)
        dropped = old.dropped
        assert dropped > 0
        peak = 0

        path.mkdir()  # every reopen fails at once
        for _ in range(300):
            opened = threading.Event()
            reopen_log(logger, on_open=opened.set)
            assert opened.wait(30)
            assert flush_log(logger) is old
            peak = max(peak, old.backlog())
        assert old.dropped == dropped + 300 and slot.get(LOG_LINES_DROPPED) == old.dropped

        path.rmdir()
        os.mkfifo(path)  # no reader: the next reopen's open blocks
        reopen_log(logger)
        for _ in range(20_000):  # each refused: the first is still opening
            reopen_log(logger)
            peak = max(peak, old.backlog())
        assert old.dropped == dropped + 300 + 20_000 and slot.get(LOG_LINES_DROPPED) == old.dropped
        assert peak <= BOUND, f"the backlog reached {peak} bytes, over the bound of {BOUND}"
    finally:
        os.close(reader)  # the stalled writer gets EPIPE and stops
        if path.is_fifo():  # let the blocked open return, so its thread ends
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        close_log(logger, wait=False)


def test_processes_writing_to_one_fifo_never_tear_each_others_lines(tmp_path):
    """A FIFO takes a write whole only up to PIPE_BUF (4 KiB); a batch of
    lines (up to 32 KiB) written in one piece is cut wherever the pipe
    fills, and another process's batch lands inside a line. Two handlers
    (the master and a worker, say) write to a FIFO read slowly: every
    line comes out whole."""
    path, reader = stalled_log(tmp_path)
    writers = [AppendLineHandler(str(path), f"{name}: ", SharedStats(), buffered=True, max_backlog=1 << 30)
               for name in ("master", "worker 1")]
    count = 3000
    received = bytearray()
    try:
        def write(handler):
            for n in range(count):
                handler.add_line(f"line {n:05d} " + "y" * 90)
            handler.flush()

        threads = [threading.Thread(target=write, args=(handler,)) for handler in writers]
        for thread in threads:
            thread.start()

        def all_read():
            try:
                received.extend(os.read(reader, 512))  # a little at a time: the pipe stays full
            except BlockingIOError:
                pass
            return received.count(b"\n") >= 2 * count

        wait_until(all_read, timeout=120, interval=0.001, what="every line")
        lines = received.decode().splitlines()
        torn = [line for line in lines if not re.fullmatch(r"\S+ \S+ : (master|worker 1): line \d{5} y{90}", line)]
        assert not torn, torn[:5]
        for name in ("master", "worker 1"):
            assert [line.split(" : ")[1] for line in lines if f" : {name}: " in line] == [
                f"{name}: line {n:05d} " + "y" * 90 for n in range(count)]
    finally:
        os.close(reader)
        for handler in writers:
            handler.close(wait=False)


def test_lines_that_cannot_be_written_are_counted_as_dropped(tmp_path):
    """The FIFO's reader is gone (EPIPE), as a full disk (ENOSPC) or a file
    past its size limit (EFBIG) would: the lines are lost, but counted with
    the dropped ones, where XSTAT and /metrics show them."""
    path, reader = stalled_log(tmp_path)
    slot = SharedStats().slot(4)
    handler = AppendLineHandler(str(path), "worker 4: ", SharedStats(), buffered=True, slot=slot)
    try:
        handler.add_line("read")
        assert handler.wait_written(30)
        assert read_available(reader).endswith(b" : worker 4: read\n")
        os.close(reader)
        for n in range(100):
            handler.add_line(f"lost {n}")
        assert handler.wait_written(30)
        handler.flush()  # the tick: the writer's count goes to the slot
        assert slot.get(LOG_LINES_DROPPED) == 100
    finally:
        handler.close(wait=False)


def test_a_forked_child_writes_its_own_lines_and_never_the_parents_gathered_ones(tmp_path):
    path = tmp_path / "log.txt"
    handler = AppendLineHandler(str(path), "", SharedStats(), buffered=True)
    handler.add_line("gathered by the parent")  # not flushed: the parent's writer will write it
    pid = os.fork()
    if pid == 0:  # the child, as a worker is before it opens its own log
        try:
            handler.add_line("the child's own")  # written at once: no writer thread here
            handler.close(wait=False)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert path.read_text().endswith(" : the child's own\n")
    handler.close()
    lines = path.read_text().splitlines()
    assert [line.split(" : ", 1)[1] for line in lines] == ["the child's own", "gathered by the parent"]


def test_wait_written_returns_once_the_lines_are_in_the_file_and_waits_once_per_stall(tmp_path):
    """What the master does before a config port reply: its lines so far
    are in the file when the reply goes. A stalled log makes one wait time
    out; later calls do not wait until the writer gets past that point."""
    path, reader = stalled_log(tmp_path)
    handler = AppendLineHandler(str(path), "", SharedStats(), buffered=True, max_backlog=BOUND)
    try:
        handler.add_line("config: max_recipients=7")
        assert handler.wait_written(30)
        assert read_available(reader).endswith(b" : config: max_recipients=7\n")  # in the pipe before the call returned

        for n in range(1500):  # 120 KB: more than the pipe holds, so the writer blocks
            handler.add_line(f"filler {n:05d} " + "x" * 64)
        assert not handler.wait_written(0.2)
        handler.add_line("config: max_recipients=8")
        second = threading.Thread(target=handler.wait_written, args=(3600,))
        second.start()
        second.join(60)
        assert not second.is_alive(), "a second reply waited for a log that already stalled"

        # The pipe is read again: the writer gets past the stalled mark, and
        # the next call waits for its line again.
        received = bytearray()
        wait_until(lambda: received.extend(read_available(reader)) or b"max_recipients=8" in received, timeout=30)
        handler.add_line("config: max_recipients=9")
        done: list[bool] = []
        third = threading.Thread(target=lambda: done.append(handler.wait_written(60)))
        third.start()
        wait_until(lambda: received.extend(read_available(reader)) or not third.is_alive(), timeout=60)
        third.join()
        assert done == [True]
        received.extend(read_available(reader))
        assert received.endswith(b" : config: max_recipients=9\n")
    finally:
        os.close(reader)
        handler.close()
