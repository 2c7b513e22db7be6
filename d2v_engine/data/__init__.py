"""Data: WebDataset shards (`shards`), offline data sets (`prepare`), and the readers.

`build_loader` picks the reader named by `data.reader`; every reader yields the same batch layout.
"""
from d2v_engine.data.webdataset import BatchStream
from d2v_engine.data.webdataset import build_loader as build_torch_loader
from d2v_engine.errors import UserError

__all__ = ["BatchStream", "build_loader"]


def build_loader(cfg, spec, *, rank: int = 0, world_size: int = 1, position: dict | None = None):
    """The batch stream of `data.reader` for this rank (see `webdataset.build_loader` for the args)."""
    if cfg.data.reader == "dali":
        raise UserError("data.reader=dali is not available in this build yet (the DALI pipelines are "
                        "a work in progress); use data.reader=torch.")
    return build_torch_loader(cfg, spec, rank=rank, world_size=world_size, position=position)
