"""Encoders per modality on one shared Transformer; `build_encoder(get_spec(name))` builds one."""
from d2v_engine.models.encoder import EncoderOutput, Views
from d2v_engine.models.registry import MODEL_REGISTRY, build_encoder, get_spec

__all__ = ["MODEL_REGISTRY", "EncoderOutput", "Views", "build_encoder", "get_spec"]
