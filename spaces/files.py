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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_yaml(path, what: str = "file"):
    """yaml.safe_load of `path`, with a missing file or a syntax error as one clear PrunefuseError."""
    path = Path(path)
    if not path.is_file():
        raise PrunefuseError(f"{what} {str(path)!r} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PrunefuseError(f"{path}: malformed YAML{where}: {problem}") from None


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
