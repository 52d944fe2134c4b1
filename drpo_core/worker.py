"""Components in a worker process: every call has a deadline, and a worker that passes it is ended.

Python cannot stop a thread, so a component that may hang (a ranker with ``timeout``, a remote
ranker) lives in a child process, which can be killed. The generic part is :class:`Worker`::

    worker = Worker(build, (arg, ...), name="ranker 'x'", timeout=30.0, report=("binary",))
    worker.attributes                       # {"binary": False}: read from the built object once
    worker.call("score", images, prompts, metadata)   # WorkerTimeout after 30 s; the child is killed
    worker.close()

* The child is started with the ``spawn`` method (``fork`` would copy the parent's CUDA state), runs
  ``build(*args)`` once and then serves ``call(method, *args)`` on the object it returned, one call
  at a time. ``build``, ``args``, call arguments and results travel through a ``multiprocessing``
  Pipe by pickle: ``build`` must be importable by name, i.e. a function defined at module level (or a
  ``functools.partial`` of one) in an importable module; a lambda, a nested function or one defined
  in the ``__main__`` script is refused with one clear error. Tensors travel as CPU copies. The child
  does not run the parent's main script again (``spawn`` would, to find objects pickled from it): a
  script that starts a run needs no ``if __name__ == "__main__":`` guard for the worker's sake.
* ``timeout`` (seconds, ``None``: no limit) bounds each call from sending its arguments to receiving
  the answer; ``call(..., timeout=t)`` overrides it for one call; ``start_timeout`` bounds the build
  (default: no limit, loading a model takes what it takes).
* An exception raised by a call in the child is raised again in the parent, as the same type when it
  can be pickled (else :class:`WorkerCallError`, naming the type), and the worker stays up.
  :class:`WorkerTimeout` (no answer by the deadline) and :class:`WorkerDied` (the child exited) end
  the worker; both are :class:`WorkerLost`, a ``ComponentError``. An interrupt while waiting (a
  second Ctrl-C) ends the worker too.
* The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C, a scheduler's SIGTERM reach the whole
  process group: the parent decides, and finishes its step first), exits when the parent closes its
  end of the pipe or exits, and on Linux is killed when its parent dies. :func:`kill_workers` ends
  every live worker of the process at once (SIGKILL).

:func:`ranker_in_worker` builds a registered ranker this way and returns a :class:`WorkerRanker`, a
``Ranker`` whose ``score`` and ``groups`` run in the worker; the loop uses it for rankers whose
config section sets ``timeout``.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

import torch

from drpo_core.context import BuildContext
from drpo_core.errors import ComponentError, PluginError, first_line
from drpo_core.interfaces import API_VERSION, Ranker

if TYPE_CHECKING:
    from drpo_core.registry import Registry

_LIVE: weakref.WeakSet[Worker] = weakref.WeakSet()
_LIVE_LOCK = threading.RLock()  # re-entrant: kill_workers may run in a signal handler of a thread holding it
_DEFAULT = object()


class WorkerError(ComponentError):
    """A worker could not be started (its build function or arguments cannot be sent, say)."""


class WorkerLost(ComponentError):
    """The worker is gone: it passed its deadline (and was ended) or it exited; or what it serves from is
    (a remote ranker whose server stayed unreachable or answered wrongly until its deadline). The loop
    checkpoints the completed steps and stops."""


class WorkerTimeout(WorkerLost):
    """A call got no answer within the deadline; the worker process was killed."""

    def __init__(self, name: str, seconds: float, method: str):
        super().__init__(f"{name} did not answer {method}() within {seconds:g} s: its worker process was ended")
        self.name, self.seconds, self.method = name, seconds, method


class WorkerDied(WorkerLost):
    """The worker process exited (crashed, killed) before answering."""


class WorkerCallError(RuntimeError):
    """A call raised an exception in the worker that cannot travel back as itself (its type's name and
    message are kept). Not a ``ComponentError``: for the loop it is a ranker that raised."""


class Worker:
    """``build(*args)`` in a child process, then ``call(method, *args)`` on it with a deadline (module doc)."""

    def __init__(self, build: Callable[..., Any], args: Sequence[Any] = (), *, name: str,
                 timeout: float | None = None, start_timeout: float | None = None,
                 report: Sequence[str] = ()):
        self.name, self.timeout = name, timeout
        try:
            payload = pickle.dumps((build, tuple(args), tuple(report)))
            if b"__main__" in payload:
                raise pickle.PicklingError("it refers to the __main__ script, which the worker does not run")
        except Exception as error:
            raise WorkerError(f"{name} cannot be sent to a worker process ({first_line(error)}): define its "
                              "build function at module level in an importable module (not a lambda, a nested "
                              "function or the main script)") from None
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, payload, os.getpid()), daemon=True,
                                        name=f"drpo worker: {name}")
        with _main_hidden():
            self._process.start()
        child.close()
        with _LIVE_LOCK:
            _LIVE.add(self)
            _kill_at_exit()
        #: the values of ``report``'s attribute names on the built object (None where it has none)
        self.attributes: dict[str, Any] = self._receive(start_timeout, "build")

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def call(self, method: str, *args: Any, timeout: float | None | object = _DEFAULT) -> Any:
        """``method(*args)`` on the built object in the child; ``timeout`` defaults to the worker's."""
        if not self.alive:
            raise WorkerDied(f"{self.name}: its worker process is not running")
        seconds = self.timeout if timeout is _DEFAULT else timeout
        try:
            self._conn.send((method, args))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.kill()
            raise WorkerDied(f"{self.name}: its worker process exited (code {self._process.exitcode})") from None
        return self._receive(seconds, method)  # type: ignore[arg-type]

    def _receive(self, seconds: float | None, method: str) -> Any:
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = wait([self._conn, self._process.sentinel], remaining)
                if self._conn in ready:
                    try:
                        kind, value = self._conn.recv()
                    except (EOFError, OSError):
                        break
                    if kind == "ok":
                        return value
                    _raise_remote(value)
                if self._process.sentinel in ready:
                    break
                if not ready:
                    self.kill()
                    raise WorkerTimeout(self.name, seconds or 0.0, method)
        except BaseException as error:  # the call's own exception, a lost worker, an interrupt (second Ctrl-C)
            if method == "build" or not isinstance(error, Exception):
                self.kill()
            raise
        self.kill()
        raise WorkerDied(f"{self.name}: its worker process exited during {method}() "
                         f"(code {self._process.exitcode})")

    def close(self, grace: float = 2.0) -> None:
        """Ask the child to exit, wait up to ``grace`` seconds, then kill it."""
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._process.join(grace)
        self.kill()

    def kill(self) -> None:
        """End the child now (SIGKILL) and release the pipe."""
        if self._process.pid is not None and self._process.exitcode is None:
            self._process.kill()
            self._process.join(5)
        self._conn.close()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __del__(self) -> None:
        try:
            self.kill()
        except Exception:
            pass


@contextmanager
def _main_hidden() -> Iterator[None]:
    """While a worker starts, the main module shows no file or spec, so ``spawn`` does not run the parent's
    main script (or ``-m`` module) again in the child: the worker only needs importable modules."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved: dict[str, Any] = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


_AT_EXIT: list[bool] = []


def _kill_at_exit() -> None:
    """Kill live workers when the interpreter exits, before multiprocessing's own exit handler (registered
    earlier, so it runs later) joins them: they ignore SIGTERM, so its terminate() would not end them."""
    if not _AT_EXIT:
        atexit.register(kill_workers)
        _AT_EXIT.append(True)


def kill_workers() -> None:
    """End every live worker of this process (safe from a signal handler or another thread)."""
    with _LIVE_LOCK:
        workers = list(_LIVE)
    for worker in workers:
        process = worker._process
        if process.pid is not None and process.exitcode is None:
            try:
                process.kill()  # SIGKILL; no join, no lock: safe in a signal handler or the watchdog thread
            except (OSError, ValueError):
                pass


def _raise_remote(info: tuple[str, str, bytes | None]) -> None:
    type_name, message, blob = info
    if blob is not None:
        try:
            error = pickle.loads(blob)
        except Exception:
            error = None
        if isinstance(error, BaseException):
            raise error
    raise WorkerCallError(f"{type_name}: {message}")


# -- the child ------------------------------------------------------------------------------------


def _serve(conn: Any, payload: bytes, parent: int) -> None:
    """The worker process: build, report, then answer calls until the parent closes the pipe. It leaves with
    ``os._exit`` (after flushing its output): the interpreter's teardown after torch takes a second or more,
    which ``close`` would otherwise wait for."""
    # a terminal's Ctrl-C and a scheduler's SIGTERM (Slurm signals every process of a job) reach the whole
    # process group: the parent decides (it finishes the step first), and kills this process when it must
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)
    try:
        build, args, report = pickle.loads(payload)
        target = build(*args)
        conn.send(("ok", {name: getattr(target, name, None) for name in report}))
    except BaseException as error:
        _send_error(conn, error)
        _leave(1)
    _answer(conn, target)
    _leave(0)


def _leave(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _answer(conn: Any, target: Any) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        method, args = message
        try:
            result = getattr(target, method)(*args)
        except Exception as error:
            _send_error(conn, error)
            continue
        try:
            conn.send(("ok", result))
        except Exception as error:  # the result does not pickle
            _send_error(conn, WorkerCallError(f"{method}() returned a {type(result).__name__}, which cannot be "
                                              f"sent back: {first_line(error)}"))


def _send_error(conn: Any, error: BaseException) -> None:
    try:
        blob: bytes | None = pickle.dumps(error)
    except Exception:
        blob = None
    try:
        conn.send(("error", (type(error).__name__, first_line(error), blob)))
    except OSError:
        pass


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when its parent dies (a hung call must not outlive a killed run)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


# -- rankers in a worker ------------------------------------------------------------------------------


class _RankerHost:
    """The child's side of a :class:`WorkerRanker`: the ranker itself, fed on its own device."""

    def __init__(self, ranker: Any, device: str):
        self.ranker, self.device = ranker, device
        self.api_version = getattr(ranker, "api_version", API_VERSION)
        self.binary = bool(getattr(ranker, "binary", False))
        self.differentiable = bool(getattr(ranker, "differentiable", False))
        # what `drpo doctor` checks a ranker against (its declared range; whether it reads the prompt)
        self.uses_prompt = bool(getattr(ranker, "uses_prompt", True))
        self.score_range = getattr(ranker, "score_range", None)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[Any]) -> Any:
        with torch.no_grad():
            scores = self.ranker.score(images.to(self.device), prompts, metadata)
        return scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores

    def groups(self, record: Any) -> list[str]:
        return self.ranker.groups(record)


def _build_ranker(factory: Callable[[Any, BuildContext], Any], options: Any, context: BuildContext) -> _RankerHost:
    return _RankerHost(factory(options, context), context.device)


#: a hosted ranker's declarations its :class:`WorkerRanker` repeats
_REPORTED = ("api_version", "binary", "differentiable", "uses_prompt", "score_range")


class WorkerRanker(Ranker):
    """A ranker that lives in a :class:`Worker`: ``score`` sends CPU images and waits with the deadline."""

    def __init__(self, worker: Worker, name: str):
        self.worker, self.name = worker, name
        # the hosted ranker's declarations, per instance (a worker can host any ranker class)
        for attribute in _REPORTED:
            setattr(self, attribute, worker.attributes[attribute])

    @property
    def timeout(self) -> float | None:
        return self.worker.timeout

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        scores: torch.Tensor = self.worker.call("score", images.detach().cpu(), list(prompts), list(metadata))
        return scores

    def groups(self, record: Any) -> list[str]:
        return self.worker.call("groups", record)

    def close(self) -> None:
        self.worker.close()


def build_ranker(registry: Registry, reference: str, options: Any, context: BuildContext, *, where: str,
                 timeout: float | None = None) -> Any:
    """A ranker as a run builds it: in this process, or, with its section's ``timeout``, in a worker process whose
    calls are ended when they pass it (:func:`ranker_in_worker`)."""
    if timeout is None:
        return registry.build("ranker", reference, options, context, where)
    return ranker_in_worker(registry, reference, options, context, where=where, timeout=timeout)


def ranker_in_worker(registry: Registry, reference: str, options: Any, context: BuildContext, *,
                     where: str, timeout: float) -> WorkerRanker:
    """Build the ranker ``reference`` (``name[:variant]``) in a worker process whose calls may take
    ``timeout`` seconds each; ``options`` and errors as ``Registry.build``, ``where`` names the section."""
    from drpo_core.registry import _check_built, split_reference

    spec = registry.get("ranker", reference)
    if spec.options is None or not isinstance(options, spec.options):
        options = registry.validate_options("ranker", reference, options, where)
    try:
        if b"__main__" in pickle.dumps(spec.factory):
            raise pickle.PicklingError("defined in the main script")
    except Exception:
        factory = getattr(spec.factory, "__qualname__", repr(spec.factory))
        raise PluginError(f"{where}.timeout: ranker {spec.name!r} cannot run in a worker process: its factory "
                          f"{factory} (from {spec.plugin.distribution}) cannot be pickled; register a function "
                          "defined at module level in an importable module (not a lambda, a nested function "
                          "or the main script)") from None
    context = BuildContext(**{**context.__dict__, "variant": split_reference(reference)[1], "timeout": timeout})
    try:
        # named as referenced: a variant says which one (a remote ranker's is its URL)
        worker = Worker(_build_ranker, (spec.factory, options, context), name=f"ranker {reference!r}",
                        timeout=timeout, report=_REPORTED)
    except ImportError as error:
        raise PluginError(f"ranker {spec.name!r} from {spec.plugin.distribution} needs a missing package: "
                          f"{error}") from error
    ranker = WorkerRanker(worker, spec.name)
    try:
        _check_built(spec, ranker)
    except BaseException:
        worker.close()
        raise
    return ranker
