"""Random access into WebDataset tar shards: an index of (shard, key, member offsets) per sample.

The `torch` reader is map-style, so that the order of an epoch is a seeded permutation and a resumed
run can start at any batch without reading what it skips. Indexing reads only the 512-byte tar
headers (Python's `tarfile` seeks over the payloads); reading a sample is one `os.pread` per member.
Samples follow WebDataset's rule: consecutive members that share the part of the name before the
first dot of the file name form one sample, keyed by that prefix.
"""
from __future__ import annotations

import logging
import mmap
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)

_ZERO_BLOCK = bytes(512)


@dataclass
class ShardIndex:
    """Where every sample's members lie in the shards.

    Attributes:
        shards: shard paths, in order.
        shard_of: [N] int32 shard number of each sample.
        keys: N sample keys.
        members: extension -> ([N] int64 offsets, [N] int64 sizes); offset -1 = the sample lacks it.
    """

    shards: list[str]
    shard_of: np.ndarray
    keys: list[str]
    members: dict[str, tuple[np.ndarray, np.ndarray]]
    _fds: dict[int, int] = field(default_factory=dict, repr=False)
    _pid: int = field(default=-1, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def extensions(self, i: int) -> set[str]:
        """The extensions present in sample `i`."""
        return {ext for ext, (offsets, _) in self.members.items() if offsets[i] >= 0}

    def read(self, i: int) -> dict[str, bytes]:
        """The raw members of sample `i`, extension -> bytes.

        Raises:
            OSError: the shard is unreadable or shorter than the index says.
        """
        fd = self._fd(int(self.shard_of[i]))
        raw = {}
        for ext, (offsets, sizes) in self.members.items():
            if offsets[i] < 0:
                continue
            data = os.pread(fd, int(sizes[i]), int(offsets[i]))
            if len(data) != sizes[i]:
                raise OSError(f"short read of {self.keys[i]}.{ext}")
            raw[ext] = data
        return raw

    def _fd(self, shard: int) -> int:
        # One descriptor per shard and process: after a fork the child opens its own, so workers
        # never share file state (pread has no file position, but closing must stay per process).
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return fd

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state


def _scan_ustar(path: str) -> tuple[list[tuple[str, int, int]], bool] | None:
    """(name, offset, size) of every member of a plain ustar file, straight from the headers.

    About ten times faster than `tarfile` on shards of small files (it builds no TarInfo objects).

    Returns:
        (members, complete): complete is False when the file ends inside a member, which is then
        the last one listed, with the size its header claims (reading it fails). None when the tar
        holds anything this does not parse (long-name or pax headers, links, a damaged header):
        `tarfile` handles those.
    """
    members = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        end, pos = len(buf), 0
        while pos + 512 <= end:
            header = buf[pos:pos + 512]
            if header == _ZERO_BLOCK:
                return members, True
            kind = header[156:157]
            if kind not in (b"0", b"\0", b"5") or header[257:262] != b"ustar":
                return None
            try:
                size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            except ValueError:
                return None
            name = header[:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
            prefix = header[345:500].rstrip(b"\0")
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            if kind != b"5":
                members.append((name, pos + 512, size))
            if pos + 512 + size > end:
                return members, False
            pos += 512 + (size + 511) // 512 * 512
    # No end-of-archive block: the members listed are whole, but the file was cut after them.
    return members, False


def _scan_tar(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {ext: (offset, size)}) per sample of one tar, in order.

    A truncated tar keeps the samples before the damage plus the sample the damage cuts into (its
    cut member reads short, so the readers count that sample as bad, with its shard and key); what
    lies after the damage is lost, and a warning says so.

    Args:
        path: a tar file.
    Returns:
        The samples readable up to the first damage.
    """
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    scanned = _scan_ustar(path)
    members, complete = scanned if scanned is not None else _scan_with_tarfile(path)
    for name, offset, size in members:
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][ext.lower()] = (offset, size)
    if not complete:
        log.warning("shard %s is truncated after %d samples; the samples after the damage are lost",
                    path, len(samples))
    return samples


def _scan_with_tarfile(path: str) -> tuple[list[tuple[str, int, int]], bool]:
    """(name, offset, size) of every regular member from `tarfile` (any tar dialect), and whether
    the tar is undamaged (as `_scan_ustar`: a cut member is listed last)."""
    file_size = os.path.getsize(path)
    members = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    members.append((member.name, member.offset_data, member.size))
                    if member.offset_data + member.size > file_size:
                        return members, False
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return members, False
    # tarfile stops quietly at a cut header: an intact tar ends in zero blocks after its members.
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read(1 << 16)
    return members, bool(tail) and tail.count(0) == len(tail)


def write_dali_index(path: str | Path, idx_path: str | Path | None = None) -> Path:
    """Write the `.idx` file that DALI's `fn.readers.webdataset` takes as `index_paths`.

    The format of DALI's `wds2idx` (version v1.2): a line `v1.2 <samples>`, then per sample one line
    of `<ext> <data offset> <size> <member name>` groups, one group per member.

    Args:
        path: the tar shard.
        idx_path: where to write; default: the shard's path with `.idx` for `.tar`.
    Returns:
        The index file's path.
    """
    path = Path(path)
    idx_path = Path(idx_path) if idx_path else path.with_suffix(".idx")
    scanned = _scan_ustar(str(path))
    members = (scanned if scanned is not None else _scan_with_tarfile(str(path)))[0]
    lines: list[list[str]] = []
    last = None
    for name, offset, size in members:
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        if key != last:
            lines.append([])
            last = key
        lines[-1].append(f"{ext} {offset} {size} {name}")
    tmp = idx_path.with_name(idx_path.name + ".tmp")
    tmp.write_text(f"v1.2 {len(lines)}\n" + "".join(" ".join(groups) + "\n" for groups in lines))
    os.replace(tmp, idx_path)
    return idx_path


def build_index(shards: list[str | Path]) -> ShardIndex:
    """Index the samples of `shards` (member offsets and sizes from the tar headers).

    Args:
        shards: tar paths, in the order that defines the global sample indices.
    Returns:
        The `ShardIndex` over all of them.
    """
    shard_of: list[int] = []
    keys: list[str] = []
    found: dict[str, list[tuple[int, int, int]]] = {}
    for shard, path in enumerate(shards):
        for key, members in _scan_tar(str(path)):
            for ext, (offset, size) in members.items():
                found.setdefault(ext, []).append((len(keys), offset, size))
            shard_of.append(shard)
            # Keys are only unique within a shard; the shard name makes them readable in logs.
            keys.append(key)
    n = len(keys)
    members = {}
    for ext, rows in found.items():
        offsets = np.full(n, -1, dtype=np.int64)
        sizes = np.zeros(n, dtype=np.int64)
        at, off, size = (np.asarray(c, dtype=np.int64) for c in zip(*rows))
        offsets[at], sizes[at] = off, size
        members[ext] = (offsets, sizes)
    return ShardIndex([str(p) for p in shards], np.asarray(shard_of, dtype=np.int32), keys, members)
