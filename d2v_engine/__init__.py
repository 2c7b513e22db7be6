"""d2v_engine: a data2vec pretraining engine for images, speech and text."""

__version__ = "0.1.0"
