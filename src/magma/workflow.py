"""From a validated config to the whole plan: step order, predicted infos, stages, jobs.

Ordering rules (so `after:` is rarely needed):
  - a step that creates a layer (transfer dest, demo) runs before every other
    step that touches that layer;
  - steps that write the same layer run in config order, and so do a writer
    and a reader of the same layer;
  - `after:` adds any other ordering.
Two steps creating the same layer, or a cycle, are config errors.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import layers
from .config import validate
from .design import format_bytes
from .errors import MagmaError
from .ops import OPS
from .ops.common import Context
from .plan import toposort

DEMO_STEP = "demo"


@dataclass
class WorkflowPlan:
    config: dict
    steps: dict = field(default_factory=dict)  # name -> StepPlan, in run order

    @property
    def paths(self) -> dict:
        return self.config["layers"]

    def table(self) -> str:
        rows = [("step", "op", "stage", "tasks", "task shape", "jobs", "mem/job")]
        for s in self.steps.values():
            for st in s.stages:
                rows.append((s.name, s.op, st.name, str(st.grid.n), "x".join(map(str, st.grid.shape)),
                             str(st.jobs), format_bytes(s.mem_mb * 1e6)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        total = sum(s.jobs for s in self.steps.values())
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"total: {len(self.steps)} steps, {total} task jobs (+ a setup and a finish job per step)")
        return "\n".join(lines)


def _step_list(cfg: dict) -> list:
    """(name, op, params) for every step, the demo synthesis first when configured."""
    out = []
    if "demo" in cfg:
        if DEMO_STEP in cfg["steps"]:
            raise MagmaError(f"config: steps.{DEMO_STEP}: the name is taken by the demo synthesis; rename the step")
        out.append((DEMO_STEP, "demo", cfg["demo"]))
    out += [(n, s["op"], s) for n, s in cfg["steps"].items()]
    return out


def dependencies(steps: list) -> dict:
    """name -> set of step names it must wait for."""
    names = [n for n, _, _ in steps]
    touch = {n: (set(OPS[op].reads(p)), set(OPS[op].writes(p)), set(OPS[op].creates(p))) for n, op, p in steps}
    creator = {}
    for n in names:
        for layer in touch[n][2]:
            if layer in creator:
                raise MagmaError(
                    f"config: steps {creator[layer]} and {n} both create layer '{layer}'; each output needs one step"
                )
            creator[layer] = n
    deps = {n: set() for n in names}
    for i, n in enumerate(names):
        r, w, _ = touch[n]
        for layer in r | w:
            if layer in creator and creator[layer] != n:
                deps[n].add(creator[layer])
        for m in names[:i]:
            rm, wm, cm = touch[m]
            if n in (creator.get(x) for x in (rm | wm)):
                continue  # n creates what m touches: the creator rule already orders them
            if (wm & (r | w)) or (w & rm):
                deps[n].add(m)
    for n, _, p in steps:
        deps[n].update(p.get("after", []) if isinstance(p, dict) else [])
    return deps


# Top-level info keys an op adds to the layer it writes (scale results like `rois`: layers.without_results).
OWN_KEYS = {"mesh": ("mesh",), "mesh_transfer": ("mesh",), "skeleton": ("skeletons",),
            "skeleton_transfer": ("skeletons",)}


def _hold_own_keys(steps: list, infos: dict) -> dict:
    """Take out of the stored infos the keys that steps of this config add themselves, until
    the step that owns them is planned: (layer, key) -> stored value.

    On a re-run such a key is already stored, put there by a step that may come *after* others
    on the same layer; planning those earlier steps with it would change their params (a
    downsample's predicted info, a transfer's copy of its source) and Snakemake would redo
    finished work. The owning step gets the stored value back (a mesh step keeps the mesh
    directory the info names).
    """
    held = {}
    for _, op, p in steps:
        for key in OWN_KEYS.get(op, ()):
            for layer in OPS[op].writes(p):
                if layer in infos and key in infos[layer]:
                    held[(layer, key)] = infos[layer].pop(key)
    return held


def _give_back(held: dict, op: str, p: dict, infos: dict) -> None:
    for key in OWN_KEYS.get(op, ()):
        for layer in OPS[op].writes(p):
            if (layer, key) in held and layer in infos and key not in infos[layer]:
                infos[layer] = dict(infos[layer], **{key: held.pop((layer, key))})


def plan(config: dict, read_info=layers.read_info) -> WorkflowPlan:
    """Validate `config` and plan every step. Reads only info files; writes nothing."""
    cfg = validate(config)
    steps = _step_list(cfg)
    deps = dependencies(steps)
    order = toposort([n for n, _, _ in steps], deps)
    by_name = {n: (op, p) for n, op, p in steps}
    created = {layer for n, op, p in steps for layer in OPS[op].creates(p)}
    used = {layer for n, op, p in steps for layer in OPS[op].reads(p) + OPS[op].writes(p)}

    infos = {}
    for layer in sorted(used):
        path = cfg["layers"][layer]
        if layer in created:
            try:  # an existing output is compared with what the step will make
                infos[layer] = layers.without_results(read_info(layer, path))
            except MagmaError:
                pass
        else:
            infos[layer] = layers.without_results(read_info(layer, path))
    held = _hold_own_keys(steps, infos)

    result = WorkflowPlan(cfg)
    ex = cfg["execution"]
    for name in order:
        op, p = by_name[name]
        step_exec = dict(ex) | ex["steps"].get(name, {})
        ctx = Context(paths=cfg["layers"], infos=infos, execution=ex, step_exec=step_exec)
        _give_back(held, op, p, infos)
        sp = OPS[op].plan(ctx, name, p)
        sp.after = sorted(deps[name], key=order.index)
        sp.threads = int(step_exec["threads"])
        sp.runtime = int(step_exec["runtime"])
        task_bytes = max((st.task_bytes for st in sp.stages), default=0.0)
        sp.mem_mb = int(step_exec.get("mem_mb") or math.ceil((task_bytes * 1.25 * sp.threads + 512e6) / 1e6))
        result.steps[name] = sp
    return result


def run_dir(cfg: dict, configfiles) -> str:
    if cfg["execution"]["run_dir"]:
        return cfg["execution"]["run_dir"]
    stem = Path(configfiles[-1]).stem if configfiles else "config"
    # the file name becomes a directory: keep plain characters only
    return "results/" + (re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".") or "config")
