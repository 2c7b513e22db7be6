"""`d2v eval`: probe a run's frozen encoder beside the same encoder at random initialisation.

For every task the run's encoder (the student by default) and an encoder of the same shape built with
the run's seed (the initialisation the run started from) encode the probe's training and test samples
(`probes.py`: deterministic inputs, mean over valid positions); then a k-NN classifier (k = 20, cosine)
and a logistic-regression probe on standardised features are fitted on the training features and
scored on the test features.

Tasks (folders under the data root, `d2v prepare` layout):
    fashion-mnist       image  the first 10k of fashion-mnist/train -> the 10k of fashion-mnist/test
    spoken-digits       audio  spoken-words/probe_train -> probe_test (voices held out of pretraining)
    spoken-digits-5db   audio  the same with white noise at 5 dB SNR in both sets
    wordnet             text   text-corpus/probe_train -> probe_test (gloss -> lexicographer class)
    custom              any    --probe-train / --probe-test shard folders of the run's modality
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2v_engine import probes
from d2v_engine.checkpoint import Weights, build_run_encoder, load_run_config, load_run_weights
from d2v_engine.config import Config
from d2v_engine.data.shards import list_shards
from d2v_engine.data.tarindex import build_index
from d2v_engine.data.webdataset import find_tokenizer
from d2v_engine.errors import UserError


@dataclass(frozen=True)
class Task:
    modality: str
    """The modality whose runs the task probes."""
    train: str
    """Probe training shards, relative to the data root (or a path, for `custom`)."""
    test: str
    """Probe test shards, likewise."""
    prepare: str = ""
    """The `d2v prepare` data set that provides the shards."""
    train_limit: int | None = None
    """Most probe training samples by default (the first ones); None = all."""
    snr_db: float | None = None
    """Audio: white noise at this SNR in both sets; None = clean."""


TASKS: dict[str, Task] = {
    "fashion-mnist": Task("image", "fashion-mnist/train", "fashion-mnist/test", "fashion-mnist", 10000),
    "spoken-digits": Task("audio", "spoken-words/probe_train", "spoken-words/probe_test", "spoken-words"),
    "spoken-digits-5db": Task("audio", "spoken-words/probe_train", "spoken-words/probe_test",
                              "spoken-words", snr_db=5.0),
    "wordnet": Task("text", "text-corpus/probe_train", "text-corpus/probe_test", "text-corpus"),
}


@dataclass
class EvalOptions:
    """What `evaluate` probes and how much of it."""

    tasks: list[str] = dataclasses.field(default_factory=list)
    """Task names; empty = every task of the run's modality (or `custom` with probe_train/test)."""
    data_root: str | None = None
    """Folder holding the prepared data sets; None = two levels above the run's data.path, else `data`."""
    probe_train: str | None = None
    """Custom task: labelled shards to fit the probes on."""
    probe_test: str | None = None
    """Custom task: labelled shards to score them on."""
    limit_train: int | None = None
    """Most probe training samples (overrides the task's default)."""
    limit_test: int | None = None
    """Most probe test samples."""
    batch_size: int = 256
    """Samples per forward pass."""
    weights: Weights = "student"
    """Which trained weights to probe: `student` or `teacher` (the EMA weights)."""
    tag: str | None = None
    """Checkpoint tag; None = the newest."""
    k: int = 20
    """Neighbours of the k-NN probe."""
    raw: bool = False
    """Also probe the raw input (images: normalised pixels) as a baseline."""


def select_tasks(cfg: Config, opts: EvalOptions) -> dict[str, Task]:
    """The tasks to run, checked against the run's modality."""
    modality = cfg.modality
    if (opts.probe_train is None) != (opts.probe_test is None):
        raise UserError("--probe-train and --probe-test go together; pass both shard folders.")
    custom = {}
    if opts.probe_train is not None:
        custom["custom"] = Task(modality, opts.probe_train, opts.probe_test)
    names = opts.tasks or ([] if custom else [n for n, t in TASKS.items() if t.modality == modality])
    chosen = {}
    for name in names:
        if name not in TASKS:
            raise UserError(f"unknown task '{name}'; choose from {', '.join(TASKS)}.")
        if TASKS[name].modality != modality:
            raise UserError(f"task '{name}' probes {TASKS[name].modality} models but the run trained a "
                            f"{modality} model; pick one of its modality or pass --probe-train/--probe-test.")
        chosen[name] = TASKS[name]
    return {**chosen, **custom}


def data_root(cfg: Config, opts: EvalOptions) -> Path:
    """--data, else the folder two levels above the run's data.path (`ROOT/<set>/train`), else `data`."""
    if opts.data_root is not None:
        return Path(opts.data_root)
    guess = Path(cfg.data.path).parent.parent
    return guess if guess.is_dir() and str(guess) not in ("", ".") else Path("data")


def read_labelled(folder: Path, limit: int | None, task: str, prepare: str) -> tuple[list[dict], np.ndarray]:
    """The first `limit` samples of a shard folder that carry a `.cls` label.

    Returns:
        (raw samples: extension -> bytes, int64 [N] labels).
    """
    shards = list_shards(folder)
    if not shards:
        hint = f"run `d2v prepare {prepare} --out <root>` or pass --data" if prepare else "check the path"
        raise UserError(f"task '{task}' needs labelled shards in '{folder}', which holds none; {hint}.")
    index = build_index(shards)
    raws, labels = [], []
    for i in range(len(index)):
        if limit is not None and len(raws) >= limit:
            break
        raw = index.read(i)
        if "cls" in raw:
            try:
                labels.append(int(raw["cls"].decode().strip()))
            except (UnicodeDecodeError, ValueError):
                raise UserError(f"task '{task}': sample '{index.keys[i]}' in '{folder}' has a .cls that is "
                                f"not an integer class id; write labels as integers.") from None
            raws.append(raw)
    if len(set(labels)) < 2:
        raise UserError(f"task '{task}': the shards in '{folder}' hold {len(set(labels))} labelled "
                        f"class(es) in the samples read; a probe needs at least two (.cls files).")
    return raws, np.asarray(labels, dtype=np.int64)


def build_inputs(cfg: Config, spec, task: Task):
    """The eval-input builder of the run's modality (`probes.ImageInputs` / `AudioInputs` / `TextInputs`)."""
    if spec.modality == "image":
        return probes.ImageInputs(cfg.data.image_size or spec.image_size, cfg.data.mean, cfg.data.std)
    if spec.modality == "audio":
        return probes.AudioInputs(cfg.data.sample_rate, cfg.data.max_sample_size, task.snr_db, cfg.seed)
    shards = list_shards(cfg.data.path) or [Path(cfg.data.path) / "shard.tar"]
    tokenizer = find_tokenizer(cfg, shards)
    inputs = probes.TextInputs(tokenizer, min(cfg.data.max_tokens, spec.max_positions))
    if inputs.encoder.vocab_size != spec.vocab_size:
        raise UserError(f"tokenizer '{tokenizer}' has {inputs.encoder.vocab_size} entries but the run's "
                        f"model was trained with {spec.vocab_size}; set data.tokenizer to the run's tokenizer.")
    return inputs


def _decode(inputs, raws: list[dict], task: str) -> list:
    try:
        return [inputs.decode(raw, i) for i, raw in enumerate(raws)]
    except Exception as err:  # one undecodable probe sample makes every figure suspect: stop
        raise UserError(f"task '{task}': a probe sample cannot be decoded ({type(err).__name__}: {err}); "
                        f"rebuild its shards.") from None


def task_features(name: str, task: Task, encoders: dict, cfg: Config, root: Path, opts: EvalOptions
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Features of a task's probe training and test samples under every encoder, in one pass each.

    Args:
        name: the task's name (`custom` reads its paths as given, the others under `root`).
        task: what to read; encoders: name -> encoder (any number, all of the run's modality).
        cfg: the run's config (input size, normalisation, tokenizer); root: the data root.
        opts: limits, batch size, `raw` (images: normalised pixels as one more feature set, `raw_input`).
    Returns:
        (train features name -> float32 [N, C], train labels int64 [N], test features name -> [M, C],
        test labels [M]), labels renumbered 0..K-1 over both sets.
    """
    spec = next(iter(encoders.values())).spec
    inputs = build_inputs(cfg, spec, task)
    # Raw pixels as one more "encoder": the baseline a learned image feature should beat.
    extra = {"raw_input": lambda b: b["images"].flatten(1)} if opts.raw and spec.modality == "image" else None
    limit_train = opts.limit_train if opts.limit_train is not None else task.train_limit
    device = next(next(iter(encoders.values())).parameters()).device
    sets = {}
    for split, path, limit in (("train", task.train, limit_train), ("test", task.test, opts.limit_test)):
        folder = Path(path) if name == "custom" else root / path
        raws, labels = read_labelled(folder, limit, name, task.prepare)
        feats = probes.extract(encoders, _decode(inputs, raws, name), inputs.collate, opts.batch_size,
                               extra, device=device)
        sets[split] = (feats, labels)
    (train, train_y), (test, test_y) = sets["train"], sets["test"]
    # Class ids may be any integers: number them 0..K-1 for the probes.
    classes = np.unique(np.concatenate([train_y, test_y]))
    return train, np.searchsorted(classes, train_y), test, np.searchsorted(classes, test_y)


def probe_scores(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray,
                 k: int) -> dict[str, float]:
    """k-NN and linear-probe accuracy of one feature set.

    Args:
        train: [N, C] features, train_y: [N] labels; test: [M, C], test_y: [M]; k: k-NN neighbours.
    Returns:
        {"knn_acc", "linear_acc"}.
    """
    return {"knn_acc": probes.knn_accuracy(train, train_y, test, test_y, k=k),
            "linear_acc": probes.linear_accuracy(train, train_y, test, test_y)}


def run_task(name: str, task: Task, encoders: dict, cfg: Config, root: Path, opts: EvalOptions) -> dict:
    """Features and probes of one task for the trained and the random-init encoder.

    Returns:
        {"knn_acc", "linear_acc", "random_init": {...}, ("raw_input": {...}), "n_train", "n_test",
        "classes", "seconds"}.
    """
    start = time.perf_counter()
    train, train_y, test, test_y = task_features(name, task, encoders, cfg, root, opts)
    scores = {key: probe_scores(train[key], train_y, test[key], test_y, opts.k) for key in train}
    result: dict[str, Any] = {**scores["trained"], "random_init": scores["random"]}
    if "raw_input" in scores:
        result["raw_input"] = scores["raw_input"]
    result.update(n_train=len(train_y), n_test=len(test_y), classes=int(len(np.unique(train_y))),
                  seconds=round(time.perf_counter() - start, 1))
    return result


def evaluate(run_dir: str | Path, opts: EvalOptions, echo=print) -> dict[str, dict]:
    """Probe a run's encoder and its random-init twin on the selected tasks.

    Args:
        run_dir: the run directory (config.yaml + checkpoints/).
        opts: tasks, data, limits, weights.
        echo: where progress lines go.
    Returns:
        task -> {"knn_acc", "linear_acc", "random_init": {"knn_acc", "linear_acc"}, "n_train", "n_test",
        "classes", "seconds", "checkpoint", "step", "weights"}.
    """
    cfg = load_run_config(run_dir)
    tasks = select_tasks(cfg, opts)
    weights = load_run_weights(run_dir, opts.tag)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoders = {"trained": build_run_encoder(cfg, weights, opts.weights).to(device),
                "random": build_run_encoder(cfg, weights, "random").to(device)}
    root = data_root(cfg, opts)
    results = {}
    for name, task in tasks.items():
        echo(f"eval: {name} ...")
        results[name] = run_task(name, task, encoders, cfg, root, opts)
        results[name].update(checkpoint=weights.tag, step=weights.step, weights=opts.weights)
    return results


def format_table(results: dict[str, dict], title: str) -> str:
    """The results as a fixed-width table, pretrained beside random init."""
    has_raw = any("raw_input" in r for r in results.values())
    head = f"{'task':<20}{'train':>7}{'test':>7}  {'k-NN':>6} {'random':>7}  {'linear':>6} {'random':>7}"
    head += f"  {'raw k-NN':>8} {'raw lin':>7}" if has_raw else ""
    lines = [title, head]
    for name, r in results.items():
        rnd = r["random_init"]
        line = (f"{name:<20}{r['n_train']:>7}{r['n_test']:>7}  {r['knn_acc']:>6.3f} {rnd['knn_acc']:>7.3f}"
                f"  {r['linear_acc']:>6.3f} {rnd['linear_acc']:>7.3f}")
        if "raw_input" in r:
            line += f"  {r['raw_input']['knn_acc']:>8.3f} {r['raw_input']['linear_acc']:>7.3f}"
        lines.append(line)
    return "\n".join(lines)


def plot_results(results: dict[str, dict], path: Path) -> Path:
    """Grouped bars per task: k-NN and linear accuracy, pretrained beside random init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(names), 3.6))
    bars = [("k-NN", "knn_acc", False), ("k-NN random init", "knn_acc", True),
            ("linear", "linear_acc", False), ("linear random init", "linear_acc", True)]
    for i, (label, key, rnd) in enumerate(bars):
        values = [results[n]["random_init"][key] if rnd else results[n][key] for n in names]
        ax.bar(x + (i - 1.5) * 0.2, values, 0.2, label=label, alpha=0.5 if rnd else 1.0,
               color=f"C{i // 2}")
    ax.set(xticks=x, xticklabels=names, ylabel="accuracy", ylim=(0, 1), title="frozen-feature probes")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_eval(run_dir: str | Path, opts: EvalOptions, json_path: str | None = None, echo=print) -> dict:
    """`d2v eval`: evaluate, print the table, write `eval.json` and `plots/eval.png` into the run.

    Args:
        run_dir: the run directory; opts: tasks, data, limits, weights.
        json_path: another file to write the JSON to, or None.
        echo: where the table goes.
    Returns:
        What `evaluate` returns.
    """
    results = evaluate(run_dir, opts, echo=echo)
    first = next(iter(results.values()), {})
    title = (f"eval of {run_dir} (checkpoint {first.get('checkpoint')}, {opts.weights} weights; "
             f"k-NN k={opts.k} cosine, linear = logistic regression on standardised features)")
    echo(format_table(results, title))
    text = json.dumps(results, indent=2) + "\n"
    # The run keeps its latest figures beside its metrics; --json writes a copy where asked.
    (Path(run_dir) / "eval.json").write_text(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text)
    if results:
        plot_results(results, Path(run_dir) / "plots" / "eval.png")
    return results
