"""Cheap checks of an encoded sample before it is decoded: its format by content, its size, its end.

Both readers run these checks first, so they agree on what is bad: the `torch` reader inside its
decoders, the `dali` reader before a sample enters a DALI pipeline (where one undecodable file fails
the whole batch and the pipeline with it). A check reads headers and looks for the end marker that
a truncated file lacks; it never decodes pixels or audio frames. The format comes from the bytes,
never from the file extension, so a PNG stored as `KEY.jpg` is a good sample.

Supported: JPEG, PNG and WebP images; WAV, FLAC and Ogg (Vorbis/Opus) audio: the formats that PIL and
soundfile (the `torch` reader) and DALI's decoders all read. `d2v shards` converts other formats
(BMP, TIFF, GIF, MP3, ...) into these when it writes shards.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import soundfile
from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
"""PIL format name -> our name, for the image formats both readers decode."""

AUDIO_MAGIC = ((b"RIFF", 0, "wav"), (b"fLaC", 0, "flac"), (b"OggS", 0, "ogg"))
"""(bytes, offset, format) that identify the audio formats both readers decode."""

_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk type and its fixed CRC: the last 8 bytes of a PNG
_MAX_FRAMES = 1 << 31         # libsndfile reports a huge length for files written to a pipe


class UnsupportedFormat(ValueError):
    """The bytes are a format the readers do not decode (a bad sample, said in so many words)."""


def image_header(data: bytes) -> tuple[str, int, int]:
    """The format and size of an encoded image, from its header, after checking that it is complete.

    Args:
        data: the encoded file.
    Returns:
        (format, width, height): format is "jpeg", "png" or "webp".
    Raises:
        ValueError: empty, unreadable header, unsupported format (`UnsupportedFormat`), or truncated.
    """
    if not data:
        raise ValueError("empty image file")
    try:
        with Image.open(io.BytesIO(data)) as img:  # parses the header only, decodes nothing
            pil_format, (width, height) = img.format, img.size
    except UnidentifiedImageError:
        raise UnsupportedFormat("not an image format PIL recognises") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"unreadable image header ({err})") from None
    kind = check_image_format(pil_format, data)
    if width < 1 or height < 1:
        raise ValueError(f"image of {width}x{height} pixels")
    return kind, width, height


def check_image_format(pil_format: str | None, data: bytes) -> str:
    """Our name of a PIL format after checking the file is complete (shared with the PIL decoder).

    Args:
        pil_format: `Image.format` of the opened file.
        data: the encoded file.
    Returns:
        "jpeg", "png" or "webp".
    Raises:
        UnsupportedFormat: another format; ValueError: the file is truncated.
    """
    kind = IMAGE_FORMATS.get(pil_format or "")
    if kind is None:
        raise UnsupportedFormat(f"unsupported image format {pil_format or 'unknown'} (the readers "
                                f"decode JPEG, PNG and WebP; `d2v shards` converts other images)")
    if kind == "jpeg":
        # Entropy-coded data escapes 0xFF, so an end-of-image marker after the start of the last
        # scan can only be the real end (an EXIF thumbnail's own marker lies before every scan).
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise ValueError("truncated JPEG: no end-of-image marker after the last scan")
    elif kind == "png":
        if data.rfind(_PNG_END) < 0:
            raise ValueError("truncated PNG: no IEND chunk")
    elif len(data) < 12 or struct.unpack("<I", data[4:8])[0] + 8 > len(data):
        raise ValueError("truncated WebP: shorter than its RIFF header says")
    return kind


def audio_format(data: bytes) -> str:
    """The audio format of `data` from its first bytes.

    Returns:
        "wav", "flac" or "ogg".
    Raises:
        UnsupportedFormat: anything else (MP3 included), or an empty file.
    """
    if not data:
        raise UnsupportedFormat("empty audio file")
    for magic, offset, kind in AUDIO_MAGIC:
        if data[offset:offset + len(magic)] == magic:
            if kind == "wav" and data[8:12] != b"WAVE":
                break
            return kind
    what = "MP3" if data[:3] == b"ID3" or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2") \
        else "an unknown format"
    raise UnsupportedFormat(f"audio in {what} (the readers decode WAV, FLAC and Ogg; `d2v shards` "
                            f"converts other audio to FLAC)")


@dataclass(frozen=True)
class AudioHeader:
    """What an audio file's header says.

    Attributes:
        format: "wav", "flac" or "ogg".
        frames: samples per channel.
        rate: sample rate in Hz.
        channels: channel count.
    """

    format: str
    frames: int
    rate: int
    channels: int

    def length_at(self, rate: int) -> int:
        """Samples of the clip resampled to `rate`: ceil(frames * rate / self.rate), DALI's count."""
        return -(-self.frames * rate // self.rate)


def audio_header(data: bytes) -> AudioHeader:
    """Format, length and rate of an encoded clip, from its header (libsndfile decodes nothing).

    Raises:
        ValueError: unsupported format, unreadable header, no frames, or no usable length.
    """
    kind = audio_format(data)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            frames, rate, channels = f.frames, f.samplerate, f.channels
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise ValueError(f"unreadable {kind} header ({err})") from None
    check_audio_length(frames)
    if rate < 1 or channels < 1:
        raise ValueError(f"{kind} header gives {rate} Hz and {channels} channels")
    return AudioHeader(kind, int(frames), int(rate), int(channels))


def check_audio_length(frames: int) -> None:
    """ValueError when a header's frame count is zero or unusable (shared with the soundfile decoder)."""
    if frames == 0:
        raise ValueError("empty audio clip")
    if not 0 < frames < _MAX_FRAMES:
        raise ValueError(f"audio header gives no usable length ({frames} frames)")
