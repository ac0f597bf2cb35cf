"""Operations: one module per op, found by name (ops/<op>.py), its config schema
in workflow/schemas/ops/<op>.yaml. Each module has the same small interface:

    reads(p) / writes(p) / creates(p) -> layer names (for ordering steps); optional:
        by default an op with `layer` reads and writes it, an op with `src` and `dest`
        reads src and creates dest (the SPEC's two kinds of op)
    plan(ctx, name, p) -> StepPlan      (pure: info dicts in, grids out; updates ctx.infos)
    run_task(params, box, paths) -> dict of counts (voxels, files)

A stage's params may carry "task": "<function name>" to run another function of
the module with the same signature (multi-stage ops: forge, merge, clean, ...).
Modules whose names start with "_" or that lack `plan` are helpers, not ops.

Modules are imported when first used: every job and every Snakemake start imports
only the ops (and their libraries: zmesh, kimimaro, ...) it runs.
"""
import importlib
import pkgutil


def _reads(p):
    return [p["layer"]] if "layer" in p else [p["src"]]


def _writes(p):
    return [p["layer"]] if "layer" in p else [p["dest"]]


def _creates(p):
    return [] if "layer" in p else [p["dest"]]


class _Ops(dict):
    """op name -> module, imported on first access."""

    def __init__(self, names):
        super().__init__()
        self.names = sorted(names)

    def __missing__(self, name):
        if name not in self.names:
            raise KeyError(name)
        mod = importlib.import_module(f"{__name__}.{name}")
        if not (hasattr(mod, "plan") and hasattr(mod, "run_task")):
            raise KeyError(name)
        for role, default in (("reads", _reads), ("writes", _writes), ("creates", _creates)):
            if not hasattr(mod, role):
                setattr(mod, role, default)
        self[name] = mod
        return mod

    def __contains__(self, name):
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def keys(self):
        return list(self.names)

    def values(self):
        return [self[n] for n in self.names]

    def items(self):
        return [(n, self[n]) for n in self.names]


OPS = _Ops(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name != "common")
