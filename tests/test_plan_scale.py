"""Planning a petavoxel layer stays cheap and yields a DAG Snakemake can handle.

Only an info file is written (a virtual 100000^3 uint8 layer, chunk 64^3); the
planner never lists or touches chunks. See benchmarks/plan_scale.py for the
same layer through `snakemake -n`.
"""
from __future__ import annotations

import time

import pytest
from cloudvolume import CloudVolume

from magma import workflow

SIZE = [100000, 100000, 100000]
MAX_TOTAL_JOBS = 20000


@pytest.fixture
def petavoxel(tmp_path):
    path = f"file://{tmp_path}/image"
    info = CloudVolume.create_new_info(
        num_channels=1, layer_type="image", data_type="uint8", encoding="raw",
        resolution=[4, 4, 40], voxel_offset=[0, 0, 0], volume_size=SIZE, chunk_size=[64, 64, 64],
    )
    CloudVolume(path, info=info).commit_info()
    return path


def _check_caps(plan):
    ex = plan.config["execution"]
    total = sum(step.jobs for step in plan.steps.values())
    assert total <= MAX_TOTAL_JOBS
    for name, step in plan.steps.items():
        cap = ex["steps"].get(name, {}).get("max_jobs_per_stage", ex["max_jobs_per_stage"])
        for stage in step.stages:
            assert 1 <= stage.jobs <= cap, (name, stage.name, stage.jobs, cap)
            # every task is in exactly one job
            assert stage.job_tasks(stage.jobs - 1).stop == stage.grid.n
            assert stage.tasks_per_job * (stage.jobs - 1) < stage.grid.n
    return total


def test_petavoxel_downsample_plan(petavoxel, tmp_path):
    cfg = {
        "layers": {"image": petavoxel},
        "steps": {"pyramid": {"op": "downsample", "layer": "image", "num_mips": 10}},
        "execution": {"run_dir": str(tmp_path / "run")},
    }
    t0 = time.perf_counter()
    plan = workflow.plan(cfg)
    elapsed = time.perf_counter() - t0
    total = _check_caps(plan)

    step = plan.steps["pyramid"]
    # 3.5 GB per task builds 6 mips of 64^3 uint8 chunks (4096x4096x64); the rest is a second pass
    assert [s.name for s in step.stages] == ["mip0-6", "mip6-10"]
    assert step.stages[0].grid.shape == [4096, 4096, 64]
    assert step.stages[0].grid.n == 25 * 25 * 1563
    assert step.tasks > 900_000
    assert total == step.jobs == 1998 + 391
    assert len(step.infos["image"]["scales"]) == 11
    assert elapsed < 10, f"planning took {elapsed:.1f} s"  # ~20-50 ms in practice


def test_petavoxel_several_steps_respect_caps(petavoxel, tmp_path):
    cfg = {
        "layers": {"image": petavoxel, "copy": f"file://{tmp_path}/copy"},
        "steps": {
            "pyramid": {"op": "downsample", "layer": "image", "num_mips": 10},
            "rechunk": {"op": "transfer", "src": "image", "dest": "copy", "chunk_size": [128, 128, 64]},
            "cleanup": {"op": "delete", "layer": "copy", "after": ["rechunk"]},
        },
        "execution": {"run_dir": str(tmp_path / "run"), "max_jobs_per_stage": 500,
                      "steps": {"rechunk": {"max_jobs_per_stage": 100}}},
    }
    plan = workflow.plan(cfg)
    total = _check_caps(plan)
    assert total <= 3 * 2 * 500
    assert max(s.jobs for s in plan.steps["rechunk"].stages) == 100
    assert sum(s.tasks for s in plan.steps.values()) > 2_000_000
