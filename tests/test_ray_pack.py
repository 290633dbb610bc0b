"""pack on Ray (issue 14): the chunk jobs run as Ray tasks that read their own byte ranges, and the archive is
byte-identical to the local pack of the same inputs and options, on a ViT-shaped family (tallzip/demo.py) and
an LLM-shaped sharded one (benchmarks/fixtures/families.py, a tiny preset); a worker killed mid-job is retried and the
archive is still identical; a job that keeps failing leaves nothing at the target.

One local Ray cluster for the module (2 CPUs, no dashboard), stopped at the end. Its node address is
127.0.0.1, so its processes talk over loopback; checked with psutil: Ray's gRPC servers still listen on the
wildcard address (and its runtime-env agent on the host's address), which _node_ip_address does not change."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import tallzip
from tallzip.demo import make_family
from tallzip.run.engines import Job, RayEngine
from tallzip.errors import TallzipError
from tallzip.options import RunOptions, StoreOptions

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY_LLM = dict(vocab=96, hidden=32, layers=2, mlp=48, heads=4, kv_heads=2, attention=True, tie=False)
OPTIONS = dict(chunk_elements=1024, memory="64M", mtv_dtype="bfloat16")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray not installed (pip install 'tallzip[ray]')")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's job wrappers, for the workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def vit_family(tmp_path_factory):
    base, tasks = make_family(tmp_path_factory.mktemp("vit"), n_tasks=4, width=32, layers=1, frozen_width=16)
    return base, tasks


@pytest.fixture(scope="module")
def llm_family(tmp_path_factory):
    from benchmarks.fixtures import generate
    out = tmp_path_factory.mktemp("llm") / "family"
    generate(out, TINY_LLM, n_tasks=3, dtype="bf16", threads=1, shard_bytes=16 << 10, log=lambda *a, **k: None)
    return out / "base", out / "tasks"


def _local_and_ray(family, tmp_path, **options):
    base, tasks = family
    local, ray_out = tmp_path / "local.tallz", tmp_path / "ray.tallz"
    tallzip.pack(tasks, base, local, device="cpu", **OPTIONS, **options)
    seen = []
    tallzip.pack(tasks, base, ray_out, engine="ray", **OPTIONS, **options,
                 progress=lambda label, done, total: seen.append((label, done, total)))
    return local.read_bytes(), ray_out.read_bytes(), seen


@pytest.mark.parametrize("merge", ["sum", "ties"])
def test_ray_archive_is_byte_identical_vit(ray_cluster, vit_family, tmp_path, merge):
    local, remote, seen = _local_and_ray(vit_family, tmp_path, merge=merge)
    assert local == remote
    packing = [s for s in seen if s[0] == "packing"]
    total = packing[-1][2]
    assert total > 10 and [d for _, d, _ in packing] == list(range(1, total + 1))  # progress over the whole job
    with tallzip.open(tmp_path / "ray.tallz") as arc:  # and it is an archive that reads back
        assert len(arc.tasks) == 4


def test_ray_archive_is_byte_identical_llm_sharded(ray_cluster, llm_family, tmp_path):
    local, remote, _ = _local_and_ray(llm_family, tmp_path, codecs={"mask": "bits-lvl"})
    assert local == remote


def die_once(marker: str, fn, *args, **kwargs):
    """Kill this worker process the first time (no exception: the process is gone, as in an OOM kill)."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)
    return fn(*args, **kwargs)


def always_die(fn, *args, **kwargs):
    os._exit(1)


class KillingEngine(RayEngine):
    """Ray, with job number `victim` wrapped to kill its worker (once, or every time)."""

    def __init__(self, victim: int, marker: str | None, **options):
        super().__init__(**options)
        self.victim, self.marker, self.submitted = victim, marker, 0

    def _submit(self, job):
        if self.submitted == self.victim:
            if self.marker:
                job = Job(die_once, (self.marker, job.fn, *job.args), job.kwargs, job.label, job.nbytes)
            else:
                job = Job(always_die, (job.fn, *job.args), job.kwargs, job.label, job.nbytes)
        self.submitted += 1
        return super()._submit(job)


def test_a_killed_worker_is_retried_and_the_archive_is_identical(ray_cluster, vit_family, tmp_path):
    base, tasks = vit_family
    local, out = tmp_path / "local.tallz", tmp_path / "ray.tallz"
    marker = tmp_path / "killed-once"
    tallzip.pack(tasks, base, local, device="cpu", **OPTIONS)
    tallzip.pack(tasks, base, out, engine=KillingEngine(3, str(marker), max_retries=2), **OPTIONS)
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker died, not this process
    assert out.read_bytes() == local.read_bytes()


def test_a_job_that_keeps_failing_leaves_nothing_at_the_target(ray_cluster, vit_family, tmp_path):
    base, tasks = vit_family
    out = tmp_path / "out" / "ray.tallz"
    out.parent.mkdir()
    with pytest.raises(TallzipError, match="failed after 1 retries"):
        tallzip.pack(tasks, base, out, engine=KillingEngine(2, None, max_retries=1), **OPTIONS)
    assert list(out.parent.iterdir()) == []  # no archive, no temporary left behind


def test_ray_refuses_a_gpu_device(vit_family, tmp_path):
    base, tasks = vit_family
    with pytest.raises(TallzipError, match="use --device cpu"):
        tallzip.pack(tasks, base, tmp_path / "x.tallz", run=RunOptions(engine="ray", device="cuda"))
    assert not (tmp_path / "x.tallz").exists()


def test_ray_refuses_torch_pickles_and_address_needs_ray(tmp_path):
    base, tasks = make_family(tmp_path / "pt", n_tasks=2, fmt="pt", width=16, layers=1, frozen_width=8)
    with pytest.raises(TallzipError, match="torch pickle"):
        tallzip.pack(tasks, base, tmp_path / "x.tallz", store=StoreOptions(chunk_elements=1024), run=RunOptions(engine="ray"))
    assert not (tmp_path / "x.tallz").exists()
    from click.testing import CliRunner
    from tallzip.cli.main import cli
    result = CliRunner().invoke(cli, ["pack", str(tasks), "--base", str(base), "-o", str(tmp_path / "y.tallz"),
                                      "--address", "auto"])
    assert result.exit_code != 0 and "--address applies to --engine ray only" in result.output
    assert not (tmp_path / "y.tallz").exists()
