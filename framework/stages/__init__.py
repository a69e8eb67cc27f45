"""The stage kinds, by name. Adding one: a module here (a `Stage` subclass and its `STAGE`), its line below,
conf/<kind>.yaml and conf/<kind>/, recipes/<kind>.py, the README and tests."""

from framework.stages import distill, export, lowrank, prune, quantize, share, train
from framework.stages.base import Stage

STAGES: dict[str, Stage] = {
    stage.kind: stage
    for stage in (
        train.STAGE,
        prune.STAGE,
        lowrank.STAGE,
        quantize.STAGE,
        distill.STAGE,
        share.STAGE,
        export.STAGE,
    )
}

__all__ = ["STAGES", "Stage"]
