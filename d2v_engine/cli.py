"""The `d2v` command: one subcommand per task (`prepare`, `shards`, `eval`, `profile`, `export`, ...).

Each subcommand is a pair: `_add_<name>(subparsers)` declares its arguments, `_run_<name>(args)` does
the work and returns the exit status. `main()` turns a `UserError` into one line on stderr and exit
status 2, the same contract as `pretrain.py`.
"""
from __future__ import annotations

import argparse
import sys

from d2v_engine.errors import UserError


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_prepare(subparsers) -> None:
    from d2v_engine.data.prepare import DATASETS

    p = subparsers.add_parser("prepare", help="build an offline data set as WebDataset shards",
                              description="Build one of the offline data sets (see DATASETS.md) as "
                                          "WebDataset shards under OUT/<name>/. Does nothing when a "
                                          "complete copy built with the same options is there.")
    p.add_argument("name", choices=DATASETS, help="which data set")
    p.add_argument("--out", default="data", help="parent folder (default: data)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="at most this many samples per split (small sets for tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and shuffles")
    p.add_argument("--shard-size", type=_positive, default=5000, help="samples per shard")
    p.add_argument("--workers", type=int, default=0,
                   help="processes for speech synthesis (default: one per CPU)")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args) -> int:
    from d2v_engine.data.prepare import PrepareOptions, prepare

    opts = PrepareOptions(limit=args.limit, seed=args.seed, shard_size=args.shard_size,
                          workers=args.workers)
    prepare(args.name, args.out, opts)
    return 0


def _add_shards(subparsers) -> None:
    p = subparsers.add_parser(
        "shards", help="write WebDataset shards of your own image, audio or text files",
        description="Write a folder of your own files as shuffled WebDataset shards (.tar), with the "
                    ".idx files DALI's webdataset reader takes and a manifest.json with the counts. "
                    "Images in sub-folders of --src get the sub-folder's name as their class; files "
                    "that cannot be read are skipped and listed in the manifest.")
    p.add_argument("--modality", required=True, choices=("image", "audio", "text"))
    p.add_argument("--src", required=True, metavar="DIR",
                   help="image files (any format PIL reads), audio files (wav/flac/ogg/mp3/...), or "
                        "text files (.txt: a sample per line; .jsonl: a sample per JSON line)")
    p.add_argument("--out", required=True, metavar="DIR", help="the shard folder to create")
    p.add_argument("--shard-size", type=_positive, default=5000, metavar="N", help="samples per shard")
    p.add_argument("--max-shard-mb", type=_positive, default=1000, metavar="MB",
                   help="most payload megabytes per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    p.add_argument("--text-per-file", action="store_true", help="text: one sample per .txt file")
    p.add_argument("--text-field", default="text", help="JSON lines: the field with the text")
    p.add_argument("--label-field", default="label", help="JSON lines: the field with the label")
    p.add_argument("--tokenizer-vocab", type=int, default=0, metavar="N",
                   help="text: also train a byte-level BPE of N entries into OUT/tokenizer.json")
    p.set_defaults(run=_run_shards)


def _run_shards(args) -> int:
    from d2v_engine.data.build_shards import ShardOptions, write_shards

    opts = ShardOptions(shard_size=args.shard_size, max_bytes=args.max_shard_mb * 1e6, seed=args.seed,
                        shuffle=not args.no_shuffle, text_per_file=args.text_per_file,
                        text_field=args.text_field, label_field=args.label_field,
                        tokenizer_vocab=args.tokenizer_vocab)
    manifest = write_shards(args.modality, args.src, args.out, opts)
    skipped = manifest["skipped"]["count"]
    print(f"d2v shards: {manifest['total']} {args.modality} samples in {len(manifest['shards'])} "
          f"shard(s) -> {args.out}" + (f"; {skipped} file(s) skipped (listed in manifest.json)"
                                       if skipped else ""))
    return 0


def _add_eval(subparsers) -> None:
    from d2v_engine.eval import TASKS

    p = subparsers.add_parser(
        "eval", help="probe a run's frozen encoder beside a random-init one",
        description="k-NN (cosine) and linear-probe accuracy of a run's frozen, mean-pooled encoder "
                    "features, and of an encoder of the same shape at the run's random "
                    "initialisation. Writes eval.json and plots/eval.png into the run.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", dest="run_dir", metavar="DIR", help="the run directory (its run.dir)")
    where.add_argument("--config", help="a config whose run.dir (after the overrides) is the run")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="with --config: overrides that resolve run.dir")
    p.add_argument("--task", action="append", choices=TASKS, dest="tasks", default=[],
                   help="a task (repeatable; default: every task of the run's modality)")
    p.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    p.add_argument("--probe-train", metavar="SHARDS",
                   help="custom task: labelled shards (.cls) to fit the probes on")
    p.add_argument("--probe-test", metavar="SHARDS", help="custom task: labelled shards to score the probes on")
    p.add_argument("--data", dest="data_root", metavar="DIR",
                   help="folder of the prepared data sets (default: from the run's data.path, else data)")
    p.add_argument("--limit-train", type=_positive, metavar="N",
                   help="at most this many probe training samples (fashion-mnist default: 10000)")
    p.add_argument("--limit-test", type=_positive, metavar="N", help="at most this many probe test samples")
    p.add_argument("--batch-size", type=_positive, default=256, metavar="N", help="samples per forward pass")
    p.add_argument("--weights", choices=("student", "teacher"), default="student",
                   help="which trained weights to probe (default: student)")
    p.add_argument("--tag", help="checkpoint tag (default: the newest)")
    p.add_argument("--k", type=_positive, default=20, metavar="N",
                   help="neighbours of the k-NN probe (default 20)")
    p.add_argument("--raw", action="store_true", help="also probe the raw input (images) as a baseline")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from d2v_engine.eval import EvalOptions, run_eval

    run_dir = args.run_dir
    if args.config is not None:
        from d2v_engine.config import load_config

        run_dir = load_config(args.config, args.overrides).run.dir
    elif args.overrides:
        raise UserError("config overrides need --config; with --run the run's own config.yaml applies.")
    opts = EvalOptions(tasks=args.tasks, data_root=args.data_root, probe_train=args.probe_train,
                       probe_test=args.probe_test, limit_train=args.limit_train,
                       limit_test=args.limit_test, batch_size=args.batch_size, weights=args.weights,
                       tag=args.tag, k=args.k, raw=args.raw)
    run_eval(run_dir, opts, json_path=args.json)
    return 0


def _add_profile(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="time the phases of a training step",
        description="Run warm-up and measured training steps of a config and print the time per step "
                    "split into phases, samples/s, model FLOPs and MFU, and peak memory. Writes "
                    "profile.json, profile.png and a Chrome trace (trace.json) into --out.")
    p.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--warmup", type=int, default=5, metavar="N", help="steps run before measuring (default 5)")
    p.add_argument("--steps", type=_positive, default=20, metavar="N", help="measured steps (default 20)")
    p.add_argument("--trace-steps", type=int, default=2, metavar="N",
                   help="steps recorded by torch.profiler after the measured ones (0 = no trace)")
    p.add_argument("--compare", metavar="KEY=A,B",
                   help="profile two values of one config key, e.g. kernels.backend=reference,auto")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run.dir>/profile)")
    p.set_defaults(run=_run_profile)


def _run_profile(args) -> int:
    from d2v_engine.profile import ProfileOptions, run_profile

    opts = ProfileOptions(warmup=args.warmup, steps=args.steps, trace_steps=args.trace_steps)
    run_profile(args.config, args.overrides, opts, compare=args.compare, out=args.out)
    return 0


def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's consolidated fp32 student and teacher weights",
        description="Gather a checkpoint's student and teacher weights, whatever the ZeRO stage and "
                    "number of ranks that wrote it, into one fp32 safetensors file. A new run on any "
                    "number of ranks starts from it with run.init_from=FILE.")
    p.add_argument("--run", dest="run_dir", metavar="DIR", required=True,
                   help="the run directory (its run.dir)")
    p.add_argument("--out", metavar="FILE", required=True,
                   help="the weights file to write (safetensors, e.g. weights.safetensors)")
    p.add_argument("--tag", help="checkpoint tag (default: the one checkpoints/latest names)")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from d2v_engine.export import export_run

    exported = export_run(args.run_dir, args.out, tag=args.tag)
    print(f"d2v export: {exported['model']} at step {exported['step']} ({len(exported['student'])} student "
          f"and {len(exported['teacher'])} teacher tensors) -> {args.out}")
    return 0


def _add_hf_import(subparsers) -> None:
    p = subparsers.add_parser(
        "hf-import", help="turn a Hugging Face Data2Vec model into a run.init_from weights file",
        description="Read a Data2Vec vision/audio/text model that transformers saved (save_pretrained) and "
                    "write a weights file a pretraining run of the config's model starts from with "
                    "run.init_from=FILE (student and teacher at the HF weights, a fresh regression head). "
                    "Needs `pip install d2v_engine[hf]`.")
    p.add_argument("--hf-dir", required=True, metavar="DIR", help="the Hugging Face model folder")
    p.add_argument("--config", required=True, help="the pretraining config (its model.name must fit)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the weights file to write (safetensors, e.g. init.safetensors)")
    p.set_defaults(run=_run_hf_import)


def _run_hf_import(args) -> int:
    from d2v_engine.hf import hf_import, quiet_transformers

    quiet_transformers()
    written = hf_import(args.hf_dir, args.config, args.out, overrides=args.overrides)
    for note in written["notes"]:
        print(f"d2v hf-import: note: {note}", file=sys.stderr)
    print(f"d2v hf-import: {args.hf_dir} -> {args.out} ({written['model']}, {len(written['student'])} "
          f"student tensors); start from it with run.init_from={args.out}")
    return 0


def _add_hf_export(subparsers) -> None:
    p = subparsers.add_parser(
        "hf-export", help="write a run, or a fine-tuned model, as a Hugging Face Data2Vec model folder",
        description="Gather a checkpoint's fp32 weights (any ZeRO stage) into a folder that transformers "
                    "loads with from_pretrained: config, safetensors weights and the run's preprocessing "
                    "(image processor, audio feature extractor or tokenizer). With --finetuned, a "
                    "fine-tuned model instead, as the task class (Data2VecVisionForImageClassification, "
                    "Data2VecTextForSequenceClassification, or Data2VecAudioForCTC with a Wav2Vec2Processor). Needs `pip install d2v_engine[hf]`.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", dest="run_dir", metavar="DIR", help="the run directory (its run.dir)")
    source.add_argument("--finetuned", metavar="DIR", help="a fine-tuning folder, RUN/finetune/TASK")
    p.add_argument("--out", metavar="DIR", required=True, help="the folder to write")
    p.add_argument("--tag", help="checkpoint tag (default: the one checkpoints/latest names)")
    p.add_argument("--weights", choices=("student", "teacher"), default="student",
                   help="which weights to export (default: student)")
    p.set_defaults(run=_run_hf_export)


def _run_hf_export(args) -> int:
    from d2v_engine.hf import hf_export, hf_export_finetuned, quiet_transformers

    quiet_transformers()
    if args.finetuned:
        if args.tag is not None or args.weights != "student":
            raise UserError("--tag and --weights choose a pretraining checkpoint; drop them with --finetuned.")
        written = hf_export_finetuned(args.finetuned, args.out)
        print(f"d2v hf-export: {written['model']} fine-tuned on {written['task']} at step {written['step']} -> "
              f"{args.out} ({written['hf_class']}; {', '.join(written['files'])})")
        return 0
    written = hf_export(args.run_dir, args.out, tag=args.tag, weights=args.weights)
    print(f"d2v hf-export: {written['model']} ({written['weights']}) at step {written['step']} -> {args.out} "
          f"({', '.join(written['files'])})")
    return 0


def _add_finetune(subparsers) -> None:
    from d2v_engine.finetune import add_arguments

    p = subparsers.add_parser(
        "finetune", help="fine-tune a run's (or a Hugging Face folder's) encoder on a labelled task, "
                         "beside random init",
        description="Fine-tune a pretraining run's encoder (or, with --hf-dir HF --out DIR, a Hugging Face "
                    "Data2Vec folder's) with a task head (classification or CTC) on the task's labels, "
                    "optionally also from random init (--compare random-init), and write "
                    "RUN/finetune/finetune.json (DIR/finetune/... with --hf-dir), the curve and the fine-tuned "
                    "weights. Several ranks: `deepspeed d2v_engine/finetune.py --run ... --task ...`.")
    add_arguments(p)
    p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    from d2v_engine.finetune import PREEMPTED, options, run_finetune

    return PREEMPTED if run_finetune(args.run_dir, options(args)) is None else 0


def build_parser() -> argparse.ArgumentParser:
    """The `d2v` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="d2v", description="data2vec engine tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prepare, _add_shards, _add_eval, _add_profile, _add_export, _add_hf_import, _add_hf_export,
                _add_finetune):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `d2v` with `argv` (default: the process's arguments).

    Returns:
        The exit status: 0 on success, 2 on a user error (printed as `d2v: error: <sentence>`).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:
        print(f"d2v: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("d2v: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
