"""Transcribed speech for CTC fine-tuning: audio samples that carry a `.txt` transcript.

A transcribed sample is an audio payload (`.flac`, `.wav` or `.ogg`) with its words beside it as
UTF-8 `KEY.txt`, in `d2v prepare spoken-words`' `ctc_train`/`ctc_test` splits and in the user's own
shards alike. `shards.modality_of` ranks audio above text, so these samples pretrain as audio too.
"""
from __future__ import annotations

from pathlib import Path

from d2v_engine.data.checks import audio_header
from d2v_engine.data.collate import payload
from d2v_engine.data.shards import EXTENSIONS, list_shards
from d2v_engine.data.tarindex import build_index
from d2v_engine.errors import UserError


def read_transcribed(folder: Path, limit_seconds: float | None, task: str, prepare: str
                     ) -> tuple[list[dict], list[str], int]:
    """The samples of a shard folder that carry a `.txt` transcript, in order, up to a total duration.

    Reading stops before the first sample that would take the summed audio past `limit_seconds`
    (durations come from the audio headers; nothing is decoded). Samples without a `.txt` are passed
    over; those whose transcript is empty or only whitespace are skipped and counted.

    Args:
        folder: the shard folder (or a brace pattern of shards).
        limit_seconds: most audio to read, in seconds; None = all of it.
        task: the task's name, for the messages.
        prepare: the `d2v prepare` data set providing the shards ("" for the user's own).
    Returns:
        (raw samples: extension -> bytes, their stripped transcripts, empty transcripts skipped).
    Raises:
        UserError: no shards, no transcribed sample, a transcript that is not UTF-8, a transcript
            without audio, or an unreadable audio header.
    """
    shards = list_shards(folder)
    if not shards:
        hint = f"run `d2v prepare {prepare} --out <root>` or pass --data" if prepare else "check the path"
        raise UserError(f"task '{task}' needs transcribed audio shards in '{folder}', which holds none; "
                        f"{hint}.")
    index = build_index(shards)
    raws, texts, empty, seconds = [], [], 0, 0.0
    for i in range(len(index)):
        if "txt" not in index.extensions(i):
            continue
        raw = index.read(i)
        text = _transcript(raw, index.keys[i], folder, task)
        if not text:
            empty += 1
            continue
        seconds += _duration(raw, index.keys[i], folder, task)
        if limit_seconds is not None and seconds > limit_seconds:
            break
        raws.append(raw)
        texts.append(text)
    if not raws and seconds:
        raise UserError(f"task '{task}': the first transcribed clip in '{folder}' lasts {seconds:.1f} s, "
                        f"more than the limit of {limit_seconds:g} s; raise the limit.")
    if not raws:
        raise UserError(f"task '{task}' needs audio samples with `.txt` transcripts in '{folder}' but "
                        f"found none with a non-empty one; write each clip's words as KEY.txt beside it.")
    return raws, texts, empty


def _transcript(raw: dict[str, bytes], key: str, folder: Path, task: str) -> str:
    """The sample's `.txt`, stripped (UserError when it is not UTF-8)."""
    try:
        return raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UserError(f"task '{task}': sample '{key}' in '{folder}' has a .txt transcript that is not "
                        f"UTF-8; write transcripts as UTF-8 text.") from None


def _duration(raw: dict[str, bytes], key: str, folder: Path, task: str) -> float:
    """Seconds of the sample's audio, from its header (UserError when there is none or it is unreadable)."""
    try:
        header = audio_header(payload(raw, EXTENSIONS["audio"]))
    except KeyError:
        raise UserError(f"task '{task}': sample '{key}' in '{folder}' has a transcript but no "
                        f"{'/'.join('.' + e for e in EXTENSIONS['audio'])} audio; CTC fine-tuning reads "
                        f"audio shards.") from None
    except ValueError as err:
        raise UserError(f"task '{task}': sample '{key}' in '{folder}' has unreadable audio ({err}); "
                        f"rebuild its shards.") from None
    return header.frames / header.rate
