"""Where a study's tasks run: in this process, in a local process pool, or on a Ray cluster.

Every executor runs the same function, :func:`modlens.study.tasks.execute`, on the same
arguments; tasks run single-threaded and draw their seeds from their keys, so the tables do not
depend on the executor or on the number of workers. An executor has a ``capacity`` (tasks it
runs at once), ``submit(task_id, args) -> handle``, ``wait(handles, timeout)`` returning the
finished ``[(handle, result, error)]``, ``poll_progress()`` returning ``[(task_id, what, n)]``
messages from running tasks, and ``close()``.

``"auto"`` (the default of ``modlens study run`` and :func:`~modlens.study.runner.run_study`) is a
process pool with one worker per CPU core available to this process (one per GPU when there are
several and the tasks run on GPUs), or the inline executor where there is one core.
"""

from __future__ import annotations

import os
import queue as _queue
import sys
from typing import Callable

from modlens.study.tasks import execute

EXECUTORS = ("auto", "inline", "processes", "ray")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_workers(device: str = "cpu") -> int:
    """Workers of the default executor: every GPU when tasks run on GPUs and there are several,
    else every core."""
    gpus = _gpu_count() if device != "cpu" else 0
    return gpus if gpus > 1 else available_cores()


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - a broken CUDA setup counts as none
        return 0


class InlineExecutor:
    """Runs each task in this process when it is submitted (one at a time)."""

    name = "inline"
    capacity = 1

    def __init__(self, progress: Callable[[str, str, int], None] | None = None):
        self._progress = progress
        self._done: dict[int, tuple] = {}
        self._next = 0

    def submit(self, task_id: str, args: tuple) -> int:
        handle = self._next
        self._next += 1
        say = (lambda what, n: self._progress(task_id, what, n)) if self._progress else None
        try:
            self._done[handle] = (execute(*args, progress=say), None)
        except Exception as exc:  # reported by wait, like the other executors
            self._done[handle] = (None, exc)
        return handle

    def wait(self, handles, timeout: float | None = None):
        out = [(h, *self._done.pop(h)) for h in list(handles) if h in self._done]
        return out

    def poll_progress(self):
        return []

    def close(self) -> None:
        pass


_WORKER_QUEUE = None


def _die_with_parent() -> None:
    """Linux: have the kernel stop this worker when the study run that started it dies (SIGKILL
    included), so a killed run leaves no worker computing behind it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        return
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


def _init_worker(progress_queue, gpu_queue) -> None:
    global _WORKER_QUEUE
    _die_with_parent()
    _WORKER_QUEUE = progress_queue
    if gpu_queue is not None:
        try:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get_nowait())
        except _queue.Empty:  # pragma: no cover - more workers than GPUs
            pass


def _worker_execute(task_id: str, args: tuple) -> dict:
    q = _WORKER_QUEUE
    say = (lambda what, n: q.put((task_id, what, n))) if q is not None else None
    return execute(*args, progress=say)


class ProcessExecutor:
    """A local pool of worker processes (spawned, not forked: torch's thread pools do not survive a
    fork). With several GPUs the default is one worker per GPU, each seeing only its own."""

    name = "processes"

    def __init__(self, workers: int | None = None):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        gpus = _gpu_count()
        if workers is None:
            workers = gpus if gpus > 1 else available_cores()
        self.capacity = int(workers)
        ctx = mp.get_context("spawn")
        self._queue = ctx.Queue()
        gpu_queue = None
        if gpus > 1:
            gpu_queue = ctx.Queue()
            for i in range(self.capacity):
                gpu_queue.put(i % gpus)
        self._pool = ProcessPoolExecutor(max_workers=self.capacity, mp_context=ctx, initializer=_init_worker,
                                         initargs=(self._queue, gpu_queue))

    def submit(self, task_id: str, args: tuple):
        return self._pool.submit(_worker_execute, task_id, args)

    def wait(self, handles, timeout: float | None = None):
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as fwait

        done, _ = fwait(list(handles), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            exc = f.exception()
            out.append((f, None if exc else f.result(), exc))
        return out

    def poll_progress(self):
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except (_queue.Empty, OSError, ValueError):
                return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _ProgressSink:
    """A Ray actor that collects the progress messages of running tasks until the driver drains them."""

    def __init__(self):
        self._items: list = []

    def put(self, items: list) -> None:
        self._items.extend(items)

    def drain(self) -> list:
        items, self._items = self._items, []
        return items


def _ray_execute(args: tuple, task_id: str, sink) -> dict:
    """A task on a Ray worker; its progress goes to ``sink`` at most four times a second."""
    import time

    pending, last = [], [time.monotonic()]

    def flush():
        if pending:
            sink.put.remote(list(pending))
            pending.clear()
        last[0] = time.monotonic()

    def say(what, n):
        pending.append((task_id, what, n))
        if what == "total" or time.monotonic() - last[0] > 0.25:
            flush()

    try:
        return execute(*args, progress=say)
    finally:
        flush()


class RayExecutor:
    """Tasks as Ray remote functions (``pip install modlens[ray]``). Connects to ``address`` (or
    ``$RAY_ADDRESS``) when given, else starts a local Ray instance with ``workers`` CPUs whose
    servers (GCS, raylet, workers) listen on the loopback interface only. The study folder must be
    on a file system that every Ray node sees. Running tasks report their progress through a
    small actor, as the process pool's workers do through a queue."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None):
        address = address or os.environ.get("RAY_ADDRESS")
        if not address and "ray" not in sys.modules:
            # Ray binds its servers to the node's address; a local instance's is the loopback one
            # only when Ray runs single-node (the switch Ray reads when it is imported)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError:
            raise ImportError("the ray executor needs Ray: pip install 'modlens[ray]'") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            else:
                self._init_local(ray, workers)
        total = int(ray.cluster_resources().get("CPU", 1))
        self.capacity = int(workers or total)
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_ray_execute)
        self._sink = ray.remote(num_cpus=0)(_ProgressSink).remote()

    def _init_local(self, ray, workers: int | None) -> None:
        import modlens

        n = int(workers or available_cores())
        # workers find this modlens even where it is not installed (a source checkout)
        src = os.path.dirname(os.path.dirname(os.path.abspath(modlens.__file__)))
        path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
        constants = ray._private.ray_constants
        cluster, constants.ENABLE_RAY_CLUSTER = constants.ENABLE_RAY_CLUSTER, False  # loopback node address
        try:
            ray.init(num_cpus=n, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                     object_store_memory=80 * 1024 * 1024, _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}})
        finally:
            constants.ENABLE_RAY_CLUSTER = cluster
        self._started = True

    def submit(self, task_id: str, args: tuple):
        return self._remote.remote(args, task_id, self._sink)

    def wait(self, handles, timeout: float | None = None):
        ready, _ = self._ray.wait(list(handles), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            try:
                out.append((ref, self._ray.get(ref), None))
            except Exception as exc:
                cause = getattr(exc, "cause", None)
                out.append((ref, None, cause if isinstance(cause, BaseException) else exc))
        return out

    def poll_progress(self):
        try:
            return self._ray.get(self._sink.drain.remote(), timeout=5)
        except Exception:  # a slow or lost actor costs the progress display only
            return []

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def make_executor(name: str, *, workers: int | None = None, progress=None, ray_address: str | None = None,
                  device: str = "cpu"):
    """The executor called ``name`` (:data:`EXECUTORS`); ``"auto"`` is ``"processes"`` with
    :func:`default_workers` (or ``workers``) workers, or ``"inline"`` when that is one."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers must be a positive integer, got {workers!r}")
    if name == "auto":
        name = "processes" if (workers or default_workers(device)) > 1 else "inline"
        workers = workers or (default_workers(device) if name == "processes" else None)
    if name == "inline":
        if workers not in (None, 1):
            raise ValueError(f"the inline executor runs one task at a time; drop --workers {workers} or use --executor processes")
        return InlineExecutor(progress)
    if name == "processes":
        return ProcessExecutor(workers)
    if name == "ray":
        return RayExecutor(workers, ray_address)
    raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


__all__ = ["EXECUTORS", "InlineExecutor", "ProcessExecutor", "RayExecutor", "make_executor", "available_cores",
           "default_workers"]
