"""Hugging Face interop: our encoders <-> `transformers`' Data2VecVision / Data2VecAudio / Data2VecText.

    encoder = from_hf(hf_model)           # same outputs as hf_model, every layer, in fp32
    hf_model = to_hf(encoder)             # save_pretrained / from_pretrained round-trip exactly
    spec = spec_from_hf_config(config)    # and hf_config_from_spec(spec)
    states = hidden_states(encoder, pixel_values=x)   # == hf_model(x, output_hidden_states=True).hidden_states

`transformers` is an optional dependency (`pip install d2v_engine[hf]`): it is imported inside the
functions that need it, so `import d2v_engine.hf` works without it and those functions raise a
one-sentence `UserError` saying how to install it.

Modules: `spec` (spec <-> config), `weights` (parameter mapping, hidden states), `commands`
(`d2v hf-import` and `d2v hf-export`), `finetuned` (`d2v hf-export --finetuned`: task models),
`start` (`d2v finetune --hf-dir`: a folder's encoder as a fine-tuning's start).
"""
from d2v_engine.hf.commands import hf_export, hf_import, load_hf_model, quiet_transformers
from d2v_engine.hf.finetuned import hf_export_finetuned
from d2v_engine.hf.spec import hf_config_from_spec, require_transformers, spec_from_hf_config
from d2v_engine.hf.weights import encode, from_hf, hidden_states, to_hf

__all__ = ["encode", "from_hf", "hf_config_from_spec", "hf_export", "hf_export_finetuned", "hf_import",
           "hidden_states", "load_hf_model", "quiet_transformers", "require_transformers", "spec_from_hf_config",
           "to_hf"]
