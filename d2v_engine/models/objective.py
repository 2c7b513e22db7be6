"""The training objective of `method.version`, chosen once, where the trainer builds the model."""
from __future__ import annotations

from torch import nn

from d2v_engine.config import Config
from d2v_engine.models.data2vec import Data2Vec
from d2v_engine.models.data2vec2 import Data2Vec2


def build_objective(cfg: Config, encoder: nn.Module) -> Data2Vec | Data2Vec2:
    """data2vec 1.0 (`Data2Vec`: encoder + head) or 2.0 (`Data2Vec2`: encoder + decoder) around `encoder`.

    Both have the same interface: `forward(batch, teacher) -> (loss, stats)`, `teacher_copy` (what
    the teacher shares with the student by copying), `clones`, `step_flops(batch)`.
    """
    if cfg.method.version == 2:
        return Data2Vec2(encoder, cfg.decoder, cfg.loss, cfg.method.clones, backend=cfg.kernels.backend)
    return Data2Vec(encoder, cfg.loss, backend=cfg.kernels.backend)
