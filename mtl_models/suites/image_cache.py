"""Decoded images, prepared once per machine and read by every trial from local disk.

An image suite's files are decoded (Pillow, RGB, resized to `size`×`size`) into one uint8
`images.npy` of shape (rows, 3, size, size) under `cache_root()/<key>/`, where the key hashes
the table's SHA-256, its image column, `size` and every file's size and modification time.
Beside it, `stats.npy` (rows, 2, 3) float64 holds each image's per-channel sum and sum of
squares (a split's normalisation statistics without another pass), and `meta.json` the
SHA-256 of the images' bytes (a policy records it, so `apply` refuses changed images).

Built under a file lock into a temporary folder renamed into place, so concurrent builders
(trial workers of one node) wait for one build and a killed build leaves nothing half-made.
Readers `pread` whole rows into a fresh buffer (`ImageStore.read`): nothing of the file stays
mapped in a reader, so its resident memory does not grow with the data set.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np

from spaces.errors import PrunefuseError

CACHE_ENV = "PRUNEFUSE_DATA_CACHE"
VERSION = 1
CHUNK = 512           # images a decoding job handles at once
PARALLEL_FROM = 2048  # tables with fewer rows decode in this process (starting workers costs more)


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "prunefuse", "images")


@dataclass(frozen=True)
class ImageStore:
    """The decoded images of one table at one size; `read(rows)` -> (b, 3, size, size) uint8."""

    folder: str
    rows: int
    size: int
    offset: int          # where row 0 starts in images.npy (after the .npy header)
    images_sha256: str

    @property
    def row_bytes(self) -> int:
        return 3 * self.size * self.size

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), 3, self.size, self.size), dtype=np.uint8)
        fd = _open_fds.get(self.folder)
        if fd is None:
            fd = _open_fds[self.folder] = os.open(os.path.join(self.folder, "images.npy"), os.O_RDONLY)
        for i, r in enumerate(np.asarray(rows, dtype=np.int64)):
            got = os.preadv(fd, [out[i]], self.offset + int(r) * self.row_bytes)
            if got != self.row_bytes:
                raise PrunefuseError(f"the decoded image cache {self.folder} is truncated at row {int(r)}; "
                                     f"delete that folder to rebuild it")
        return out

    def channel_stats(self, rows: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and standard deviation (in 0..1 units) over these rows' pixels."""
        stats = np.load(os.path.join(self.folder, "stats.npy"), mmap_mode="r")[np.sort(rows)]
        pixels = len(rows) * self.size * self.size
        mean = stats[:, 0].sum(axis=0) / pixels
        var = np.maximum(stats[:, 1].sum(axis=0) / pixels - mean ** 2, 0.0)
        std = np.where(var > 0, np.sqrt(var), 255.0)
        return tuple(float(v) for v in mean / 255.0), tuple(float(v) for v in std / 255.0)


# One read-only descriptor per store and process (pread needs no shared offset, so loader
# workers forked from this process can share it).
_open_fds: dict[str, int] = {}


def cache_key(table, size: int) -> str:
    blob = json.dumps({"v": VERSION, "table": table.digest, "column": table.column, "size": size,
                       "files": table.stamp}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prepare(table, size: int) -> ImageStore:
    """The store of `table` at `size`: found in the cache, or decoded into it now (once per machine)."""
    import fcntl

    root = cache_root()
    os.makedirs(root, exist_ok=True)
    folder = os.path.join(root, cache_key(table, size))
    found = _load(folder)
    if found is not None:
        return found
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process of this machine may be building it
        found = _load(folder)
        if found is None:
            _build(table, size, folder)
            found = _load(folder)
    return found


def _load(folder: str) -> ImageStore | None:
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("version") != VERSION:
        return None
    return ImageStore(folder, meta["rows"], meta["size"], meta["offset"], meta["images_sha256"])


def _build(table, size: int, folder: str) -> None:
    n, row_bytes = len(table), 3 * size * size
    need = n * row_bytes
    root = os.path.dirname(folder)
    free = shutil.disk_usage(root).free
    if need > free * 0.9:
        raise PrunefuseError(f"decoding {n} images at {size}x{size} needs {need / 2**30:.1f} GiB in {root}; "
                             f"{free / 2**30:.1f} GiB is free (set {CACHE_ENV} to a folder with room, or a smaller size)")
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        header = np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), mode="w+", dtype=np.uint8,
                                           shape=(n, 3, size, size))
        offset = header.offset
        del header  # the file is sized; rows are written with pwrite, never through a mapping
        stats, digests = _decode_all(table, size, os.path.join(tmp, "images.npy"), offset)
        np.save(os.path.join(tmp, "stats.npy"), stats)
        images_sha = hashlib.sha256(b"".join(digests)).hexdigest()
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"version": VERSION, "rows": n, "size": size, "offset": offset,
                       "images_sha256": images_sha, "table": table.path}, f)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _decode_all(table, size, target, offset):
    """Decode every row into `target`; (per-row channel sums (n, 2, 3), per-row SHA-256 digests)."""
    n = len(table)
    stats = np.zeros((n, 2, 3), dtype=np.float64)
    digests: list[bytes] = [b""] * n
    if table.files is None:  # encoded bytes in the table: streamed batch by batch, here
        start = 0
        for items in _bytes_batches(table):
            s, d = _decode_chunk(items, start, size, target, offset)
            stats[start:start + len(items)], digests[start:start + len(items)] = s, d
            start += len(items)
        return stats, digests
    chunks = [(table.files[i:i + CHUNK], i) for i in range(0, n, CHUNK)]
    workers = min(len(chunks), os.cpu_count() or 1)
    if n < PARALLEL_FROM or workers < 2:
        results = [_decode_chunk(files, start, size, target, offset) for files, start in chunks]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may be a Ray driver or worker with threads running.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_decode_chunk, *zip(*chunks), [size] * len(chunks), [target] * len(chunks),
                                    [offset] * len(chunks)))
    for (files, start), (s, d) in zip(chunks, results):
        stats[start:start + len(files)], digests[start:start + len(files)] = s, d
    return stats, digests


def _bytes_batches(table):
    from .image_table import image_batches

    for items in image_batches(table):
        yield [b"" if item is None else item for item in items]


def _decode_chunk(items, start: int, size: int, target: str, offset: int):
    """Decode `items` (paths or encoded bytes) of rows start.. into `target`; their sums and digests."""
    stats = np.zeros((len(items), 2, 3), dtype=np.float64)
    digests = []
    buf = np.empty((len(items), 3, size, size), dtype=np.uint8)
    for i, item in enumerate(items):
        data = item if isinstance(item, bytes) else _read_bytes(item)
        digests.append(hashlib.sha256(data).digest())
        buf[i] = decode(data, size, row=start + i, name=None if isinstance(item, bytes) else item)
        pixels = buf[i].reshape(3, -1).astype(np.float64)
        stats[i, 0], stats[i, 1] = pixels.sum(axis=1), (pixels ** 2).sum(axis=1)
    fd = os.open(target, os.O_WRONLY)
    try:
        os.pwrite(fd, buf.tobytes(), offset + start * buf[0].nbytes)
    finally:
        os.close(fd)
    return stats, digests


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def decode(data: bytes, size: int, *, row: int, name: str | None = None) -> np.ndarray:
    """One encoded image -> (3, size, size) uint8 RGB (bilinear resize); one line naming the row if unreadable."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a hostile size is an error
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except Exception as exc:  # Pillow raises many types for a bad file; all mean "unreadable"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        where = f"image at row {row}" + (f" ({name})" if name else "")
        raise PrunefuseError(f"{where} cannot be read as an image: {first}") from None
