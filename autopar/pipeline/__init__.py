"""Pipeline parallelism: automatic cost-balanced split of unmodified models, stage runtime,
asynchronous point-to-point transfers, and the gpipe / 1f1b / interleaved / zerobubble schedules."""
from .schedules import SCHEDULES, build_schedule
from .split import partition
from .trace import UntraceableModel
from .stage import Pipeline

__all__ = ["SCHEDULES", "Pipeline", "UntraceableModel", "build_schedule", "partition"]
