"""`d2v finetune`: a run's pretrained encoder (or the same shape at random init) fine-tuned on a task.

    deepspeed [--num_gpus N] d2v_engine/finetune.py --run DIR --task TASK [k=v ...]   # several ranks
    d2v finetune --run DIR --task TASK [--labels N] [--compare random-init] [k=v ...]  # one process
    d2v finetune --hf-dir HF --out DIR --task TASK [...]     # a Hugging Face Data2Vec folder's encoder

The config is the run's `config.yaml`, then the recipe (`configs/finetune_<modality>.yaml`, for CTC
`finetune_audio_ctc.yaml`, or `--config`), then the overrides; it shares the pretraining sections (`train`, `ds`, `model`
dropouts) and adds `finetune`. With `--hf-dir` the first layer comes from the folder instead
(`hf.start`: the registry model of its shape, its preprocessing) and `DIR` below is `--out`. The
loop of one run is `finetune_loop.Finetuner`.

A fine-tuning run lives in `DIR/finetune/TASK/` (and `.../random_init/` for the comparison):
config.yaml, metrics.jsonl, test.jsonl (the test metric every `finetune.eval_every` steps),
tensorboard/, checkpoints/ (resumable with run.resume=true) and `model.safetensors` (encoder and
head, `finetune_loop.FINETUNE_FORMAT`). `DIR/finetune/finetune.json` gathers the figures of every task run.
SIGTERM or SIGINT stops a run after the step in progress with its checkpoint (exit status 3, as
pretraining's `preemption`); the same command with run.resume=true continues it. A fresh run in a
used folder first removes the earlier run's records and checkpoints (`finetune_loop.OWN_FILES`).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from d2v_engine import distributed
from d2v_engine.config import Config, load_config
from d2v_engine.errors import UserError
from d2v_engine.finetune_loop import Finetuner
from d2v_engine.preemption import PREEMPTED

if TYPE_CHECKING:
    from d2v_engine.models.spec import ModelSpec

RECIPES = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class FinetuneOptions:
    """What `run_finetune` fine-tunes."""

    task: str
    """A task of `finetune_data.FT_TASKS`, or `custom` with train/test."""
    config: str | None = None
    """The recipe; None = `configs/finetune_<modality>.yaml`."""
    overrides: list[str] = field(default_factory=list)
    """`section.key=value` items, after the recipe."""
    random_init: bool = False
    """Fine-tune the run's shape from its initial weights (same seed) instead of the trained ones."""
    compare: bool = False
    """Also fine-tune the random-init twin, in the same command (`--compare random-init`)."""
    data_root: str | None = None
    """Folder holding the prepared data sets (as `d2v eval --data`)."""
    train: str | None = None
    """`custom`: labelled (or transcribed) training shards."""
    test: str | None = None
    """`custom`: test shards."""
    ctc: bool = False
    """`custom`: transcripts (`.txt`) and a CTC head rather than `.cls` classes."""
    weights: str = "student"
    """Which trained weights start the encoder: `student` or `teacher`."""
    hf_dir: str | None = None
    """Start from this Hugging Face Data2Vec folder rather than a run (`hf.start`)."""
    out: str | None = None
    """With `hf_dir`: the folder that plays the run directory's part (`OUT/finetune/...`)."""


@dataclass
class Start:
    """What a fine-tuning starts from: a run's checkpoint (`run_start`) or a Hugging Face folder (`hf.start`)."""

    base: Path | dict
    """The first config layer: the run's `config.yaml`, or the mapping `hf.start.hf_layer` derives."""
    cfg: Config
    """That layer alone, resolved: the modality, data root and model spec come from it."""
    spec: ModelSpec
    """The encoder's shape."""
    student: dict[str, torch.Tensor]
    """The encoder's weights."""
    teacher: dict[str, torch.Tensor] | None
    """The run's EMA weights over the student's (`--weights teacher`); None for a Hugging Face model."""
    out: Path
    """Where `finetune/` is written: the run directory, or `--out`."""
    what: str
    """How the messages name the source: `the run`, `the Hugging Face model in 'HF'`."""
    record: dict[str, Any] = field(default_factory=dict)
    """Fields of the source in `finetune.json` (the checkpoint tag, or the folder and model name)."""


def run_start(run_dir: str | Path) -> Start:
    """A run's newest checkpoint as the start of a fine-tuning."""
    from d2v_engine.checkpoint import load_run_config, load_run_weights, run_spec

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    weights = load_run_weights(run_dir)
    return Start(base=run_dir / "config.yaml", cfg=cfg, spec=run_spec(cfg, weights.student), student=weights.student,
                 teacher=weights.teacher, out=run_dir, what="the run", record={"checkpoint": weights.tag})


def load_start(run_dir: str | Path | None, opts: FinetuneOptions, echo=tqdm.write) -> Start:
    """The start `--run` or `--hf-dir` names (exactly one of them).

    Raises:
        UserError: both or neither, `--out` without `--hf-dir` or the reverse, teacher weights of
            a Hugging Face model, or what loading the source refuses.
    """
    if run_dir is not None and opts.hf_dir is not None:
        raise UserError("--run and --hf-dir both name the encoder to fine-tune; pass one of them.")
    if opts.hf_dir is None:
        if run_dir is None:
            raise UserError("pass --run DIR (a pretraining run) or --hf-dir DIR (a Hugging Face Data2Vec folder).")
        if opts.out is not None:
            raise UserError("--out places the outputs of --hf-dir; a run's fine-tuning goes to RUN/finetune "
                            "(run.dir=... moves one task's folder).")
        return run_start(run_dir)
    if opts.out is None:
        raise UserError("--hf-dir needs --out DIR, the folder for the outputs (DIR/finetune/TASK).")
    if opts.weights == "teacher":
        raise UserError("--weights teacher picks a run's EMA weights; a Hugging Face folder holds one encoder.")
    from d2v_engine.hf.start import hf_start

    return hf_start(opts.hf_dir, opts.out, opts.overrides, echo)


def finetune_spec(start: Start, cfg: Config):
    """The start's model shape with the fine-tuning config's dropouts (the recipe's drop path,
    dropout, layerdrop and the overrides'), which the start's own config does not hold."""
    from d2v_engine.models.registry import with_model_config

    return with_model_config(start.spec, cfg.model)


# ------------------------------------------------------------------------------ the command
def recipe_path(modality: str, kind: str, opts: FinetuneOptions) -> Path:
    """`--config`, else `configs/finetune_<modality>_ctc.yaml` for CTC (where it exists), else
    `configs/finetune_<modality>.yaml`."""
    if opts.config:
        return Path(opts.config)
    ctc = RECIPES / f"finetune_{modality}_ctc.yaml"
    return ctc if kind == "ctc" and ctc.is_file() else RECIPES / f"finetune_{modality}.yaml"


def finetune_config(base: Path | dict, modality: str, opts: FinetuneOptions, out: Path,
                    kind: str = "classify") -> Config:
    """The config of one fine-tuning run: `base` (the start's layer), the recipe of the modality and
    the task's `kind`, the overrides."""
    recipe = recipe_path(modality, kind, opts)
    if not recipe.is_file():
        raise UserError(f"no fine-tuning recipe at '{recipe}'; pass --config FT.yaml.")
    cfg = load_config([base, recipe],
                      [f"finetune.task={opts.task}", f"run.dir={out}", *opts.overrides])
    if Path(cfg.run.dir) != out and out.name == "random_init":   # a run.dir override: the twin goes below it
        cfg.run.dir = str(Path(cfg.run.dir) / "random_init")
    return cfg


def run_finetune(run_dir: str | Path | None, opts: FinetuneOptions, echo=tqdm.write) -> dict[str, Any] | None:
    """Fine-tune (and with `compare`, also from random init) and write `finetune.json`.

    Args:
        run_dir: the pretraining run, or None with `opts.hf_dir` (`load_start`).
    Returns:
        The task's record: metric, pretrained, random_init, labels, steps, wall_s, (scores), and
        the source (`checkpoint`, or `hf_dir` and `model`); None when SIGTERM or SIGINT stopped a
        run after its checkpoint (the same command with run.resume=true continues it).
    """
    from d2v_engine.ctc import CharVocab
    from d2v_engine.eval import EvalOptions, data_root
    from d2v_engine.finetune_data import FT_TASKS, custom_task, load_split, remap_classes

    start = load_start(run_dir, opts, echo)
    modality = start.cfg.modality
    if opts.task == "custom":
        if not (opts.train and opts.test):
            raise UserError("task 'custom' needs --train and --test shard folders.")
        task = custom_task(modality, opts.train, opts.test, "ctc" if opts.ctc else "classify")
    elif opts.task not in FT_TASKS:
        raise UserError(f"unknown task '{opts.task}'; choose from {', '.join(FT_TASKS)} or custom.")
    else:
        task = FT_TASKS[opts.task]
    if task.modality != modality:
        article = "a" if modality == "text" else "an"
        raise UserError(f"task '{opts.task}' fine-tunes {task.modality} models but {start.what} is "
                        f"{article} {modality} model.")
    rank, world = distributed.init_distributed()
    base = start.out / "finetune" / opts.task
    inits = [("random_init", None)] if opts.random_init else [("pretrained", start)]
    if opts.compare and not opts.random_init:
        inits.append(("random_init", None))
    cfg0 = finetune_config(start.base, modality, opts, base, task.kind)
    spec = finetune_spec(start, cfg0)
    root = data_root(start.cfg, EvalOptions(data_root=opts.data_root))
    vocab = CharVocab() if task.kind == "ctc" else None
    began = time.perf_counter()
    train = load_split(opts.task, task, cfg0, spec, root, "train", vocab, echo)
    test = load_split(opts.task, task, cfg0, spec, root, "test", vocab, echo)
    classes = remap_classes(train, test, opts.task, echo) if task.kind == "classify" else None
    echo(f"finetune {opts.task}: {len(train)} labelled training samples, {len(test)} test samples "
         f"(read in {time.perf_counter() - began:.0f} s)")
    record: dict[str, Any] = {"metric": task.metric, "labels": len(train), "n_test": len(test)}
    curves, folders = {}, []
    for name, init in inits:
        out = base if name == "pretrained" or opts.random_init else base / "random_init"
        cfg = finetune_config(start.base, modality, opts, out, task.kind)
        state = None
        if init is not None:
            state = dict(init.student)
            if opts.weights == "teacher":
                state.update(init.teacher)
        t0 = time.perf_counter()
        tuner = Finetuner(cfg, spec, state, task, train, test, classes, vocab, rank, world, echo)
        stopped = tuner.train()
        tuner.close()
        if stopped:
            return None
        folders.append(Path(cfg.run.dir))
        scores = tuner.curve[-1]
        record[name] = scores[task.metric]
        record[f"{name}_scores"] = {k: v for k, v in scores.items() if k not in ("step", "seconds")}
        record[f"{name}_wall_s"] = round(time.perf_counter() - t0, 1)
        curves[name] = tuner.curve
        record.update(steps=cfg.train.steps, **start.record)
    record["wall_s"] = round(time.perf_counter() - began, 1)
    if rank == 0:
        write_results(start.out, opts.task, record, curves, folders[0] / "curve.png", echo)
    return record


def write_results(run_dir: Path, task: str, record: dict, curves: dict, plot: Path, echo) -> None:
    """Merge the task's record into `finetune.json`, print the table, draw the curve into `plot`
    (the first run's folder: `RUN/finetune/TASK/curve.png` unless run.dir moved it)."""
    path = run_dir / "finetune" / "finetune.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[task] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    echo(format_table(results, f"fine-tuning of {run_dir}"))
    plot_curves(curves, record["metric"], plot, task)


def format_table(results: dict[str, dict], title: str) -> str:
    head = f"{'task':<20}{'metric':>9}{'labels':>8}{'steps':>7}  {'pretrained':>10} {'random init':>11}{'wall s':>8}"
    lines = [title, head]
    for name, r in results.items():
        pre = f"{r['pretrained']:.4f}" if "pretrained" in r else "-"
        rnd = f"{r['random_init']:.4f}" if "random_init" in r else "-"
        lines.append(f"{name:<20}{r['metric']:>9}{r['labels']:>8}{r['steps']:>7}  {pre:>10} {rnd:>11}"
                     f"{r['wall_s']:>8.0f}")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict]], metric: str, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, curve in curves.items():
        ax.plot([r["step"] for r in curve], [r[metric] for r in curve], marker="o", label=name.replace("_", " "))
    ax.set(xlabel="step", ylabel=f"test {metric}", title=f"fine-tuning: {task}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


_SECONDS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}


def label_budget(text: str) -> tuple[str, float]:
    """`--labels`: ("labels", count or fraction), or ("label_seconds", s) for a duration like 10min or 1h."""
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if value <= 0 or (unit and unit not in _SECONDS):
        raise argparse.ArgumentTypeError(f"'{text}' is not a label budget: pass a count (600), a fraction "
                                         "(0.01) or an amount of audio (10min, 1h, 90s)")
    return ("label_seconds", value * _SECONDS[unit]) if unit else ("labels", value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `d2v finetune` and of this script."""
    p.add_argument("--run", dest="run_dir", default=None, metavar="DIR", help="the pretraining run directory")
    p.add_argument("--hf-dir", default=None, metavar="HF",
                   help="fine-tune the encoder of this Hugging Face Data2Vec folder instead (needs --out)")
    p.add_argument("--out", default=None, metavar="DIR", help="--hf-dir: write DIR/finetune/TASK and "
                   "DIR/finetune/finetune.json")
    p.add_argument("--task", required=True, help="fashion-mnist, spoken-digits, spoken-digits-5db, "
                   "spoken-words-ctc, wordnet, or custom")
    p.add_argument("--labels", type=label_budget, default=None, metavar="N|FRACTION|DURATION",
                   help="labelled training samples: a count (600), a fraction (0.01), or for CTC an amount "
                        "of audio (10min, 1h, 90s: finetune.label_seconds)")
    p.add_argument("--config", default=None, metavar="FT.yaml", help="the recipe (default: configs/finetune_<modality>.yaml; CTC: finetune_audio_ctc.yaml)")
    p.add_argument("--random-init", action="store_true", help="fine-tune the run's initial weights instead")
    p.add_argument("--compare", choices=("random-init",), default=None,
                   help="also fine-tune from random init in the same command")
    p.add_argument("--weights", choices=("student", "teacher"), default="student")
    p.add_argument("--data", default=None, metavar="ROOT", help="folder with the prepared data sets")
    p.add_argument("--train", default=None, metavar="DIR", help="custom: labelled training shards")
    p.add_argument("--test", default=None, metavar="DIR", help="custom: test shards")
    p.add_argument("--ctc", action="store_true", help="custom: .txt transcripts and a CTC head")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def options(args: argparse.Namespace) -> FinetuneOptions:
    overrides = list(args.overrides)
    if args.labels is not None:
        key, value = args.labels
        overrides.insert(0, f"finetune.{key}={value:g}")
    return FinetuneOptions(task=args.task, config=args.config, overrides=overrides,
                           random_init=args.random_init, compare=args.compare == "random-init",
                           data_root=args.data, train=args.train, test=args.test, ctc=args.ctc,
                           weights=args.weights, hf_dir=args.hf_dir, out=args.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        record = run_finetune(args.run_dir, options(args))
    except UserError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2
    return PREEMPTED if record is None else 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
