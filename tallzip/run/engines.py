"""Run independent jobs on this machine's threads or on a Ray cluster, and hand back their results in order.

A job is a picklable function with its arguments ("code chunk k of tensor X": it opens its inputs through
tallzip.formats.sources, reads its own byte ranges, computes and returns bytes plus metadata). The driver
iterates `engine.map(jobs)` and gets each job's result in submission order, so it can write an archive
front to back while later jobs still run. What is in flight (submitted, not yet handed back) is bounded by
a count and by the jobs' declared sizes, which is what keeps a pack under its memory budget.

The window itself is chunks.ordered_window, the one that ordered_map runs too. No scheduling is done here:
LocalEngine hands jobs to a thread pool (the coders release the GIL), RayEngine to Ray tasks; Ray places them,
and retries a task whose worker process dies (max_retries), not we.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from tallzip.errors import MissingExtraError, TallzipError
from tallzip.formats.errors import one_line
from tallzip.run.chunks import ordered_window
from tallzip.run.threads import available_cpus

RAY_EXTRA_HINT = "pip install 'tallzip[ray]'"
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Job:
    """fn(*args, **kwargs), run somewhere. fn must be importable (a module-level function) to run on Ray;
    nbytes is what the job holds until its result is consumed (inputs read plus result), for the budget."""
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    label: str = ""
    nbytes: int = 0


def run_job(fn, *args, **kwargs):
    """The body every engine runs: kept trivial so that a job behaves the same wherever it runs."""
    return fn(*args, **kwargs)


class Engine:
    """Common part: the ordered window of jobs in flight. Subclasses say how to submit, await and cancel."""

    name = ""
    workers = 1

    def map(self, jobs: Iterable[Job], *, progress: Callable[[str, int, int | None], None] | None = None,
            label: str = "jobs", max_in_flight: int | None = None,
            max_bytes_in_flight: int | None = None) -> Iterator[Any]:
        """The results of `jobs`, in their order. At most max_in_flight jobs (default twice the workers) and
        max_bytes_in_flight of their nbytes are submitted and not yet handed back; a job larger than the byte
        budget still runs, alone. progress(label, done, total) follows each result (total None for a
        generator). A job's exception is raised here, at its place in the order, and the rest is cancelled."""
        self._start()
        max_jobs = max(1, max_in_flight if max_in_flight is not None else 2 * self.workers)
        total = len(jobs) if hasattr(jobs, "__len__") else None
        return self._ordered(iter(jobs), max_jobs, max_bytes_in_flight, progress, label, total)

    def _ordered(self, jobs, max_jobs, max_bytes, progress, label, total):
        window = ordered_window(jobs, submit=self._submit, result=self._result, cancel=self._cancel,
                                cost=lambda job: job.nbytes, budget=max_bytes, max_ahead=max_jobs)
        with contextlib.closing(window):  # stopping early cancels the jobs in flight
            for done, result in enumerate(window, 1):
                if progress:
                    progress(label, done, total)
                yield result

    def share(self, obj):
        """A handle to `obj` for jobs to take as a top-level argument, sent to the workers once (Ray's
        object store) instead of with every job; here, obj itself."""
        return obj

    def _start(self):
        pass

    def _submit(self, job: Job):
        raise NotImplementedError

    def _result(self, handle, job: Job):
        raise NotImplementedError

    def _cancel(self, handle):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalEngine(Engine):
    """Jobs on a pool of threads in this process (workers default: the CPUs this process may use)."""

    name = "local"

    def __init__(self, workers: int | None = None):
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise TallzipError(f"workers must be a positive whole number, not {workers!r}")
        self.workers = workers or available_cpus()
        self._pool = None

    def _start(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tallzip-job")

    def _submit(self, job):
        return self._pool.submit(run_job, job.fn, *job.args, **job.kwargs)

    def _result(self, future, job):
        return future.result()

    def _cancel(self, future):
        future.cancel()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingExtraError(f"--engine ray needs Ray: {RAY_EXTRA_HINT}") from None
    return ray


class RayEngine(Engine):
    """Jobs as Ray tasks. address None starts a private local cluster of num_cpus CPUs (stopped by close());
    "auto" joins the cluster started on this node with `ray start`; "ray://HOST:PORT" goes through Ray Client.
    When Ray is already initialised in this process, that connection is used and left open.
    max_retries: how often Ray reruns a task whose worker died (job exceptions are not retried: they would
    fail again). cpus_per_job: the CPUs Ray reserves for each task. runtime_env goes to ray.init, e.g. to
    ship tallzip to a cluster that lacks it."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, *, cpus_per_job: float = 1,
                 max_retries: int = 3, runtime_env: dict | None = None):
        self._ray = _import_ray()
        if address is not None and num_cpus is not None:
            raise TallzipError("num_cpus sizes a local Ray cluster; a cluster given by address has its own CPUs")
        if num_cpus is not None and (not isinstance(num_cpus, int) or num_cpus < 1):
            raise TallzipError(f"num_cpus must be a positive whole number, not {num_cpus!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise TallzipError(f"max_retries must be a whole number >= 0, not {max_retries!r}")
        self.address, self.num_cpus, self.cpus_per_job = address, num_cpus, cpus_per_job
        self.max_retries, self.runtime_env = max_retries, runtime_env
        self._started_ray = False
        self._task = None
        self._workers = None

    @property
    def workers(self) -> int:
        """Jobs the cluster runs at once (its CPUs over cpus_per_job); asking connects to the cluster."""
        self._start()
        return self._workers

    def _start(self):
        if self._task is not None:
            return
        ray = self._ray
        if not ray.is_initialized():
            options = {"runtime_env": self.runtime_env} if self.runtime_env else {}
            if self.address is None:
                # a private cluster for this run: no dashboard, and no usage report sent out unless asked for
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                options.update(num_cpus=self.num_cpus, include_dashboard=False)
            try:
                ray.init(address=self.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise TallzipError(f"ray: cannot start or reach the cluster at {self.address or 'a new local cluster'}"
                                   f" ({one_line(exc)})") from None
            self._started_ray = True
        cpus = ray.cluster_resources().get("CPU", 1)
        self._workers = max(1, int(cpus // self.cpus_per_job))
        self._task = ray.remote(run_job)
        self._task_options = dict(max_retries=self.max_retries, retry_exceptions=False, num_cpus=self.cpus_per_job)

    def share(self, obj):
        self._start()
        return self._ray.put(obj)

    def _submit(self, job):
        options = dict(self._task_options, name=job.label) if job.label else self._task_options
        return self._task.options(**options).remote(job.fn, *job.args, **job.kwargs)

    def _result(self, ref, job):
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, Exception):  # the job's own error, raised as if it had run here
                raise cause from None
            raise TallzipError(f"job {job.label or job.fn.__name__}: {one_line(exc)}") from None
        except ray.exceptions.RayError as exc:  # a worker or node lost more often than max_retries, OOM...
            raise TallzipError(f"ray: job {job.label or job.fn.__name__} failed after {self.max_retries} "
                               f"retries ({one_line(exc)})") from None

    def _cancel(self, ref):
        try:
            self._ray.cancel(ref)
        except Exception:  # already finished or already gone: nothing to cancel
            pass

    def close(self):
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False
        self._task = None


def make_engine(name: str = "local", *, workers: int | None = None, address: str | None = None) -> Engine:
    """The engine a command asked for: "local" with `workers` threads, or "ray" (workers = local cluster CPUs)."""
    if name == "local":
        if address is not None:
            raise TallzipError("--address applies to --engine ray only")
        return LocalEngine(workers)
    if name == "ray":
        return RayEngine(address=address, num_cpus=workers)
    raise TallzipError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")
