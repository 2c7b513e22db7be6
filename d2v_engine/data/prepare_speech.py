"""spoken-words: synthetic speech from espeak-ng, resampled to 16 kHz mono FLAC by sox.

A voice is an espeak-ng variant (`+m3`, `+klatt2`, `+whisper`, ...); each clip draws an English accent,
a voice, a speed (`-s`) and a pitch (`-p`). A seeded fifth of the voices is held out of pretraining:

- `train/`: unlabeled phrases of 2-5 words (command words and the digits), training voices only;
- `probe_train/`: single digits "zero".."nine" with labels 0-9, training voices;
- `probe_test/`: single digits with labels, held-out voices only (the probe measures how well
  features carry over to speakers never heard in pretraining);
- `ctc_train/`: new phrases of 2-5 words from the same words, training voices, each with its words as
  a `.txt` transcript (about 80 minutes of audio, so that fine-tuning on 1 h never runs out);
- `ctc_test/`: transcribed phrases, held-out voices only (WER and CER of the fine-tuned model).

The words and voice of every clip ride along as `.json`. The voice split is recorded in every split's
manifest.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile

from d2v_engine.data.shards import ShardSetWriter
from d2v_engine.errors import UserError

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "forward",
            "backward", "follow", "learn", "visual", "bed", "bird", "cat", "dog", "happy", "house",
            "tree", "wow", "open", "close", "start", "play", "pause", "next", "back", "help", "light")
SIZES = {"train": 12000, "probe_train": 3000, "probe_test": 2000, "ctc_train": 3000, "ctc_test": 600}
"""Clips per split of the full set: about two minutes of synthesis on two idle cores. A split's place
here seeds its random stream: new splits go at the end, so that the others stay byte-identical.
Phrases last 1.6 s on average, so ctc_train holds about 80 minutes."""
PHRASE_SPLITS = ("train", "ctc_train", "ctc_test")
"""Splits of 2-5 word phrases (the others hold one digit each)."""
HELD_OUT_SPLITS = ("probe_test", "ctc_test")
"""Splits spoken by the held-out voices only."""
TRANSCRIBED_SPLITS = ("ctc_train", "ctc_test")
"""Splits whose clips carry their words as a `.txt` transcript."""
HELD_OUT = 0.2
"""Fraction of the voices kept out of pretraining and probe training."""
SAMPLE_RATE = 16000


def list_variants() -> list[str]:
    """espeak-ng's voice variants, by file name (`m3`, `Alex`, ...; names are case-sensitive)."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        raise UserError("spoken-words needs espeak-ng and sox; install them with `apt-get install -y "
                        "--no-install-recommends espeak-ng sox libsox-fmt-all`.")
    listing = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[1:]
    # Columns: Pty Language Age/Gender VoiceName File; the file is `!v/<variant>`.
    names = sorted({line.split()[4].split("/")[-1] for line in listing if len(line.split()) >= 5})
    if not names:
        raise UserError("espeak-ng lists no voice variants; reinstall espeak-ng.")
    return names


def split_voices(variants: list[str], seed: int) -> tuple[list[str], list[str]]:
    """(training voices, held-out voices): a seeded HELD_OUT fraction of the variants held out."""
    order = np.random.default_rng([seed, 0xA0D10]).permutation(len(variants))
    held = max(1, math.ceil(HELD_OUT * len(variants)))
    heldout = sorted(variants[i] for i in order[:held])
    return sorted(v for v in variants if v not in heldout), heldout


def synthesize(job: tuple[str, str, int, int, int]) -> bytes | None:
    """One clip: espeak-ng (22.05 kHz wav on stdout) -> sox -> 16 kHz mono 16-bit FLAC bytes.

    Args:
        job: (text, voice "accent+variant", speed in words/minute, pitch 0-99, word gap in 10 ms).
    Returns:
        The FLAC file's bytes, or None when either tool fails.
    """
    text, voice, speed, pitch, gap = job
    speech = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                             "-g", str(gap), "--stdout", text], capture_output=True)
    if speech.returncode != 0 or len(speech.stdout) <= 44:
        return None
    # sox resamples to raw 16-bit PCM on a pipe and soundfile encodes the FLAC in memory: sox's
    # own FLAC on a pipe cannot go back to put the sample count into the header.
    # -V1: espeak's streamed wav header has no length, which sox would otherwise warn about.
    # -R: sox seeds its dither from the clock otherwise, and the same seed would not give the same clips.
    pcm = subprocess.run(["sox", "-V1", "-R", "-t", "wav", "-", "-r", str(SAMPLE_RATE), "-c", "1",
                          "-b", "16", "-e", "signed-integer", "-t", "raw", "-"],
                         input=speech.stdout, capture_output=True)
    if pcm.returncode != 0 or len(pcm.stdout) < 2:
        return None
    buf = io.BytesIO()
    wave = np.frombuffer(pcm.stdout[: len(pcm.stdout) // 2 * 2], dtype="<i2")
    soundfile.write(buf, wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def make_jobs(split: str, n: int, voices: list[str], rng: np.random.Generator) -> list[tuple]:
    """The clips of one split: (text, label, espeak job) with random accent, voice, speed, pitch.

    Args:
        split: one of PHRASE_SPLITS (phrases, label -1) or a probe split (one digit, label 0-9).
        n: number of clips.
        voices: the variants this split may use.
    Returns:
        n tuples (text, label, job) where job is `synthesize`'s argument.
    """
    words = COMMANDS + DIGITS
    jobs = []
    for _ in range(n):
        if split in PHRASE_SPLITS:
            text = " ".join(words[i] for i in rng.integers(0, len(words), int(rng.integers(2, 6))))
            label = -1
        else:
            label = int(rng.integers(0, 10))
            text = DIGITS[label]
        voice = f"{ACCENTS[rng.integers(len(ACCENTS))]}+{voices[rng.integers(len(voices))]}"
        job = (text, voice, int(rng.integers(120, 221)), int(rng.integers(20, 81)), int(rng.integers(0, 6)))
        jobs.append((text, label, job))
    return jobs


def prepare_spoken_words(out: Path, opts) -> dict[str, int]:
    """Write the five splits of spoken-words under `out`.

    Args:
        out: the data set's (temporary) folder.
        opts: `PrepareOptions` (limit caps every split; workers sets the synthesis processes).
    Returns:
        Clips written per split.
    """
    train_voices, heldout = split_voices(list_variants(), opts.seed)
    extra = {"source": "espeak-ng", "sample_rate": SAMPLE_RATE, "accents": list(ACCENTS),
             "train_voices": train_voices, "heldout_voices": heldout,
             "vocabulary": list(COMMANDS + DIGITS), "limit": opts.limit, "seed": opts.seed}
    counts = {}
    with Pool(opts.num_workers()) as pool:
        for k, (split, size) in enumerate(SIZES.items()):
            rng = np.random.default_rng([opts.seed, k])
            voices = heldout if split in HELD_OUT_SPLITS else train_voices
            jobs = make_jobs(split, opts.cap(size), voices, rng)
            counts[split] = _write_split(out / split, jobs, pool, opts, {**extra, "split": split},
                                         transcribed=split in TRANSCRIBED_SPLITS)
    return counts


def _write_split(folder: Path, jobs: list[tuple], pool, opts, extra: dict, transcribed: bool) -> int:
    """Synthesise `jobs` in the pool (order kept) and write them as shards; failures are skipped.

    `transcribed` adds each clip's words as `.txt` (`data.transcripts`; the audio payload decides the
    modality, so the clips still pretrain as audio).
    """
    failed = 0
    with ShardSetWriter(folder, modality="audio", shard_size=opts.shard_size, extra=extra) as writer:
        clips = pool.imap(synthesize, [job for _, _, job in jobs], chunksize=16)
        for i, ((text, label, job), flac) in enumerate(zip(jobs, clips)):
            if flac is None:
                failed += 1
                continue
            meta = {"text": text, "voice": job[1], "speed": job[2], "pitch": job[3], "gap": job[4]}
            fields = {"flac": flac, "json": json.dumps(meta)}
            if label >= 0:
                fields["cls"] = label
            if transcribed:
                fields["txt"] = text
            writer.write(f"{i:06d}", **fields)
        writer.extra["failed"] = failed
    return len(jobs) - failed
