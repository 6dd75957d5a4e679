"""Reading and writing the user's files without ever leaving one half-written."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from .errors import PrunefuseError


def atomic_write_text(path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename over it: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        # mkstemp makes the file 0600; give it the mode a plain open() would (others on
        # shared storage read policies and reports).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write names no file: name it
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


# Limits on a YAML file a user hands over (spaces, policies): a policy with layer-wise
# coefficients is a few hundred KiB at most, so these only stop files meant to hurt.
MAX_YAML_BYTES = 8 << 20
MAX_YAML_NODES = 1_000_000     # scalars and collections after every alias is expanded
MAX_YAML_DEPTH = 100


def read_yaml(path, what: str = "file"):
    """yaml.safe_load of `path`, with a missing, binary, oversized or malformed file as one
    clear PrunefuseError. Aliases are bounded: a file whose expansion would exceed
    MAX_YAML_NODES nodes (an alias bomb) is refused before anything is built from it."""
    path = Path(path)
    if not path.is_file():
        raise PrunefuseError(f"{what} {str(path)!r} not found" if not path.exists() else
                             f"{what} {str(path)!r} is not a file")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise PrunefuseError(f"{path}: {size:,} bytes is too large for a {what} (at most {MAX_YAML_BYTES:,})")
    data = path.read_bytes()
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PrunefuseError(f"{path}: not a text file (binary content); a {what} is YAML text") from None
    try:
        return _load_bounded(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PrunefuseError(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise PrunefuseError(f"{path}: YAML nested too deeply (at most {MAX_YAML_DEPTH} levels)") from None


def _load_bounded(text: str, source: str):
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source, {}, 0)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node, source: str, sizes: dict, depth: int) -> int:
    """Nodes in `node` with every alias expanded; aliases share node objects, so each is
    counted once per reference (memoised by identity: linear in the file, not its expansion)."""
    key = id(node)
    if key in sizes:
        if sizes[key] is None:
            raise PrunefuseError(f"{source}: an alias refers to the mapping or list that contains it")
        return sizes[key]
    if depth > MAX_YAML_DEPTH:
        raise PrunefuseError(f"{source}: YAML nested too deeply (at most {MAX_YAML_DEPTH} levels)")
    sizes[key] = None
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    total = 1 + sum(_expanded_size(n, source, sizes, depth + 1) for n in children)
    if total > MAX_YAML_NODES:
        raise PrunefuseError(f"{source}: its aliases expand to more than {MAX_YAML_NODES:,} values "
                             f"(an alias bomb?); write the values out or use fewer aliases")
    sizes[key] = total
    return total


def validation_message(source: str, exc) -> str:
    """One line from a pydantic ValidationError: where (dotted path), what, and how many more."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling)"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


# --- paths a user gives: checked before anything runs, so a bad one costs nothing ---

MIN_FREE_BYTES = 16 << 20  # below this a search or an apply cannot write its results


def check_plain_name(name, what: str = "experiment name") -> str:
    """One plain path component: never '', '.', '..', a separator or NUL (a name must not
    point outside its storage folder)."""
    if not isinstance(name, str) or name.strip() in ("", ".", "..", "_artifacts", "_orphans") or \
            any(c in name for c in "/\\\0"):
        raise PrunefuseError(f"{what} {name!r} is not a plain name; use letters, digits, '-', '_' or '.', "
                             f"without '/' or '\\\\' (it names one folder inside the storage)")
    return name


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_writable(folder: Path, what: str, path, need_bytes: int) -> None:
    import shutil

    try:
        fd, tmp = tempfile.mkstemp(prefix=".prunefuse-probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise PrunefuseError(f"{what} {str(path)!r} is not writable: {exc.strerror or exc} ({folder})") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise PrunefuseError(f"{what} {str(path)!r}: no space left on its device "
                             f"({free >> 20} MiB free in {folder}, {need_bytes >> 20} MiB needed)")


def check_writable_folder(path, what: str, *, need_bytes: int = MIN_FREE_BYTES, shown=None) -> None:
    """`path` is a folder we may write into, or can be made as one; nothing is created."""
    p, shown = Path(path), str(shown if shown is not None else path)
    if p.exists() and not p.is_dir():
        if shown != str(path):
            raise PrunefuseError(f"{what} {shown!r} cannot be made: {str(path)!r} is a file, not a folder")
        raise PrunefuseError(f"{what} {shown!r} is a file, not a folder")
    existing = _nearest_existing(p)
    if not existing.is_dir():
        raise PrunefuseError(f"{what} {shown!r} cannot be made: {str(existing)!r} is a file, not a folder")
    _probe_writable(existing, what, shown, need_bytes)


def check_writable_file(path, what: str, *, need_bytes: int = 1 << 20) -> None:
    """`path` is a regular file we may replace, or a new file in a folder we may write."""
    p = Path(path)
    if p.is_dir():
        raise PrunefuseError(f"{what} {str(path)!r} is a folder; give a file path")
    if p.exists() and not p.is_file():
        raise PrunefuseError(f"{what} {str(path)!r} is not a regular file (a device or pipe); give a file path")
    check_writable_folder(p.parent, what, need_bytes=need_bytes, shown=path)


# --- paths that may be local folders or pyarrow filesystem URIs (s3://, gs://, ...) ---

def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts]) if is_uri(base) else str(Path(base, *parts))


def write_text(path: str, text: str) -> None:
    if not is_uri(path):
        atomic_write_text(path, text)
        return
    from pyarrow import fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(path)
    parent = inner.rsplit("/", 1)[0]
    if parent:
        try:
            filesystem.create_dir(parent, recursive=True)  # a local file:// URI needs its folders
        except OSError:
            pass  # object stores have no folders to make; a real failure shows in the write below
    with filesystem.open_output_stream(inner) as f:
        f.write(text.encode())


def read_text(path: str, *, what: str = "file") -> str:
    if not is_uri(path):
        p = Path(path)
        if not p.is_file():
            where = p.parent if what == "experiment" else p
            raise PrunefuseError(f"{what} {str(where)!r} not found (no {p.name} there)")
        return p.read_text()
    from pyarrow import fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(path)
    try:
        with filesystem.open_input_stream(inner) as f:
            return f.read().decode()
    except FileNotFoundError:
        raise PrunefuseError(f"{what} {path!r} not found") from None
