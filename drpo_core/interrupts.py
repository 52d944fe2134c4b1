"""SIGINT and SIGTERM during a run: the first stops after the step, the second at once.

``with StopSignals(message) as signals:`` around the training loop:

* the first SIGINT or SIGTERM only sets ``signals.requested`` (its name): the loop finishes the
  current step, checkpoints and returns;
* the second one ends every worker process (``worker.kill_workers``) and raises
  :class:`~drpo_core.errors.RunAborted` (``message(name)`` as its text) in the main thread: nothing
  half-done is written (a checkpoint being written is dropped, ``latest`` keeps naming the last
  complete one; metrics lines are flushed as they are written);
* Python runs signal handlers only between bytecodes of the main thread, so a main thread stuck in
  C code (a native library that never returns, a lock) would not see them. A watchdog thread reads
  the signals from ``signal.set_wakeup_fd``, which the interpreter writes the moment a signal
  arrives; when the main thread has not left the ``with`` block ``grace`` seconds after the second
  signal, the watchdog ends the workers, prints the message and exits the process with code 130
  (``os._exit``: as safe as a kill, which checkpoints are written to survive).

Outside the main thread (a run started from a thread) nothing is installed.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from types import TracebackType

from drpo_core.errors import RunAborted
from drpo_core.worker import kill_workers

SIGNALS = (signal.SIGINT, signal.SIGTERM)
ABORT_EXIT_CODE = 130


class StopSignals:
    def __init__(self, message: Callable[[str], str], grace: float = 1.0):
        self.message, self.grace = message, grace
        #: the name of the first signal received ("SIGINT", "SIGTERM"), None before
        self.requested: str | None = None
        self._done = threading.Event()
        self._previous: dict[int, object] = {}
        self._old_wakeup = -1
        self._sockets: tuple[socket.socket, socket.socket] | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._sockets = (reader, writer)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        self._old_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(reader,), name="drpo-signal-watch", daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._done.set()
        if self._sockets is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        reader, writer = self._sockets
        writer.close()  # the watchdog's recv returns b"" and it ends; it closes the reader
        self._sockets = None

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            return
        kill_workers()
        raise RunAborted(self.message(name))

    def _watch(self, reader: socket.socket) -> None:
        seen: list[str] = []
        try:
            while not self._done.is_set():
                data = reader.recv(64)
                if not data:
                    return
                seen += [signal.Signals(b).name for b in data if b in SIGNALS]
                if len(seen) >= 2:
                    if self._done.wait(self.grace):
                        return
                    kill_workers()
                    os.write(2, f"{self.message(seen[1])}\n".encode())
                    os._exit(ABORT_EXIT_CODE)
        finally:
            reader.close()
