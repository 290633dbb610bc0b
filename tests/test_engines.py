"""tallzip/engines.py: ordered results, the in-flight bounds, errors, and (marker `ray`) the same results from
Ray tasks on a private 2-CPU loopback cluster, also when a worker process dies mid-job.

The reference for every result is a plain loop over the generated array: numpy slices, zstd and blake3
called directly, with neither the engines nor the sources in between."""
from __future__ import annotations

import os
import re
import sys
import threading
import time

import blake3
import numpy as np
import pytest
import zstandard

from benchmarks.speed import engines as bench
from tallzip.errors import MissingExtraError
from tallzip.run.engines import Job, LocalEngine, RayEngine, make_engine
from tallzip.errors import TallzipError
from tallzip.formats.errors import FormatError

CHUNKS, ELEMENTS = 10, 20_000  # 40 kB chunks: the test is about order and plumbing, not speed


@pytest.fixture(scope="module")
def chunk_file(tmp_path_factory):
    """A generated bf16 file, its chunk jobs, and what each job must return, computed without the engines."""
    path = bench.write_bf16_file(tmp_path_factory.mktemp("engines") / "w.bf16", CHUNKS, ELEMENTS, seed=3)
    array = np.concatenate([bench.bf16_chunk(3, k, ELEMENTS) for k in range(CHUNKS)])
    assert path.read_bytes() == array.tobytes()
    expected = []
    for k in range(CHUNKS):
        raw = array[k * ELEMENTS:(k + 1) * ELEMENTS].tobytes()
        expected.append((blake3.blake3(raw).hexdigest(), zstandard.ZstdCompressor(level=3).compress(raw)))
    jobs = bench.chunk_jobs(str(path), CHUNKS, ELEMENTS * 2)
    return path, jobs, expected


def without_timing(results):
    return [(digest, frame) for digest, frame, _seconds in results]


def sleep_then_return(value, seconds):
    time.sleep(seconds)
    return value


def fail_on(value, bad):
    if value == bad:
        raise FormatError(f"chunk {value}: checksum mismatch")
    return value


def test_local_engine_matches_the_plain_loop(chunk_file):
    _, jobs, expected = chunk_file
    with LocalEngine(2) as engine:
        assert without_timing(engine.map(jobs)) == expected
        assert without_timing(engine.map(iter(jobs))) == expected  # a generator of jobs too


def test_results_come_in_submission_order_even_when_later_jobs_finish_first():
    jobs = [Job(sleep_then_return, (k, 0.02 * (5 - k))) for k in range(6)]
    with LocalEngine(3) as engine:
        assert list(engine.map(jobs, max_in_flight=6)) == list(range(6))


def counting_submits(engine):
    """Wrap the engine's submit so the test sees, at each result, how many jobs were submitted."""
    submitted = []
    real = engine._submit

    def submit(job):
        submitted.append(job)
        return real(job)

    engine._submit = submit
    return submitted


def test_jobs_in_flight_stay_under_the_count():
    jobs = [Job(sleep_then_return, (k, 0.005)) for k in range(12)]
    with LocalEngine(4) as engine:
        submitted = counting_submits(engine)
        outstanding = [len(submitted) - k for k, _ in enumerate(engine.map(jobs, max_in_flight=3))]
    assert max(outstanding) == 3 and len(submitted) == 12


def test_jobs_in_flight_stay_under_the_byte_budget_and_a_big_job_runs_alone():
    sizes = [40, 40, 40, 500, 40, 40]
    jobs = [Job(sleep_then_return, (k, 0.005), nbytes=n) for k, n in enumerate(sizes)]
    with LocalEngine(4) as engine:
        submitted = counting_submits(engine)
        held = []
        for k, _ in enumerate(engine.map(jobs, max_bytes_in_flight=100)):
            held.append(sum(sizes[k:len(submitted)]))  # the jobs handed out and not yet returned, this one included
    assert held == [80, 80, 40, 500, 80, 40]


def test_a_failing_job_raises_in_its_place_and_the_rest_is_not_run():
    ran = []

    def record(value):
        ran.append(value)
        return fail_on(value, 2)

    jobs = [Job(record, (k,)) for k in range(8)]
    got = []
    with LocalEngine(1) as engine:
        with pytest.raises(FormatError, match="chunk 2: checksum mismatch"):
            for value in engine.map(jobs, max_in_flight=1):
                got.append(value)
    assert got == [0, 1] and ran == [0, 1, 2]


def test_progress_counts_every_result():
    calls = []
    jobs = [Job(sleep_then_return, (k, 0)) for k in range(4)]
    with LocalEngine(2) as engine:
        list(engine.map(jobs, progress=lambda *a: calls.append(a), label="coding"))
        list(engine.map(iter(jobs[:2]), progress=lambda *a: calls.append(a)))
    assert calls == [("coding", 1, 4), ("coding", 2, 4), ("coding", 3, 4), ("coding", 4, 4),
                     ("jobs", 1, None), ("jobs", 2, None)]


def test_local_threads_run_at_once():
    barrier = threading.Barrier(2, timeout=5)  # both jobs must be running together to pass it
    jobs = [Job(barrier.wait) for _ in range(2)]
    with LocalEngine(2) as engine:
        assert sorted(engine.map(jobs)) == [0, 1]


def test_engine_choice_errors():
    with pytest.raises(TallzipError, match="unknown engine 'dask'"):
        make_engine("dask")
    with pytest.raises(TallzipError, match="--address applies to --engine ray only"):
        make_engine("local", address="auto")
    with pytest.raises(TallzipError, match="positive whole number"):
        LocalEngine(0)
    assert make_engine("local", workers=3).workers == 3


def test_ray_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if not installed
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'tallzip[ray]'")):
        RayEngine()
    with pytest.raises(MissingExtraError, match=re.escape("tallzip[ray]")):
        make_engine("ray")


# --- Ray: one private cluster for the module, on this machine only ---------------------------------

def code_chunk_dying_once(attempts_file, *args):
    """code_chunk, but the worker process dies the first time (no exception: the process is gone)."""
    with open(attempts_file, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    with open(attempts_file) as fh:
        if len(fh.readlines()) == 1:
            os._exit(1)
    return bench.code_chunk(*args)


def always_dying(attempts_file):
    with open(attempts_file, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    os._exit(1)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray not installed (pip install 'tallzip[ray]')")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    # The workers import this module and benchmarks.speed.engines by value: neither is installed for them.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(bench)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.unregister_pickle_by_value(bench)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_matches_local_and_the_plain_loop(ray_cluster, chunk_file):
    _, jobs, expected = chunk_file
    with LocalEngine(2) as local, RayEngine() as remote:
        assert remote.workers == 2
        assert without_timing(remote.map(jobs, max_in_flight=3)) == without_timing(local.map(jobs)) == expected
    assert ray_cluster.is_initialized()  # a cluster the engine did not start is left running


@pytest.mark.ray
@pytest.mark.slow
def test_ray_retries_a_job_whose_worker_died(ray_cluster, chunk_file, tmp_path):
    _, jobs, expected = chunk_file
    attempts = tmp_path / "attempts"
    jobs = list(jobs)
    jobs[3] = Job(code_chunk_dying_once, (str(attempts),) + jobs[3].args, label="chunk 3 (dies once)")
    with RayEngine(max_retries=2) as engine:
        assert without_timing(engine.map(jobs)) == expected
    pids = attempts.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # ran twice, in two processes: the first one died


@pytest.mark.ray
@pytest.mark.slow
def test_ray_gives_up_after_max_retries_and_job_errors_keep_their_type(ray_cluster, tmp_path):
    attempts = tmp_path / "attempts"
    with RayEngine(max_retries=0) as engine:
        with pytest.raises(FormatError, match=r"^chunk 1: checksum mismatch$"):
            list(engine.map([Job(fail_on, (k, 1)) for k in range(3)]))
        # last: the dead worker's replacement takes seconds to start on a busy machine, and nothing waits for it
        with pytest.raises(TallzipError, match="job doomed failed after 0 retries"):
            list(engine.map([Job(always_dying, (str(attempts),), label="doomed")]))
        assert len(attempts.read_text().split()) == 1
