"""Tokenizer worker processes: one pair of pipes per worker, replies in order, a dead worker noticed
within POLL_SECONDS, and workers that never die of the trainer's Ctrl-C or SIGTERM.

Light on purpose: a spawned worker imports this module (not torch) before its first instruction runs.
The stream that feeds them is stream.py; docs/reliability.md, "Tokenizer workers", says why not
ProcessPoolExecutor."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tripletctl.core.errors import DataError, TripletctlError, WorkerDiedError, one_line
from tripletctl.data.tokenizer import load_tokenizer

POLL_SECONDS = 0.1  # how often a wait for data checks for a stop request or a dead worker
CLOSE_SECONDS = 2.0  # close() waits this long for workers and the reader thread, then kills


def encode(tokenizer, texts: list[str], max_length: int):
    """Unpadded: the rows' ids back to back, their lengths and the padding id (see `pad_ragged`)."""
    import numpy as np

    rows = tokenizer(
        texts, truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths, int(tokenizer.pad_token_id or 0)


def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive a trainer killed with SIGKILL: it holds a tokenizer (hundreds of MB)
    and keeps the multiprocessing resource tracker alive. On Linux the kernel kills it when the
    trainer dies (PR_SET_PDEATHSIG); everywhere a thread also watches the parent's pid."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the trainer died before the above took effect
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="tripletctl-parent-watch", daemon=True).start()


# Ctrl-C reaches the whole process group, SIGTERM too from a batch system: the trainer handles both
# (checkpoint, exit 130) and then closes its workers, so a worker must never die of them: that would
# read as "worker died" (exit 5), with a KeyboardInterrupt traceback from the worker's start-up.
_TRAINER_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _trainer_signals_blocked() -> Iterator[None]:
    """Around starting a worker: the child inherits the blocked signals through fork and exec, so it is
    immune from its first instruction (its interpreter's start-up and imports take seconds) until
    `_worker_main` ignores them. The trainer gets a signal that came meanwhile when it unblocks."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups to signal
        yield
        return
    # Process.start() starts multiprocessing's resource tracker the first time, and that *unblocks*
    # SIGINT and SIGTERM when it is done: start it first, so our mask holds for the worker's fork.
    multiprocessing.resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _TRAINER_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_main(tokenizer_path: str, requests: Any, replies: Any, parent_pid: int) -> None:
    """One tokenizer worker: (texts, max_length) in, ("ok", token ids, lengths, pad id) or ("error", text) out, in order.
    Ends when the request pipe closes (the stream closed, or the trainer died)."""
    for sig in _TRAINER_SIGNALS:  # the trainer's (it checkpoints, then closes us); blocked since fork
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _TRAINER_SIGNALS)
    _die_with_parent(parent_pid)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        tokenizer, failure = load_tokenizer(tokenizer_path), None
    except Exception as error:  # answered to every request, so the trainer reports it as bad input
        failure = str(error) if isinstance(error, TripletctlError) else f"cannot load the tokenizer: {one_line(error)}"
        tokenizer = None
    if "torch" in sys.modules:  # transformers may have imported it: one thread per worker
        sys.modules["torch"].set_num_threads(1)
    while True:
        try:
            texts, max_length = requests.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("error", failure) if failure else ("ok", *encode(tokenizer, texts, max_length))
        except Exception as error:
            reply = ("error", f"tokenisation failed in a worker process: {one_line(error)}")
        try:
            replies.send(reply)
        except OSError:
            return


class StreamInterrupted(Exception):
    """The wait for the next batch ended because the caller asked to stop (Ctrl-C / SIGTERM)."""


class TokenizerPool:
    """Worker processes with their own pair of pipes: batch k goes to worker k % n and its reply comes
    back on that worker's pipe, so replies stay in order.

    Not ProcessPoolExecutor: when one of its workers is killed half-way through sending a result, its
    manager thread blocks for ever in recv() on the half message (the parent holds the pipe's write
    end, so no end-of-file comes), futures never resolve and shutdown() joins that thread: training
    hangs and SIGTERM cannot stop it. Here the parent holds no write end of a reply pipe, so a dead
    worker reads as end-of-file, and waits also watch each worker's sentinel."""

    def __init__(self, workers: int, tokenizer_path: str):
        context = multiprocessing.get_context("spawn")
        self._workers: list[tuple[Any, Any, Any]] = []  # (process, request writer, reply reader)
        self._next = 0
        try:
            for i in range(workers):
                request_reader, request_writer = context.Pipe(duplex=False)
                reply_reader, reply_writer = context.Pipe(duplex=False)
                process = context.Process(
                    target=_worker_main,
                    name=f"tripletctl-tokenizer-{i}",
                    daemon=True,
                    args=(tokenizer_path, request_reader, reply_writer, os.getpid()),
                )
                with _trainer_signals_blocked():
                    process.start()
                request_reader.close()  # the worker's ends: keeping them would hide its death
                reply_writer.close()
                self._workers.append((process, request_writer, reply_reader))
        except BaseException:
            self.kill()
            raise

    def submit(self, texts: list[str], max_length: int) -> int:
        """Send a batch to the next worker; returns the ticket to pass to `result`."""
        index = self._next
        self._next = (index + 1) % len(self._workers)
        try:
            self._workers[index][1].send((texts, max_length))
        except OSError:  # broken pipe: that worker is gone
            raise self._died(index) from None
        return index

    def result(self, index: int, should_stop: Callable[[], bool]) -> tuple[Any, Any]:
        process, _, replies = self._workers[index]
        while True:
            if should_stop():
                raise StreamInterrupted
            ready = multiprocessing.connection.wait([replies, process.sentinel], timeout=POLL_SECONDS)
            if replies in ready:
                try:
                    reply = replies.recv()
                except (EOFError, OSError):  # end-of-file or a reply cut off by the worker's death
                    raise self._died(index) from None
                if reply[0] == "error":
                    raise DataError(reply[1])
                return tuple(reply[1:])  # (token ids back to back, lengths, pad id)
            if ready:  # the sentinel alone: dead with nothing left to read
                raise self._died(index)

    def _died(self, index: int) -> WorkerDiedError:
        process = self._workers[index][0]
        process.join(timeout=1.0)
        code = process.exitcode
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"signal {-code}"
            if -code == signal.SIGKILL:
                how += ", e.g. by `kill -9` or the out-of-memory killer"
        else:
            how = f"exit code {code}" if code is not None else "its pipe broke"
        return WorkerDiedError(f"tokenizer worker process {process.pid} died ({how})")

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """End-of-file to every worker, a short wait, then SIGKILL for any still running: never blocks."""
        for _, requests, _ in self._workers:
            requests.close()
        deadline = time.monotonic() + timeout
        for process, _, _ in self._workers:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for process, requests, replies in self._workers:
            if process.exitcode is None:
                process.kill()
                process.join(timeout=1.0)
            requests.close()
            replies.close()
