"""Operations. Each module has the same small interface:

    reads(p) / writes(p) / creates(p) -> layer names (for ordering steps)
    plan(ctx, name, p) -> StepPlan      (pure: info dicts in, grids out; updates ctx.infos)
    run_task(params, box, paths) -> dict of counts (voxels, files)
"""
from . import delete, demo, downsample, transfer

OPS = {"downsample": downsample, "transfer": transfer, "delete": delete, "demo": demo}
