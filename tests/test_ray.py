"""``--ray`` / ``merge(executor="ray")`` on a real local Ray cluster (2 CPUs), and ``iter_merged`` in a Ray actor.

One cluster for the module. Workers import this checkout (PYTHONPATH) and ``ray_faults`` (the
kill used to test retries).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import streammerge  # noqa: E402
from streammerge import finalize, testing  # noqa: E402
from streammerge.errors import OutputError  # noqa: E402
from streammerge.integrations.ray import check_visible  # noqa: E402

REPO = Path(streammerge.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray with 2 CPUs; yields the arm file of ``ray_faults``."""
    arm = tmp_path_factory.mktemp("ray") / "kill-armed"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "STREAMMERGE_TEST_KILL_ARM": str(arm)}
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "ray_faults.install"})
    yield arm
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayin")
    base = testing.make_checkpoint(root / "base", layers=3, hidden=64, intermediate=128, vocab=256, shards=4)
    adapter = testing.make_adapter(root / "adapter", base, targets=testing.LLAMA_LINEAR, r=8)
    ref = Path(streammerge.merge(base, adapter, root / "ref", device="cpu").out)
    return base, adapter, ref


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_ray_merge_is_byte_identical(cluster, inputs, tmp_path):
    base, adapter, ref = inputs
    seen = []
    report = streammerge.merge(base, adapter, tmp_path / "out", device="cpu", executor="ray", parts=3, workers=1,
                               max_memory=64 << 20, on_progress=seen.append)
    assert _files(tmp_path / "out") == _files(ref)
    assert report.shards == 4  # the progress of every task reached the caller, each tensor byte once
    assert sum(seen) == streammerge.plan_merge(base, adapter).total_bytes == report.bytes_written


def test_a_task_whose_worker_is_killed_mid_shard_is_retried(cluster, inputs, tmp_path):
    base, adapter, ref = inputs
    cluster.touch()
    try:
        streammerge.merge(base, adapter, tmp_path / "out", device="cpu", executor="ray", parts=2, workers=1,
                          max_memory=64 << 20)
    finally:
        cluster.unlink()
    assert Path(f"{cluster}.fired").exists()  # a worker really died in the middle of a shard
    os.unlink(f"{cluster}.fired")
    assert _files(tmp_path / "out") == _files(ref)  # the retried part resumed; no temporary left


def test_cli_ray_auto_joins_the_running_cluster(cluster, inputs, tmp_path):
    base, adapter, ref = inputs
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--device",
            "cpu", "--workers", "1", "--max-memory", "64MiB", "--ray", "auto", "--parts", "2", "-q"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "streammerge", *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert _files(tmp_path / "out") == _files(ref)
    assert not finalize.record_paths(tmp_path / "out")


def test_a_worker_that_cannot_see_the_paths_says_so(cluster, tmp_path):
    missing = tmp_path / "not-mounted" / "base"
    with pytest.raises(OutputError) as e:
        ray.get(ray.remote(check_visible).remote({"base": str(missing), "adapters": []}, str(tmp_path)))
    assert str(e.value).endswith(
        f"cannot see {missing}: `ray` needs the base, the adapters and `out` on storage every node mounts at the "
        "same path"
    )


class Engine:
    """Stands for a rollout engine of verl/OpenRLHF, which live in Ray actors."""

    def __init__(self) -> None:
        self.weights: dict = {}

    def update_weights(self, base: str, adapter: str, part: str) -> list[str]:
        received = []
        for name, tensor in streammerge.iter_merged(base, adapter, device="cpu", workers=1, part=part):
            self.weights[name] = tensor  # a real engine would copy into its parameter here
            received.append(name)
        return received

    def state(self) -> dict:
        return self.weights


def test_iter_merged_inside_a_ray_actor_part_by_part(cluster, inputs):
    base, adapter, ref = inputs
    engine = ray.remote(num_cpus=1)(Engine).remote()
    plan = streammerge.plan_merge(base, adapter)
    for i, shards in enumerate(streammerge.parts.assign(plan, 3)):
        got = ray.get(engine.update_weights.remote(str(base), str(adapter), f"{i}/3"))
        assert got == [t.name for s in shards for t in s.tasks]
    weights = ray.get(engine.state.remote())
    want = testing.load_dir(ref)
    assert weights.keys() == want.keys() and not testing.changed(want, weights)
    ray.kill(engine)
