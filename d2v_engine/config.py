"""Configuration: a tree of flat dataclass sections, loaded from YAML, overridden from the command line.

Precedence: command-line `section.key=value` > YAML file > the defaults below. Every field has a
one-line docstring; choices are `Literal[...]`. `load_config` validates everything and raises
`UserError` with one sentence (an unknown key names the closest valid one).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from d2v_engine.errors import UserError


@dataclass
class ModelConfig:
    name: str = "image_debug"
    """Registry key of the architecture, `<modality>_<size>` (see `d2v_engine.models.registry`)."""
    dropout: float | None = None
    """Dropout in the Transformer blocks; None keeps the registry's value."""
    drop_path: float | None = None
    """Stochastic-depth rate of the last block (images); None keeps the registry's value."""
    layerdrop: float | None = None
    """Probability of skipping a whole block in the student; None keeps the registry's value."""
    pos_conv_padding: Literal["zeros", "circular"] | None = None
    """Audio: padding of the position convolution (`zeros` as data2vec and Hugging Face, `circular`:
    no frame can tell its index; see `ModelSpec.pos_conv_padding`); None keeps the registry's value."""


@dataclass
class MethodConfig:
    version: Literal[1, 2] = 1
    """data2vec 1.0 (the student encodes every token, masked ones as a learned mask embedding, and a
    head predicts the targets) or 2.0 (the student encodes only the visible tokens of `clones` masked
    copies of each sample, a light conv decoder predicts the targets; `d2v_engine.models.data2vec2`)."""
    clones: int = 1
    """2.0: masked copies M of each sample; the teacher encodes the clean sample once and its targets
    serve all M (fairseq `clone_batch`: 16 images, 8 audio, 8 text). 1.0: must be 1."""


@dataclass
class DecoderConfig:
    """data2vec 2.0's decoder: conv blocks over the restored sequence, then a projection to the width."""

    layers: int = 4
    """Conv blocks (Conv -> LayerNorm without affine -> GELU)."""
    dim: int = 384
    """Channels of the conv blocks."""
    kernel: int = 7
    """Kernel size (images: square kernels on the patch grid)."""
    groups: int = 16
    """Groups of each convolution."""
    residual: bool = True
    """Add each block's input to its output where the shapes match."""
    projection_layers: int = 1
    """Layers of the projection to the model width: 1 = Linear, 2 = Linear -> GELU -> Linear (text)."""
    projection_ratio: float = 2.0
    """Hidden width of a 2-layer projection, as a multiple of `dim`."""
    input_dropout: float = 0.1
    """Dropout on the student's outputs before they enter the decoder."""
    mask_noise_std: float = 0.01
    """Standard deviation of the Gaussian noise that fills the masked slots of the decoder's input."""


@dataclass
class DataConfig:
    path: str = "data/fashion-mnist/train"
    """A folder of WebDataset `.tar` shards (or a brace pattern such as `dir/shard-{000000..000009}.tar`)."""
    reader: Literal["torch", "dali"] = "torch"
    """Which reader decodes the shards: `torch` (DataLoader workers, PIL/soundfile) or `dali` (DALI, GPU if any)."""
    num_workers: int = 1
    """`torch`: DataLoader worker processes (0 = decode in the training process); `dali`: CPU threads."""
    rank_split: Literal["shards", "samples"] = "shards"
    """Ranks read disjoint `shards` (if they deal out evenly) or disjoint `samples` (rank-count-free batches)."""
    tokenizer: str = ""
    """Text: a `tokenizers` JSON file; empty = `tokenizer.json` beside the shards or one folder up."""
    image_size: int = 0
    """Images: crop size in pixels; 0 = the model's image size."""
    crop_scale: float = 0.35
    """Images: smallest area fraction kept by the random resized crop."""
    hflip: bool = True
    """Images: random horizontal flip."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Images: per-channel mean subtracted after scaling pixels to [0, 1] (ImageNet's by default)."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Images: per-channel standard deviation divided out after the mean."""
    sample_rate: int = 16000
    """Audio: the rate the model expects; clips at other rates are resampled."""
    max_sample_size: int = 320000
    """Audio: longer clips are randomly cropped to this many samples."""
    audio_batching: Literal["crop", "pad"] = "crop"
    """Audio: crop a batch to its shortest clip (the reference recipe) or pad to its longest."""
    max_tokens: int = 512
    """Text: longest token sequence, special tokens included; longer texts are truncated."""
    max_bad_fraction: float = 0.01
    """Stop the run when more than this fraction of the samples read (all ranks) cannot be decoded
    (judged with a three-sigma margin for the count so far: `trainer.too_many_bad`)."""


@dataclass
class MaskConfig:
    prob: float = 0.6
    """Masked fraction: images (of patches, block-wise), audio (span starts x length), text (tokens)."""
    length: int = 10
    """Audio: span length in frames; 2.0 images: side of the square blocks (in patches); 2.0 text: 1."""
    adjust: float = 0.0
    """2.0 block masks: extra block centres drawn, as a fraction of the steps (fairseq `mask_prob_adjust`),
    before the count is made exact by adding or removing single steps."""
    inverse: bool = False
    """2.0 images: the blocks mark the patches to keep (`1 - prob` of them) instead of those to mask."""
    min_block: int = 16
    """Images: smallest block in patches (BEiT generator)."""
    max_block: int = 0
    """Images: largest block in patches; 0 = no limit beyond the number still to mask."""
    min_aspect: float = 0.3
    """Images: smallest block aspect ratio (the largest is its inverse)."""
    replace_prob: float = 0.8
    """Text: fraction of the selected tokens replaced by `<mask>`."""
    random_prob: float = 0.1
    """Text: fraction of the selected tokens replaced by a random token (the rest stay unchanged)."""


@dataclass
class TargetConfig:
    top_k: int = 6
    """Number of top teacher blocks averaged into the target."""
    layer_norm: Literal["instance", "layer", "none"] = "layer"
    """Parameter-free normalisation of each block output before averaging."""
    final_norm: Literal["layer", "instance", "none"] = "none"
    """Normalisation of the average."""
    block_output: Literal["ffn", "block"] | None = None
    """What each top-K block contributes: its FFN output before the residual (`ffn`) or its output
    (`block`); None = the model's own choice (images `block`, audio and text `ffn`)."""


@dataclass
class LossConfig:
    beta: float = 2.0
    """Smooth-L1 beta; 0 = squared error."""
    scale: Literal["one", "inv_sqrt_dim", "inv_dim"] = "one"
    """Factor on the per-row sum over channels: 1, 1/sqrt(C), or 1/C (= mean over C)."""
    cls_weight: float = 0.0
    """2.0 images: weight of the CLS-token loss (each copy's CLS output regresses the mean of its
    sample's targets), on its mean over copies beside the mean over masked rows. fairseq's `cls_loss`
    weighs the sum over a GPU's copies instead, which makes its effect depend on the per-GPU batch:
    its 0.01 at 16 images x 16 copies per GPU is cls_weight 2.56 here, whatever the ranks."""


@dataclass
class TeacherConfig:
    decay: float = 0.999
    """EMA decay at step 0."""
    end_decay: float = 0.9999
    """EMA decay once the anneal ends."""
    anneal_steps: int = 0
    """Optimizer steps of the linear anneal from `decay` to `end_decay`; 0 = `train.steps`."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps of the whole run."""
    batch_size: int = 64
    """Global batch size in samples per optimizer step (all ranks, all accumulation steps)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.01
    """Learning rate at the end of the cosine decay, as a fraction of `lr`."""
    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, norms and 1-D parameters)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    clip_grad: float = 3.0
    """Gradient-norm clipping threshold; 0 = off."""
    log_every: int = 10
    """Steps between metrics lines."""
    save_every: int = 0
    """Steps between checkpoints; 0 = only at the end (and on SIGTERM or SIGINT, see `preemption`)."""
    save_every_minutes: float = 0.0
    """Pretraining: minutes between checkpoints by rank 0's clock, beside `save_every` (the clock
    restarts at every save); 0 = off."""
    keep_checkpoints: int = 2
    """Newest complete checkpoints kept on disk (the one `latest` names is never deleted)."""
    max_skipped_steps: int = 10
    """Steps in a row whose loss or gradient is not finite that are skipped (no update, no EMA)
    before the run stops, naming the last good checkpoint; 0 = stop at the first."""
    collapse_threshold: float = 0.01
    """Collapse watchdog: `target_var` or `target_sample_var` under this value counts as collapsed
    (healthy debug and default runs stay above 0.2); 0 = off."""
    collapse_window: int = 5
    """Logged steps in a row under `collapse_threshold` before the one warning (or the stop)."""
    stop_on_collapse: bool = False
    """Stop the run, rather than warn once, when the targets have collapsed."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class FinetuneConfig:
    """`d2v finetune`: the task head, its data budget and the recipe around the pretrained encoder."""

    task: str = ""
    """The task (`d2v_engine.tasks.TASKS`, or `custom`); set by `d2v finetune --task`."""
    labels: float = 0
    """Labelled training samples: a count (>= 1), a fraction of the task's set (< 1), or 0 = all."""
    label_seconds: float = 0
    """CTC: labelled audio in seconds, read in order until it is spent (600 = 10 min); 0 = all."""
    head: Literal["mean", "first"] = "mean"
    """Classification input: the mean over valid positions (then LayerNorm) or the first token
    (`<s>`, RoBERTa's dense-tanh head); CTC reads every frame."""
    head_dropout: float = 0.0
    """Dropout before the head's output layer."""
    layer_decay: float = 1.0
    """Layer-wise lr decay: block i of L trains at lr x layer_decay^(L - i), the embeddings at
    layer_decay^(L + 1), the head at lr; 1 = one lr for all."""
    label_smoothing: float = 0.0
    """Classification: label smoothing of the cross-entropy."""
    mixup: float = 0.0
    """Images: mixup alpha (Beta(alpha, alpha) mixing weights); 0 = off."""
    cutmix: float = 0.0
    """Images: cutmix alpha; 0 = off. With both on, each batch picks one at random (50/50)."""
    crop_scale: float = 1.0
    """Images: random-resized-crop smallest area fraction; 1 = no crop."""
    flip: bool = False
    """Images: random horizontal flips."""
    schedule: Literal["cosine", "poly", "tri_stage"] = "cosine"
    """Learning-rate shape after `train.warmup_steps`: cosine to `train.min_lr_ratio`, linear
    (polynomial, power 1) decay to 0, or fairseq's tri-stage (warm-up, hold, exponential decay)."""
    tri_stage: list[float] = field(default_factory=lambda: [0.1, 0.4, 0.5])
    """tri_stage: fractions of the steps spent warming up, holding and decaying."""
    final_lr_scale: float = 0.05
    """tri_stage: lr at the end, as a fraction of `train.lr`."""
    freeze_steps: int = 0
    """Updates during which only the head trains (the encoder is frozen, fairseq's
    `freeze_finetune_updates`)."""
    freeze_feature_extractor: bool = True
    """Audio: keep the CNN front-end frozen for the whole run."""
    mask_time_prob: float = 0.0
    """Audio: span masking of frames during fine-tuning (the model's mask embedding), as
    `mask.prob`; 0 = off."""
    mask_time_length: int = 10
    """Audio: frames per time-mask span."""
    mask_channel_prob: float = 0.0
    """Audio: probability of zeroing channel spans of the features; 0 = off."""
    mask_channel_length: int = 64
    """Audio: channels per channel-mask span."""
    eval_every: int = 0
    """Steps between test-set evaluations (the curve); 0 = only at the end."""
    eval_batch_size: int = 256
    """Samples per forward pass when evaluating."""
    test_limit: int = 0
    """Most test samples scored (the first ones); 0 = all."""


@dataclass
class DSConfig:
    zero_stage: int = 1
    """DeepSpeed ZeRO stage, 0-3."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision."""


@dataclass
class KernelsConfig:
    backend: Literal["auto", "reference", "triton", "cpp"] = "auto"
    """Implementation of the fused ops: auto picks the fastest available one."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config, metrics, TensorBoard, checkpoints, plots."""
    resume: bool = False
    """Continue from the newest checkpoint in `run.dir`."""
    init_from: str = ""
    """A `d2v export` file to start student and teacher from, at step 0, on any number of ranks."""


@dataclass
class Config:
    seed: int = 0
    """Seed of every random choice: initialisation, data order, masks, augmentation, dropout."""
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ds: DSConfig = field(default_factory=DSConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def modality(self) -> str:
        """`image`, `audio` or `text`, from the model's registry entry."""
        from d2v_engine.models.registry import get_spec

        return get_spec(self.model.name).modality

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------

def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def valid_keys() -> list[str]:
    """Every settable key, `section.key` or a top-level one such as `seed`."""
    keys = [f.name for f in dataclasses.fields(Config) if f.name not in _sections()]
    for name, cls in _sections().items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid sections are {', '.join(_sections())}."
    return UserError(f"unknown config key '{key}'{hint}")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it loses nothing."""
    origin = typing.get_origin(tp)
    bad = UserError(f"config key '{key}' expects {_describe(tp)}, got {value!r}.")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except UserError:
                pass
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _set(cfg: Config, key: str, value: Any) -> None:
    sections = _sections()
    head, _, tail = key.partition(".")
    if not tail:
        if head in sections or head not in {f.name for f in dataclasses.fields(Config)}:
            raise _unknown_key(key)
        setattr(cfg, head, _coerce(value, typing.get_type_hints(Config)[head], key))
        return
    if head not in sections:
        raise _unknown_key(key)
    hints = typing.get_type_hints(sections[head])
    if tail not in hints:
        raise _unknown_key(key)
    setattr(getattr(cfg, head), tail, _coerce(value, hints[tail], key))


def _flatten(tree: dict[str, Any], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if name in _sections():
            if not isinstance(value, dict):
                raise UserError(f"section '{name}' in {where} must be a mapping of keys, got {value!r}.")
            flat.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            flat[str(name)] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (key, value); the value is read as YAML (`3`, `1e-4`, `true`, `[1, 2]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"override '{text}' is not of the form section.key=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | dict | list[str | Path | dict] | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file(s) <- `section.key=value` overrides, validated.

    Args:
        path: a YAML file whose top level mirrors the sections of `Config`, or a list of them applied
            in order (`d2v finetune`: the run's config.yaml, then the fine-tuning recipe); a dict
            stands for a file's content (`Config.to_dict()` read back); None = defaults only.
        overrides: command-line items such as `train.steps=60`.
    Returns:
        The validated `Config`.
    Raises:
        UserError: unknown key, wrong type, bad value, missing or unreadable file.
    """
    cfg = Config()
    paths = [] if path is None else path if isinstance(path, list) else [path]
    for one in paths:
        tree, where = (one, "the config mapping") if isinstance(one, dict) else (_read_tree(Path(one)), str(one))
        for key, value in _flatten(tree, where).items():
            _set(cfg, key, value)
    for item in overrides:
        _set(cfg, *parse_override(item))
    validate(cfg)
    return cfg


def _read_tree(path: Path) -> dict[str, Any]:
    """A config file's mapping of sections."""
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist; pass one of the files in configs/.")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML ({str(err).splitlines()[0]}).") from None
    if not isinstance(tree, dict):
        raise UserError(f"config file '{path}' must hold a mapping of sections.")
    return tree


def validate(cfg: Config) -> None:
    """Cross-field checks and ranges; derived values are filled in here and nowhere else."""
    from d2v_engine.models.registry import MODEL_REGISTRY

    if cfg.model.name not in MODEL_REGISTRY:
        close = difflib.get_close_matches(cfg.model.name, list(MODEL_REGISTRY), n=1, cutoff=0.4)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(MODEL_REGISTRY)}."
        raise UserError(f"model.name '{cfg.model.name}' is not a registered model; {hint}")
    checks = [
        (cfg.train.steps > 0, "train.steps must be positive"),
        (cfg.train.batch_size > 0, "train.batch_size must be positive"),
        (cfg.train.grad_accum > 0, "train.grad_accum must be positive"),
        (cfg.train.batch_size % cfg.train.grad_accum == 0,
         "train.batch_size must be a multiple of train.grad_accum"),
        (cfg.train.lr > 0, "train.lr must be positive"),
        (cfg.train.log_every > 0, "train.log_every must be positive"),
        (cfg.train.save_every >= 0, "train.save_every must be 0 (only at the end) or positive"),
        (cfg.train.save_every_minutes >= 0, "train.save_every_minutes must be 0 (off) or positive"),
        (cfg.train.keep_checkpoints > 0, "train.keep_checkpoints must be positive"),
        (cfg.train.max_skipped_steps >= 0, "train.max_skipped_steps must be 0 (stop at the first) or positive"),
        (cfg.train.collapse_threshold >= 0, "train.collapse_threshold must be 0 (off) or positive"),
        (cfg.train.collapse_window > 0, "train.collapse_window must be positive"),
        (len(cfg.train.betas) == 2 and all(0 <= b < 1 for b in cfg.train.betas),
         "train.betas must be two numbers in [0, 1)"),
        (0 <= cfg.ds.zero_stage <= 3, "ds.zero_stage must be 0, 1, 2 or 3"),
        (0 < cfg.teacher.decay <= 1 and 0 < cfg.teacher.end_decay <= 1,
         "teacher.decay and teacher.end_decay must lie in (0, 1]"),
        (cfg.teacher.anneal_steps >= 0, "teacher.anneal_steps must be 0 (= train.steps) or positive"),
        (cfg.target.top_k > 0, "target.top_k must be positive"),
        (cfg.method.clones >= 1, "method.clones must be positive"),
        (cfg.method.version == 2 or cfg.method.clones == 1,
         "method.clones > 1 needs method.version=2 (data2vec 1.0 encodes one masked copy per sample)"),
        (cfg.loss.cls_weight >= 0, "loss.cls_weight must be 0 (off) or positive"),
        (cfg.method.version == 2 or cfg.loss.cls_weight == 0,
         "loss.cls_weight is a data2vec 2.0 loss; set method.version=2 or loss.cls_weight=0"),
        (cfg.mask.adjust >= 0, "mask.adjust must be 0 or positive"),
        (min(cfg.decoder.layers, cfg.decoder.dim, cfg.decoder.kernel, cfg.decoder.groups) > 0,
         "decoder.layers, decoder.dim, decoder.kernel and decoder.groups must be positive"),
        (cfg.decoder.dim % cfg.decoder.groups == 0, "decoder.dim must be a multiple of decoder.groups"),
        (cfg.decoder.projection_layers in (1, 2), "decoder.projection_layers must be 1 or 2"),
        (0 <= cfg.decoder.input_dropout < 1, "decoder.input_dropout must lie in [0, 1)"),
        (cfg.decoder.mask_noise_std >= 0, "decoder.mask_noise_std must be 0 or positive"),
        (cfg.loss.beta >= 0, "loss.beta must be 0 (squared error) or positive (smooth L1)"),
        (0 < cfg.mask.prob < 1, "mask.prob must lie in (0, 1)"),
        (cfg.mask.length > 0, "mask.length must be positive"),
        (cfg.mask.replace_prob + cfg.mask.random_prob <= 1,
         "mask.replace_prob + mask.random_prob must be at most 1"),
        (0 <= cfg.data.max_bad_fraction <= 1, "data.max_bad_fraction must lie in [0, 1]"),
        (cfg.data.num_workers >= 0, "data.num_workers must be 0 or positive"),
        (0 < cfg.data.crop_scale <= 1, "data.crop_scale must lie in (0, 1]"),
        (bool(cfg.data.path), "data.path is empty; point it at a folder of .tar shards (see `d2v prepare`)"),
        (bool(cfg.run.dir), "run.dir is empty; name a folder for the run"),
        (cfg.finetune.labels >= 0 and cfg.finetune.label_seconds >= 0,
         "finetune.labels and finetune.label_seconds must be 0 (all) or positive"),
        (cfg.finetune.layer_decay > 0, "finetune.layer_decay must be positive (1 = off)"),
        (0 <= cfg.finetune.label_smoothing < 1, "finetune.label_smoothing must lie in [0, 1)"),
        (min(cfg.finetune.mixup, cfg.finetune.cutmix) >= 0, "finetune.mixup and finetune.cutmix must be 0 (off) or positive"),
        (0 < cfg.finetune.crop_scale <= 1, "finetune.crop_scale must lie in (0, 1]"),
        (len(cfg.finetune.tri_stage) == 3 and all(f >= 0 for f in cfg.finetune.tri_stage)
         and abs(sum(cfg.finetune.tri_stage) - 1) < 1e-6, "finetune.tri_stage must be three fractions summing to 1"),
        (0 <= cfg.finetune.head_dropout < 1, "finetune.head_dropout must lie in [0, 1)"),
        (cfg.finetune.freeze_steps >= 0 and cfg.finetune.eval_every >= 0 and cfg.finetune.test_limit >= 0,
         "finetune.freeze_steps, finetune.eval_every and finetune.test_limit must be 0 or positive"),
        (0 <= cfg.finetune.mask_time_prob < 1 and 0 <= cfg.finetune.mask_channel_prob < 1,
         "finetune.mask_time_prob and finetune.mask_channel_prob must lie in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message + ".")
    depth = _depth(cfg.model.name)
    if cfg.target.top_k > depth:
        raise UserError(f"target.top_k={cfg.target.top_k} exceeds the {depth} blocks of model "
                        f"'{cfg.model.name}'; use at most {depth}.")
    if cfg.method.version == 2:
        _validate_v2(cfg)
    elif cfg.mask.inverse or cfg.mask.adjust:
        raise UserError("mask.inverse and mask.adjust shape data2vec 2.0 masks; set method.version=2 "
                        "or leave them at false and 0.")
    if cfg.teacher.anneal_steps == 0:
        cfg.teacher.anneal_steps = cfg.train.steps


def _validate_v2(cfg: Config) -> None:
    """The 2.0 checks that depend on the model: the decoder's groups divide the width, masks fit."""
    from d2v_engine.models.registry import get_spec

    spec = get_spec(cfg.model.name)
    if spec.transformer.dim % cfg.decoder.groups:
        raise UserError(f"decoder.groups={cfg.decoder.groups} does not divide the width "
                        f"{spec.transformer.dim} of model '{cfg.model.name}'; choose a divisor.")
    if cfg.mask.inverse and spec.modality != "image":
        raise UserError("mask.inverse (keep blocks rather than mask them) is for images; set it to false.")
    if spec.modality == "image" and spec.rel_pos_bias == "layer":
        raise UserError(f"model '{cfg.model.name}' has a relative position bias per block, which the 2.0 "
                        f"student (visible patches only) cannot gather; use a shared bias or none.")


def _depth(name: str) -> int:
    from d2v_engine.models.registry import get_spec

    return get_spec(name).transformer.depth


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, loadable again by `load_config`."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
