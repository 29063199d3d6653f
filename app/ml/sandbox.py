"""Running untrusted work (a user's graph) in a separate process under time and memory limits.

``run_isolated`` runs a picklable top-level function in a fresh ``spawn`` process (never a fork of
a process that holds threads or CUDA). The child caps its own address space (``RLIMIT_AS``, soft
and hard) before it unpickles anything, asks the kernel to kill it if its parent dies, and leads
its own process group; the parent kills that group with SIGKILL on timeout, and always reaps the
child before returning, so no zombie or orphan is left in any case.

Each way of failing becomes a ``TrialError`` whose text is Distill's own: the child's exception
text (which may carry runtime internals or server paths) never crosses back, only its type's name.

This module imports only the standard library at the top, so a child that runs one of its
functions never loads torch (whose import alone maps gigabytes of address space with CUDA).
"""

import contextlib
import ctypes
import io
import os
import pickle
import re
import resource
import signal
import time
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

T = TypeVar("T")

# How long a child whose result pipe closed without a result gets to finish dying on its own
# (so that its exit status is its own, not our SIGKILL's).
EXIT_GRACE_S = 1.0
# The most an isolated function's pickled result may weigh.
MAX_RESULT_BYTES = 64 << 20
# Text of the allocation failures C++ runtimes raise as ordinary exceptions (onnxruntime turns a
# std::bad_alloc into a RuntimeException); it is only matched, never passed on.
OUT_OF_MEMORY_MARKERS = ("bad_alloc", "Failed to allocate memory", "Cannot allocate memory")
_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_PR_SET_PDEATHSIG = 1


class TrialError(Exception):
    """The isolated function did not return a result."""


class TrialTimeout(TrialError):
    """It was still running after ``timeout_s`` seconds, and was killed."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"killed after {timeout_s:g} s")
        self.timeout_s = timeout_s


class TrialOutOfMemory(TrialError):
    """It ran out of its ``memory_bytes`` of address space: a ``MemoryError``, a runtime's
    allocation failure, or a death by signal (``signal`` then says which; native code that fails
    to allocate often dies by SIGSEGV or SIGABRT rather than raising)."""

    def __init__(self, memory_bytes: int, signal_number: int | None = None) -> None:
        how = f" (killed by signal {signal_number})" if signal_number is not None else ""
        super().__init__(f"out of its {memory_bytes} bytes of memory{how}")
        self.memory_bytes = memory_bytes
        self.signal = signal_number


class TrialFailed(TrialError):
    """It raised another exception (only the type's name is known: ``error_type``), exited
    without a result, or its result could not be sent back."""

    def __init__(self, error_type: str) -> None:
        super().__init__(f"failed: {error_type}")
        self.error_type = error_type


def _type_name(error: BaseException) -> str:
    name = type(error).__name__
    return name if _TYPE_NAME.fullmatch(name) else "Exception"


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    try:
        text = str(error)
    except Exception:  # str() of a broken exception under memory pressure
        return False
    return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), and exit now if it already has.

    The kernel sends it when the parent's *thread* that started this process ends; that thread
    waits in ``run_isolated`` until this process is reaped, so it ends first only with the
    parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the timeout in the parent still applies
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


class ResultTooLarge(Exception):
    """The isolated function's result weighs more than ``MAX_RESULT_BYTES`` pickled."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only (None, bools, numbers, strings, bytes, and lists, tuples, sets
    and dicts of them): pickle names no class or function for those, and any it names is refused,
    so a child that misbehaves cannot make its parent run code by what it sends back."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError("only plain data comes back from an isolated run")


def _plain(data: bytes) -> Any:
    return _PlainUnpickler(io.BytesIO(data)).load()


def _message(kind: str, value: object) -> bytes:
    """One message from the child, checked to be plain data as its parent will read it."""
    data = pickle.dumps((kind, value), protocol=pickle.HIGHEST_PROTOCOL)
    _plain(data)
    if len(data) > MAX_RESULT_BYTES:
        raise ResultTooLarge(f"{len(data)} bytes")
    return data


def _failure(error: BaseException) -> bytes:
    if _is_out_of_memory(error):
        return _message("oom", None)
    return _message("failed", _type_name(error))


def _child(connection: Connection, payload: bytes, memory_bytes: int, parent_pid: int) -> None:
    """The child's whole life: limits first, then the function, then one message back."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    _die_with_parent(parent_pid)
    os.setpgid(0, 0)
    try:
        # The parent's own payload (a function of ours and its plain arguments, pickled by
        # run_isolated): nothing a user uploaded is ever unpickled, here or in the parent.
        fn, args = pickle.loads(payload)
        message = _message("ok", fn(*args))
    except BaseException as e:  # the function failed, or its result is not plain or too large
        message = _failure(e)
    connection.send_bytes(message)
    connection.close()


def _kill_and_reap(process: BaseProcess) -> None:
    """SIGKILL the child's process group and the child (both may be gone), then wait for it."""
    pid = process.pid
    if pid is None:  # never started
        return
    if process.exitcode is None:
        # Still unreaped, so its pid cannot name another group; there may be no group yet.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        process.kill()
    process.join()
    process.close()


def run_isolated(fn: Callable[..., T], *args: Any, timeout_s: float, memory_bytes: int) -> T:
    """``fn(*args)`` in a fresh process with at most ``memory_bytes`` of address space, killed
    after ``timeout_s`` seconds (start-up included).

    ``fn`` must be a top-level function and ``args`` picklable; the child imports ``fn``'s module
    (and the parent's ``__main__`` script, as ``spawn`` does), so a light module keeps the run fast
    and within its memory. Its result must be plain data (None, bools, numbers, strings, bytes,
    and lists, tuples, sets and dicts of them) of at most ``MAX_RESULT_BYTES`` pickled.

    Raises:
        TrialTimeout: it did not finish in time; it was killed.
        TrialOutOfMemory: it ran out of memory, or died by a signal.
        TrialFailed: it raised another exception (``error_type`` is its type's name; an
            ``UnpicklingError`` for a result that is not plain data, ``ResultTooLarge`` for one
            too big), or exited without a result.
    """
    payload = pickle.dumps((fn, args))
    context = get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_child, args=(sender, payload, memory_bytes, os.getpid()), daemon=True
    )
    deadline = time.monotonic() + timeout_s
    data: bytes | None = None
    timed_out = False
    exitcode: int | None = None
    try:
        process.start()
        sender.close()
        if receiver.poll(max(0.0, deadline - time.monotonic())):
            try:
                data = receiver.recv_bytes(MAX_RESULT_BYTES)
            except (EOFError, OSError):  # it died without a word (or sent too much)
                process.join(EXIT_GRACE_S)
                exitcode = process.exitcode
        else:
            timed_out = True
    finally:
        receiver.close()
        sender.close()
        _kill_and_reap(process)
    if timed_out:
        raise TrialTimeout(timeout_s)
    if data is None:
        if exitcode is not None and exitcode < 0:
            raise TrialOutOfMemory(memory_bytes, -exitcode)
        raise TrialFailed("exit" if exitcode is None else f"exit {exitcode}")
    try:
        kind, value = _plain(data)
    except Exception as e:
        raise TrialFailed("UnpicklingError") from e
    if kind == "ok":
        result: T = value
        return result
    if kind == "oom":
        raise TrialOutOfMemory(memory_bytes)
    raise TrialFailed(
        value if isinstance(value, str) and _TYPE_NAME.fullmatch(value) else "Exception"
    )


def onnx_output_shapes(
    path: str, input_shape: tuple[int, ...], input_dtype: str
) -> dict[str, tuple[int, ...] | None]:
    """Run the ONNX graph at ``path`` once, with onnxruntime on one CPU thread, on zeros of
    ``input_shape`` and ``input_dtype`` fed to its first input; each output's shape (None for an
    output that is not a tensor). Meant to be the ``fn`` of ``run_isolated``: a graph is user
    code as far as time and memory go."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # its warnings would go to the server's log
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.zeros(input_shape, dtype=input_dtype)}
    values = session.run(None, feed)
    return {
        o.name: tuple(int(d) for d in v.shape) if isinstance(v, np.ndarray) else None
        for o, v in zip(session.get_outputs(), values, strict=True)
    }
