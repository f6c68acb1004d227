"""User errors: one line naming the culprit and the fix, a non-zero exit, no traceback.

Library code raises ``UserError`` (or a subclass, e.g. ``ConfigError``) for a mistake the
user can fix; its message is one line that names what is wrong and what to do. Every
console script runs its body through ``run_cli``, which turns a ``UserError`` into
``PROG: error: MESSAGE`` on stderr and exit status 2. A traceback is shown only when the
command line asks for one with ``--verbosity`` (or ``-v``). Any other exception is a bug
and keeps its traceback.

Command lines built on argparse use ``ArgumentParser`` from here, so a bad flag is a
``UserError`` as well (one line, with the closest valid flags).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Callable, Iterable, NoReturn, Sequence

EXIT_USER_ERROR = 2  # argparse's status for usage errors; every clipjax command uses it for user errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C


class UserError(Exception):
    """A mistake the user can fix; ``str(e)`` names the culprit and the fix in one line."""


class ConfigError(UserError, ValueError):
    """A config field, config argument or config file is wrong (a ``ValueError`` for older callers)."""


def _initials(name: str) -> str:
    return "".join(word[:1] for word in name.split("_") if word)


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``choices`` close to ``name``: spelling (difflib) or initials (learning_rate ~ lr)."""
    choices = list(dict.fromkeys(choices))
    by_initials = [c for c in choices if c != name and (_initials(name) == c or _initials(c) == name)]
    by_spelling = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    return list(dict.fromkeys(by_initials + by_spelling))[:n]


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """``"; did you mean a or b?"`` for the closest ``choices``, ``""`` when none is close."""
    hits = closest(name, choices, n)
    return f"; did you mean {' or '.join(hits)}?" if hits else ""


def one_line(message: str) -> str:
    """Joins a multi-line message into one line."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def wants_traceback(argv: Sequence[str]) -> bool:
    """True when the command line carries ``--verbosity`` / ``-v`` (absl's verbosity flag)."""
    return any(a in ("-v", "--verbosity") or a.startswith(("--verbosity=", "-v=")) for a in argv)


def run_cli(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs ``main(argv)`` and returns its exit status; a ``UserError`` becomes one line on stderr.

    stdout is flushed at every newline, also when it is a file or a pipe (a log a person
    tails, a job scheduler): progress must appear as it happens, not a buffer later.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)
    try:
        return int(main(argv) or 0)
    except BrokenPipeError:  # `clipjax-train --help | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UserError as e:
        if wants_traceback(argv):
            raise
        sys.stdout.flush()
        print(f"{prog}: error: {one_line(str(e))}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C before the command installs its own handling (compiling, converting)
        if wants_traceback(argv):
            raise
        sys.stdout.flush()
        print(f"{prog}: interrupted (Ctrl-C); what was complete is kept, rerun to continue", file=sys.stderr,
              flush=True)
        return EXIT_INTERRUPTED


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are ``UserError``s: one line, the closest valid flags, ``PROG --help``.

    Also accepts ``--verbosity`` (``run_cli``: tracebacks). ``doc=__doc__``: the module docstring is the --help text.
    """

    def __init__(self, *args, doc: str | None = None, **kwargs):
        if doc is not None:
            description, _, epilog = doc.strip().partition("\n\n")
            kwargs.update(description=description, epilog=epilog or None,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--verbosity", "-v", nargs="?", const="1", default=None, help="show the traceback of an error")

    def _flags(self) -> list[str]:
        """Long flags of this parser and of its sub-commands."""
        flags = [s for s in self._option_string_actions if s.startswith("--")]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags += sub._flags() if isinstance(sub, ArgumentParser) else []
        return flags

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        # An unknown flag explains the other errors it causes ("--input" leaves "--csv" missing).
        known = set(self._flags())
        for arg in args:
            name = arg.split("=", 1)[0]
            if name.startswith("--") and name != "--" and name not in known:
                self.error(f"unrecognized argument {arg!r}{did_you_mean(name, known)}")
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized argument {extra[0]!r}")
        return parsed

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{one_line(message)} (see {self.prog} --help)")
