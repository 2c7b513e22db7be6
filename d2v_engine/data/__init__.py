"""Data: WebDataset shards (`shards`), offline data sets (`prepare`), shards from a folder
(`build_shards`), and the readers: `torch` (`webdataset`) and `dali` (`dali`).

`build_loader` picks the reader named by `data.reader`; every reader yields the same batch layout.
A `torch` reader worker that dies stops the run with one sentence (`workers`).
"""
from d2v_engine.data.stream import BatchStream

__all__ = ["BatchStream", "build_loader"]


def build_loader(cfg, spec, *, rank: int = 0, world_size: int = 1, position: dict | None = None):
    """The batch stream of `data.reader` for this rank (see `webdataset.build_loader` for the args)."""
    if cfg.data.reader == "dali":
        from d2v_engine.data.dali import build_loader as build_dali_loader

        return build_dali_loader(cfg, spec, rank=rank, world_size=world_size, position=position)
    from d2v_engine.data.webdataset import build_loader as build_torch_loader

    return build_torch_loader(cfg, spec, rank=rank, world_size=world_size, position=position)
