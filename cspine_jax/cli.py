"""What every command-line entry point shares: errors as one line, exit status 1.

A user's mistake (a config file that does not exist, a misspelt `--config.` field, a folder
that is not there, bad data) is reported as `<prog>: error: <what>: <problem>` on stderr,
without a traceback: the line names the file, folder or flag, which is all the user needs.
A bug still raises with its traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from cspine_jax import metrics, systems
from cspine_jax.data import cache, dicom, rsna

# Exceptions whose message names the file or flag at fault: a user's error, not a bug.
USER_ERRORS = (
    rsna.DatasetError,
    cache.CacheError,
    dicom.DicomError,
    FileNotFoundError,
    NotADirectoryError,
    FloatingPointError,
    systems.ConfigError,
    metrics.ThresholdsError,
)


def fail(prog: str, message: object) -> None:
    """Prints `<prog>: error: <message>` as one line on stderr and exits with status 1."""
    text = " ".join(str(message).split())  # one line, whatever the exception held
    print(f"{prog}: error: {text}", file=sys.stderr)
    sys.exit(1)


def _config_override(argv: Sequence[str], key: str) -> str:
    """The `--config.a.b` argument whose last field is `key`, else `--config.<...>.key`."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--config.") and name.rsplit(".", 1)[-1] == key:
            return name
    return f"--config.<...>.{key}"


def _flag_error(error: Exception, argv: Sequence[str]) -> str:
    """One line for an error raised while parsing the flags or loading `--config`."""
    # ml_collections raises AttributeError(KeyError("'step'\nDid you mean \"steps\" ...")).
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    message = str(error.args[0]) if error.args else str(error)
    if isinstance(error, AttributeError | KeyError):
        key = message.split("\n")[0].strip("'\"")
        hint = re.search(r'Did you mean "([^"]+)"', message)
        name = _config_override(argv, key)
        return f"{name}: no such config field" + (
            f' (did you mean "{hint.group(1)}"?)' if hint else ""
        )
    if isinstance(error, OSError) and "Failed loading config file" in message:
        path = re.search(r"Attempted \[[^\]]*\]:\s*(\S+)", message)
        return f"--config={path.group(1) if path else '?'}: no such config file"
    return message


def parser(prog: str) -> Callable[[list[str]], list[str]]:
    """An absl `flags_parser` reporting flag and config errors as one line."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, OSError, ValueError) as e:
            fail(prog, _flag_error(e, argv))

    return parse


def run(main: Callable[[list[str]], object], prog: str) -> None:
    """`app.run(main)` with flag errors and `USER_ERRORS` reported as one line."""

    def guarded(argv: list[str]) -> object:
        try:
            return main(argv)
        except USER_ERRORS as e:
            fail(prog, e)

    app.run(guarded, flags_parser=parser(prog))


def config(prog: str) -> object:
    """`--config`, loaded: a config file that cannot be read is a one-line error."""
    try:
        config = flags.FLAGS.config
        config.keys()  # a config that failed to load raises on first use
        return config
    except (OSError, AttributeError, KeyError) as e:
        fail(prog, _flag_error(e, sys.argv))
