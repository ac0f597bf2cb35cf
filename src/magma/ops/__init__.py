"""Operations: one module per op, found by name (ops/<op>.py), its config schema
in workflow/schemas/ops/<op>.yaml. Each module has the same small interface:

    reads(p) / writes(p) / creates(p) -> layer names (for ordering steps)
    plan(ctx, name, p) -> StepPlan      (pure: info dicts in, grids out; updates ctx.infos)
    run_task(params, box, paths) -> dict of counts (voxels, files)

A stage's params may carry "task": "<function name>" to run another function of
the module with the same signature (multi-stage ops: forge, merge, clean, ...).
Modules whose names start with "_" or that lack `plan` are helpers, not ops.
"""
import importlib
import pkgutil

OPS = {}
for _m in pkgutil.iter_modules(__path__):
    if _m.name.startswith("_") or _m.name == "common":
        continue
    _mod = importlib.import_module(f"{__name__}.{_m.name}")
    if hasattr(_mod, "plan") and hasattr(_mod, "run_task"):
        OPS[_m.name] = _mod
