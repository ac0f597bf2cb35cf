"""Operations: one module per op, found by name (ops/<op>.py), its config schema
in workflow/schemas/ops/<op>.yaml. Each module has the same small interface:

    reads(p) / writes(p) / creates(p) -> layer names (for ordering steps)
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
