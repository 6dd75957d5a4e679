"""Where an image suite's images are: a table of paths (or encoded bytes) and labels, or a folder.

A table is CSV, Parquet or Arrow IPC (`.arrow` / `.feather`); only its label columns and the
image column are read (Parquet and Arrow through pyarrow, a column at a time; an image
column of encoded bytes is not read here at all but streamed in record batches while the
images are decoded). Image paths are relative to the table's folder: an absolute path, or
one that leaves the folder (`../x.png`, a symlink pointing out), is refused, naming its row.
A folder `root/CLASS/*.png|jpg|jpeg` is read as a table with columns `path` and `class`.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spaces.errors import PrunefuseError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TABLE_FORMATS = {".csv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet",
                 ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
FOLDER_COLUMNS = ("path", "class")   # the table a folder of class sub-folders reads as


@dataclass(frozen=True, eq=False)
class ImageTable:
    path: str                 # the table file or the folder, absolute
    digest: str               # SHA-256 of the table file (of a folder: of its listing)
    labels: object            # pandas DataFrame: the label columns, one row per image
    files: list | None        # each row's image file (absolute, checked inside `root`); None: bytes column
    stamp: str                # each file's size and mtime, hashed: a decoded cache is rebuilt when it changes
    column: str               # the image column
    fmt: str                  # csv | parquet | arrow | folder

    def __len__(self) -> int:
        return len(self.labels)


def read_table(path: str, column: str, label_columns: list[str]) -> ImageTable:
    """The table (or folder) at `path`, with every row's image checked to exist inside its folder."""
    path = os.path.abspath(str(path))
    if os.path.isdir(path):
        return _folder(path)
    if not os.path.isfile(path):
        raise PrunefuseError(f"data {path!r} not found (expected a CSV / Parquet / Arrow table or an image folder)")
    fmt = TABLE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise PrunefuseError(f"data file {path!r}: expected a .csv, .parquet or .arrow table, or an image folder")
    from .tabular import file_sha256

    df, binary = _columns(path, fmt, column, label_columns)
    files, stamp = (None, hashlib.sha256().hexdigest()) if binary else image_files(df[column], os.path.dirname(path), column)
    return ImageTable(path, file_sha256(path), df.drop(columns=[column], errors="ignore"), files,
                      stamp, column, fmt)


def _columns(path: str, fmt: str, column: str, label_columns: list[str]):
    """(DataFrame of the image column (unless it holds bytes) and the label columns, whether it holds bytes)."""
    import pandas as pd

    from .tabular import _check_column

    try:
        if fmt == "csv":
            df = pd.read_csv(path, dtype={column: str})
            binary = False
        else:
            schema = _schema(path, fmt)
            names = list(schema.names)
            if column not in names:
                _check_column(pd.DataFrame(columns=names), column, "image")
            import pyarrow as pa

            binary = pa.types.is_binary(schema.field(column).type) or pa.types.is_large_binary(schema.field(column).type)
            wanted = [c for c in dict.fromkeys([*([] if binary else [column]), *label_columns]) if c in names]
            df = _arrow_table(path, fmt, wanted).to_pandas()
            for c in label_columns:  # absent ones: named by the check below, with the table's columns
                if c not in df.columns:
                    _check_column(pd.DataFrame(columns=names), c, "label")
    except PrunefuseError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrunefuseError(f"cannot read {path!r}: {first}") from None
    if not binary:
        _check_column(df, column, "image")
    return df.reset_index(drop=True), binary


def _schema(path: str, fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        return pq.read_schema(path)
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).schema


def _arrow_table(path: str, fmt: str, columns: list[str]):
    """Only `columns`; an Arrow file is memory-mapped, so the rest is never read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        return pq.read_table(path, columns=columns)
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all().select(columns)


def image_batches(table: ImageTable, rows: int = 256):
    """The image column of a bytes table in record batches: lists of encoded images, in row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if table.fmt == "parquet":
        for batch in pq.ParquetFile(table.path).iter_batches(batch_size=rows, columns=[table.column]):
            yield batch.column(0).to_pylist()
        return
    with pa.memory_map(table.path) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            column = reader.get_batch(i).column(table.column)
            for start in range(0, len(column), rows):
                yield column.slice(start, rows).to_pylist()


def image_files(values, root: str, column: str) -> tuple[list[str], str]:
    """(each row's image file, absolute; a hash of their sizes and modification times): one line
    naming the first row whose path is absolute, leaves `root` (after following symlinks) or
    names no file. Folders are resolved once each, files with one lstat (and one stat)."""
    real_root = os.path.realpath(root)
    real_dirs: dict[str, str] = {}
    files, stamp = [], hashlib.sha256()
    for row, value in enumerate(values):
        text = str(value).strip()
        if not text:
            raise PrunefuseError(f"image column {column!r} is empty at row {row}")
        if os.path.isabs(text):
            raise PrunefuseError(f"image at row {row} ({text!r}) is an absolute path; image paths are relative to "
                                 f"the table's folder {root}")
        folder, name = os.path.split(os.path.normpath(text))
        if folder not in real_dirs:
            real_dirs[folder] = os.path.realpath(os.path.join(real_root, folder))
        full = os.path.join(real_dirs[folder], name)
        if os.path.islink(full):
            full = os.path.realpath(full)
        if os.path.commonpath([full, real_root]) != real_root:
            raise PrunefuseError(f"image at row {row} ({text!r}) is outside the table's folder {root}; "
                                 f"image paths must stay inside it")
        try:
            st = os.stat(full)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise PrunefuseError(f"image at row {row} ({text!r}) not found: no file {full}")
        files.append(full)
        stamp.update(f"{full}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return files, stamp.hexdigest()


def _folder(root: str) -> ImageTable:
    """`root/CLASS/*.png|jpg|jpeg`, sorted: columns `path` (relative to root) and `class`."""
    import pandas as pd

    rel = []
    for cls in sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")):
        rel += sorted(f"{cls}/{e.name}" for e in os.scandir(os.path.join(root, cls))
                      if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
    if not rel:
        raise PrunefuseError(f"image folder {root!r} has no CLASS/*.png, *.jpg or *.jpeg files "
                             f"(one sub-folder per class)")
    files, stamp = image_files(rel, root, "path")
    listing = hashlib.sha256("".join(f"{r}\t{os.path.getsize(f)}\n" for r, f in zip(rel, files)).encode())
    labels = pd.DataFrame({FOLDER_COLUMNS[1]: np.array([r.split("/")[0] for r in rel], dtype=object)})
    return ImageTable(root, listing.hexdigest(), labels, files, stamp, FOLDER_COLUMNS[0], "folder")
