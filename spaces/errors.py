"""The one error type a user can cause.

Anything raised as `PrunefuseError` is the user's to fix (a bad file, an unknown
name, an out-of-range value); the CLI prints its message on one line and exits 2.
Everything else is a bug and keeps its traceback.
"""


class PrunefuseError(ValueError):
    """A problem with what the user asked for; the message says what and how to fix it."""


def unknown_name(kind: str, name: str, valid) -> PrunefuseError:
    """`unknown fusion method 'tie'; expected one of: average, ties`."""
    return PrunefuseError(f"unknown {kind} {name!r}; expected one of: {', '.join(sorted(valid))}")
