"""Weights between our encoders and Hugging Face's Data2Vec models, and HF-style hidden states.

Our parameter names follow the HF layout, so import is mostly renaming (`_RULES`, one table per
modality, read in both directions). The details that are not renaming:

- text `token_type_embeddings`: HF adds row 0 of it to every token (data2vec has no segments). It
  is folded into the word embeddings on import (HF computes `(word + type) + position`, so the
  folded sum is bit-identical) and exported as a single zero row (`type_vocab_size=1`);
- poolers (`pooler.*`) are not part of the encoder: a vision pooler (mean-pooling models built with
  `add_pooling_layer=True`) and the text pooler (tanh(dense(CLS)), untrained by data2vec) are dropped
  on import; the exported text model gets one initialised from a fixed seed (HF's layout);
- optional HF parameters (`mask_token` without `use_mask_token`, `masked_spec_embed` without
  masking probabilities) keep our initialisation on import and are always exported.
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import Tensor, nn

from d2v_engine.errors import UserError
from d2v_engine.hf.spec import hf_config_from_spec, require_transformers, spec_from_hf_config
from d2v_engine.models.registry import ModelSpec, build_encoder

_LAYER = "encoder.layer.{i}."
_OURS = "encoder.layers.{i}."
_RULES: dict[str, list[tuple[str, str]]] = {
    # (Hugging Face prefix, our prefix); `{i}` is a block index. Names matching no rule are equal.
    "image": [
        ("embeddings.patch_embeddings.projection.", "embeddings.projection."),
        ("encoder.relative_position_bias.", "relative_position_bias."),
        (_LAYER + "attention.attention.relative_position_bias.", _OURS + "attention.relative_position_bias."),
        (_LAYER + "attention.attention.query.", _OURS + "attention.q_proj."),
        (_LAYER + "attention.attention.key.", _OURS + "attention.k_proj."),
        (_LAYER + "attention.attention.value.", _OURS + "attention.v_proj."),
        (_LAYER + "attention.output.dense.", _OURS + "attention.out_proj."),
        (_LAYER + "layernorm_before.", _OURS + "layer_norm."),
        (_LAYER + "layernorm_after.", _OURS + "final_layer_norm."),
        (_LAYER + "intermediate.dense.", _OURS + "feed_forward.intermediate_dense."),
        (_LAYER + "output.dense.", _OURS + "feed_forward.output_dense."),
        (_LAYER + "lambda_", _OURS + "lambda_"),
    ],
    "audio": [
        ("encoder.pos_conv_embed.", "pos_conv_embed."),
        ("encoder.layer_norm.", "layer_norm."),
    ],
    "text": [
        (_LAYER + "attention.self.query.", _OURS + "attention.q_proj."),
        (_LAYER + "attention.self.key.", _OURS + "attention.k_proj."),
        (_LAYER + "attention.self.value.", _OURS + "attention.v_proj."),
        (_LAYER + "attention.output.dense.", _OURS + "attention.out_proj."),
        (_LAYER + "attention.output.LayerNorm.", _OURS + "layer_norm."),
        (_LAYER + "intermediate.dense.", _OURS + "feed_forward.intermediate_dense."),
        (_LAYER + "output.dense.", _OURS + "feed_forward.output_dense."),
        (_LAYER + "output.LayerNorm.", _OURS + "final_layer_norm."),
    ],
}
_DROPPED = ("pooler.", "embeddings.token_type_embeddings.")
"""HF names that have no counterpart in our encoders (handled as the module docstring says)."""
_TOKEN_TYPE = "embeddings.token_type_embeddings.weight"


def _rename(name: str, modality: str, to_ours: bool) -> str:
    """One parameter name translated between the HF layout and ours."""
    for hf, ours in _RULES[modality]:
        src, dst = (hf, ours) if to_ours else (ours, hf)
        match = re.match(re.escape(src).replace(r"\{i\}", r"(\d+)"), name)
        if match:
            return (dst.replace("{i}", match.group(1)) if match.groups() else dst) + name[match.end():]
    return name


def _base_model(hf_model: nn.Module) -> nn.Module:
    """The bare Data2Vec*Model inside a task model (e.g. `...ForImageClassification`), else the model."""
    return getattr(hf_model, "base_model", hf_model)


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    """Put `value` at the dotted parameter or buffer name `name` of `module`."""
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner)
    old = getattr(sub, leaf)
    # Module.__setattr__ replaces a registered parameter or buffer in place (persistence unchanged).
    setattr(sub, leaf, nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value)


def _fill_rest(encoder: nn.Module, spec: ModelSpec) -> None:
    """Give what is still on the meta device the encoder's own initialisation.

    That is what the HF weights lack: optional parameters, and non-persistent buffers such as the
    relative position indices. It comes from a one-block twin (all blocks are built alike), which
    costs little where a full build costs seconds (trunc-normal init of a base model's weights).
    """
    rest = [n for n, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta]
    if not rest:
        return
    with torch.random.fork_rng(devices=[]):     # the caller's random stream stays as it was
        twin = build_encoder(dataclasses.replace(spec, transformer=dataclasses.replace(spec.transformer, depth=1)))
    source = {**dict(twin.named_parameters()), **dict(twin.named_buffers())}
    for name in rest:
        twin_name = re.sub(r"^encoder\.layers\.\d+\.", "encoder.layers.0.", name)
        _set_tensor(encoder, name, source[twin_name].detach().clone())


def from_hf(hf_model: nn.Module, like: ModelSpec | None = None) -> nn.Module:
    """Our encoder with the weights of a Hugging Face Data2Vec model.

    Args:
        hf_model: a `Data2VecVisionModel`, `Data2VecAudioModel` or `Data2VecTextModel` (or a task
            model around one).
        like: passed to `spec_from_hf_config` (pretraining-only fields of the spec).
    Returns:
        The encoder (fp32, CPU, eval mode) computing what `hf_model` computes; it shares no
        storage with `hf_model`.
    Raises:
        UserError: not a Data2Vec model, or a variant our encoders do not implement.
    """
    hf_model = _base_model(hf_model)
    spec = spec_from_hf_config(hf_model.config, like)
    state = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in hf_model.state_dict().items()}
    token_type = state.get(_TOKEN_TYPE)
    ours = {_rename(k, spec.modality, to_ours=True): v for k, v in state.items() if not k.startswith(_DROPPED)}
    if token_type is not None:
        ours["embeddings.word_embeddings.weight"] += token_type[0]
    # Built on the meta device, the HF tensors assigned: no initialisation of weights replaced anyway.
    with torch.device("meta"):
        encoder = build_encoder(spec)
    result = encoder.load_state_dict(ours, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in ("embeddings.mask_token", "masked_spec_embed")]
    if missing or result.unexpected_keys:
        raise UserError(f"the Hugging Face weights do not map onto our {spec.modality} encoder (missing "
                        f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}).")
    _fill_rest(encoder, spec)
    return encoder.eval()


def to_hf(encoder: nn.Module) -> nn.Module:
    """A Hugging Face Data2Vec model with the weights of our encoder.

    Args:
        encoder: an image, audio or text encoder (any device; weights are copied to the CPU in fp32).
    Returns:
        `Data2VecVisionModel` / `Data2VecAudioModel` / `Data2VecTextModel` in eval mode, ready for
        `save_pretrained`; it shares no storage with `encoder`.
    """
    transformers = require_transformers()
    spec = encoder.spec
    config = hf_config_from_spec(spec)
    cls = {"image": transformers.Data2VecVisionModel, "audio": transformers.Data2VecAudioModel,
           "text": transformers.Data2VecTextModel}[spec.modality]
    state = hf_state_dict(encoder)
    if spec.modality == "text":
        dim = spec.transformer.dim
        # HF's layout has a pooler, which data2vec never trains: HF's initialisation, from a fixed seed
        # so that an export is reproducible.
        gen = torch.Generator().manual_seed(0)
        state["pooler.dense.weight"] = torch.randn(dim, dim, generator=gen) * config.initializer_range
        state["pooler.dense.bias"] = torch.zeros(dim)
    return build_hf_model(cls, config, state)


def hf_state_dict(encoder: nn.Module) -> dict[str, Tensor]:
    """Our encoder's weights under the names of the HF base model (no pooler), as fp32 CPU copies.

    Args:
        encoder: an image, audio or text encoder.
    Returns:
        name -> tensor; a text model gets the single zero row of `token_type_embeddings`.
    """
    spec = encoder.spec
    state = {_rename(k, spec.modality, to_ours=False): v.detach().to("cpu", torch.float32, copy=True)
             for k, v in encoder.state_dict().items()}
    if spec.modality == "text":
        state[_TOKEN_TYPE] = torch.zeros(1, spec.transformer.dim)
    return state


def build_hf_model(cls: type, config, state: dict[str, Tensor]) -> nn.Module:
    """The HF model `cls(config)` holding `state`, in eval mode.

    Args:
        cls: a `transformers` model class; config: its config.
        state: every tensor of the model's state dict, by HF name.
    Returns:
        The model (it shares no storage with our modules when `state` holds copies).
    Raises:
        RuntimeError: `state` lacks some of the model's tensors (a mapping bug, not a user error).
    """
    # from_pretrained with a state dict builds on the meta device and assigns the tensors: no
    # initialisation pass over weights that are overwritten anyway.
    model = cls.from_pretrained(None, config=config, state_dict=state)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise RuntimeError(f"export mapping is incomplete: no weights for {missing[:3]}")
    return model.eval()


def _forward(encoder: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Run `encoder` on HF-style inputs; returns what HF calls `last_hidden_state`."""
    if encoder.modality == "image":
        out = encoder(inputs["pixel_values"])
        return torch.cat([out.cls.unsqueeze(1), out.x], dim=1)      # HF keeps CLS in front
    mask = inputs.get("attention_mask")
    if encoder.modality == "audio":
        pad = None if mask is None else ~mask.bool()
        feats, frame_pad = encoder.local_features(inputs["input_values"], pad)
        return encoder(feats, padding_mask=frame_pad).x
    ids = inputs["input_ids"]
    # Without an attention mask HF attends to every token, <pad> included.
    pad = torch.zeros_like(ids, dtype=torch.bool) if mask is None else ~mask.bool()
    return encoder(ids, padding_mask=pad).x


def encode(encoder: nn.Module, **inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Our encoder's outputs in the layout of the HF model's `last_hidden_state` and `hidden_states`.

    Hooks on the blocks record the stack's input and every block's output on the encoder's own
    forward pass. Call it in eval mode (layerdrop would skip blocks in training).

    Args:
        encoder: an image, audio or text encoder.
        **inputs: `pixel_values` [B, 3, H, W]; or `input_values` [B, S] with optional
            `attention_mask` [B, S] (1 = sample); or `input_ids` [B, T] with optional
            `attention_mask` [B, T] (1 = token).
    Returns:
        (last_hidden_state [B, T, C] (images: CLS first), hidden_states: depth + 1 tensors [B, T, C],
        the embedding output then each block's output).
    """
    states: list[Tensor] = []
    layers = encoder.encoder.layers
    hooks = [layers[0].register_forward_pre_hook(lambda module, args: states.append(args[0]))]
    hooks += [layer.register_forward_hook(lambda module, args, out: states.append(out[0])) for layer in layers]
    try:
        last = _forward(encoder, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return last, states


def hidden_states(encoder: nn.Module, **inputs: Tensor) -> list[Tensor]:
    """The HF model's `hidden_states` (`output_hidden_states=True`) computed by our encoder.

    Args:
        encoder: an image, audio or text encoder, in eval mode.
        **inputs: as for `encode`.
    Returns:
        depth + 1 tensors [B, T, C]: the embedding output, then each block's output.
    """
    return encode(encoder, **inputs)[1]
