"""The planner: the one place that turns a config into task grids and batch jobs.

A step is a list of stages run in order; a stage is a grid of tasks; tasks are
batched into Snakemake jobs. Nothing here enumerates tasks: a grid is bounds +
shape, a job is a contiguous range of task indices (x fastest, like Igneous),
so planning a petavoxel layer costs the same as planning a small one.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from cloudvolume import Bbox, Vec

from .errors import MagmaError


@dataclass
class Grid:
    """Tasks of `shape` covering `bounds`, walking x fastest; edge tasks are clipped.

    `overlap` extends each task on the high side (mesh/skeleton/CCL use 1 voxel).
    """

    minpt: list
    maxpt: list
    shape: list
    overlap: int = 0

    @property
    def bounds(self) -> Bbox:
        return Bbox(self.minpt, self.maxpt, dtype=int)

    @property
    def counts(self) -> np.ndarray:
        size = np.asarray(self.maxpt) - np.asarray(self.minpt)
        return np.maximum(0, -(-size // np.asarray(self.shape))).astype(np.int64)

    @property
    def n(self) -> int:
        return int(np.prod(self.counts))

    def task(self, index: int) -> Bbox:
        cx, cy, _ = (int(c) for c in self.counts)
        z, rem = divmod(index, cx * cy)
        y, x = divmod(rem, cx)
        lo = Vec(*self.minpt) + Vec(x, y, z) * Vec(*self.shape)
        hi = lo + Vec(*self.shape) + self.overlap
        return Bbox.clamp(Bbox(lo, hi), self.bounds)

    def to_dict(self) -> dict:
        return {"minpt": [int(v) for v in self.minpt], "maxpt": [int(v) for v in self.maxpt],
                "shape": [int(v) for v in self.shape], "overlap": int(self.overlap)}

    @classmethod
    def indices(cls, n: int) -> "Grid":
        """n tasks that are not boxes (label-hash buckets, shard numbers, a global
        reduce): task i gets Bbox((i, 0, 0), (i + 1, 1, 1)); read i as box.minpt.x."""
        return cls([0, 0, 0], [int(n), 1, 1], [1, 1, 1])

    @classmethod
    def of(cls, box: Bbox, shape, overlap: int = 0) -> "Grid":
        return cls(box.minpt.tolist(), box.maxpt.tolist(), [int(s) for s in shape], overlap)


@dataclass
class Stage:
    """One pass of a step: a grid, a batch size, and the parameters every task gets."""

    name: str
    grid: Grid
    tasks_per_job: int
    params: dict
    task_bytes: float = 0.0  # memory one task needs

    @property
    def jobs(self) -> int:
        return max(1, -(-self.grid.n // self.tasks_per_job))

    def job_tasks(self, job: int) -> range:
        start = job * self.tasks_per_job
        return range(start, min(start + self.tasks_per_job, self.grid.n))

    def to_dict(self) -> dict:
        return {"name": self.name, "grid": self.grid.to_dict(), "tasks_per_job": self.tasks_per_job,
                "params": self.params, "task_bytes": self.task_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "Stage":
        return cls(d["name"], Grid(**d["grid"]), d["tasks_per_job"], d["params"], d.get("task_bytes", 0.0))


@dataclass
class StepPlan:
    name: str
    op: str
    params: dict
    stages: list = field(default_factory=list)
    infos: dict = field(default_factory=dict)  # layer -> info the setup job writes
    files: dict = field(default_factory=dict)  # layer -> {path in layer: JSON} the setup job writes (skeleton/mesh info)
    writes: list = field(default_factory=list)  # layers whose provenance records this step
    sources: list = field(default_factory=list)  # layers read (provenance `sources`)
    threads: int = 1
    runtime: int = 60
    mem_mb: int = 0
    after: list = field(default_factory=list)  # names of steps this one waits for
    checks: list = field(default_factory=list)  # (layer, mip, Bbox, fill_missing) read by the step
    preflight: dict | None = None  # params of the op's own `preflight(step, params)`, run by the setup job
    notes: list = field(default_factory=list)  # human-readable plan lines

    @property
    def jobs(self) -> int:
        return sum(s.jobs for s in self.stages)

    @property
    def tasks(self) -> int:
        return sum(s.grid.n for s in self.stages)


def batch_size(n_tasks: int, execution: dict) -> int:
    """Tasks per Snakemake job: at least `tasks_per_job`, more when a stage would
    otherwise exceed `max_jobs_per_stage` (keeps DAGs small for huge layers)."""
    per = max(1, int(execution["tasks_per_job"]))
    cap = max(1, int(execution["max_jobs_per_stage"]))
    return max(per, math.ceil(n_tasks / cap))


STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def make_stage(name: str, grid: Grid, params: dict, execution: dict, task_bytes: float = 0.0) -> Stage:
    if not STAGE_NAME.fullmatch(name):  # it becomes a directory name and a Snakemake wildcard
        raise ValueError(f"stage name {name!r}: use letters, digits, '_', '-' and '.'")
    if grid.n == 0:
        raise MagmaError(f"stage {name}: the region to process is empty")
    # a task never holds more than the region it covers (small layers, big default shapes)
    size = np.asarray(grid.maxpt) - np.asarray(grid.minpt)
    held = np.minimum(np.asarray(grid.shape), size)
    task_bytes = float(task_bytes) * float(np.prod(held)) / float(np.prod(grid.shape))
    return Stage(name, grid, batch_size(grid.n, execution), params, task_bytes)


def toposort(names: list, edges: dict) -> list:
    """Order `names` so every edge (a -> b in edges[b]) is respected; config order breaks ties."""
    order, state = [], {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        if state.get(n) == "active":
            cycle = path[path.index(n):] + [n]
            raise MagmaError(f"steps: dependency cycle {' -> '.join(cycle)} (check `after:` and src/dest layers)")
        state[n] = "active"
        for m in sorted(edges.get(n, ()), key=names.index):
            visit(m, path + [n])
        state[n] = "done"
        order.append(n)

    for n in names:
        visit(n, [])
    return order
