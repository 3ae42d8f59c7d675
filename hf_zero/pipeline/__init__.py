"""Pipeline parallelism with ZeRO-1/2: a decoder model split at layer boundaries, run by torch's schedules.

- ``split.py``: which layers each piece holds, the in-place prune (params keep their names) and the
  ``StagePiece`` a ``PipelineStage`` runs;
- ``runner.py``: ``PipelineRunner``, one rank's pieces under ``Schedule1F1B`` /
  ``ScheduleInterleaved1F1B`` / ``ScheduleGPipe``, with the model's loss over the step's real tokens;
- ``build.py``: the split for one rank of a pipeline group, and the checks that refuse a model first.

The (pp, dp, tp) mesh (tp 1 without tensor parallelism) is hf_zero/tensor_parallel/mesh.py; the Trainer's
side is hf_zero/trainer/pipeline.py.
"""

from hf_zero.pipeline.build import build, check
from hf_zero.pipeline.runner import PipelineRunner
from hf_zero.pipeline.split import NotSplittable

__all__ = ["NotSplittable", "PipelineRunner", "build", "check"]
