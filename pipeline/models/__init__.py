"""RMT models; importing this package registers rmt_t/s/b/l with timm."""

from pipeline.models.checkpoints import CheckpointError, load_rmt_checkpoint
from pipeline.models.rmt import RMT, InputShapeError

__all__ = ["RMT", "CheckpointError", "InputShapeError", "load_rmt_checkpoint"]
