"""A helper process that runs functions in order and never re-runs the caller's script.

The simulation keeps the HE secret key out of the server's process by giving it to a
helper process (the evaluator; the key provisioner of ``flwr run .``). A
``multiprocessing`` spawn or forkserver child imports the parent's ``__main__`` module
first, so a user's script that calls :func:`sepals.simulate` at top level, without an
``if __name__ == "__main__":`` guard, would start the simulation again in the child and
fail. :class:`HelperProcess` starts a fresh interpreter on this module instead and sends
it pickled ``(function, args)`` calls over a pipe: the caller's script is never
imported there, so ``simulate()`` works pasted into any script.

Functions must be importable by name (module-level functions of sepals); arguments and
results must pickle (the simulation passes bytes, configs and an
:class:`~sepals.simulations.config.AppSource` whose app is already cloudpickled). The
child gets the caller's ``sys.path`` and working directory, so modules next to the
script import there too.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import IO, Any

from sepals.common.errors import SepalsError
from sepals.common.log import show_flower_once
from sepals.common.procs import die_with_parent

_HEADER = struct.Struct("!Q")
_STOP_SECONDS = 30.0


class HelperProcessError(SepalsError):
    """The helper process exited while a call was pending."""


def _write_frame(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> bytes | None:
    """One frame's payload; ``None`` at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return payload


class HelperProcess:
    """A one-worker executor in a fresh Python process (``submit(fn, *args)`` -> Future).

    Calls run one after the other in submission order, as in a one-worker
    ``ProcessPoolExecutor``; :meth:`shutdown` ends the process.

    Args:
        name: What the process does, for error messages (``evaluator``).

    """

    def __init__(self, name: str) -> None:
        self.name = name
        child_in, parent_out = os.pipe()
        parent_in, child_out = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(child_in), str(child_out)],
                pass_fds=(child_in, child_out),
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
        except BaseException:
            for fd in (parent_out, parent_in):
                os.close(fd)
            raise
        finally:
            os.close(child_in)
            os.close(child_out)
        self._out = os.fdopen(parent_out, "wb")
        self._in = os.fdopen(parent_in, "rb")
        self._calls = cf.ThreadPoolExecutor(1, thread_name_prefix=f"sepals-{name}")
        _write_frame(self._out, pickle.dumps(list(sys.path)))

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        """Run ``fn(*args)`` in the helper process after the calls submitted before."""
        return self._calls.submit(self._call, fn, args)

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            _write_frame(self._out, pickle.dumps((fn, args)))
            payload = _read_frame(self._in)
        except (BrokenPipeError, ValueError):  # ValueError: the pipe was closed
            payload = None
        if payload is None:
            code = self._proc.poll()
            raise HelperProcessError(
                f"the {self.name} process exited (code {code}) while running {fn.__name__}"
            )
        ok, value = pickle.loads(payload)
        if ok:
            return value
        raise value

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Cancel or finish the pending calls, then end the process."""
        self._calls.shutdown(wait=wait, cancel_futures=cancel_futures)
        with contextlib.suppress(OSError):
            self._out.close()  # the child reads the end of its input and exits
        try:
            self._proc.wait(timeout=_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        with contextlib.suppress(OSError):
            self._in.close()

    def __enter__(self) -> HelperProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.shutdown(wait=True, cancel_futures=True)


def _outcome(payload: bytes) -> bytes:
    """Run one pickled call; the pickled ``(ok, result or exception)``."""
    try:
        fn, args = pickle.loads(payload)
        result: tuple[bool, Any] = (True, fn(*args))
    except Exception as exc:
        result = (False, exc)
    try:
        return pickle.dumps(result)
    except Exception as exc:  # an unpicklable result or exception
        error = RuntimeError(f"{type(result[1]).__name__}: {result[1]} ({exc})")
        return pickle.dumps((False, error))


def serve(fd_in: int, fd_out: int) -> None:
    """The helper process: run calls from ``fd_in`` and answer on ``fd_out`` until EOF."""
    # Ctrl-C reaches the whole process group: the parent decides when this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    show_flower_once()
    with os.fdopen(fd_in, "rb") as calls, os.fdopen(fd_out, "wb") as answers:
        first = _read_frame(calls)
        if first is None:
            return
        sys.path[:] = pickle.loads(first)
        while (payload := _read_frame(calls)) is not None:
            _write_frame(answers, _outcome(payload))


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
