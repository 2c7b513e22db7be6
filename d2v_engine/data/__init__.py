"""Data: WebDataset shards (`shards`), offline data sets (`prepare`), and the `torch` reader."""
from d2v_engine.data.webdataset import BatchStream, build_loader

__all__ = ["BatchStream", "build_loader"]
