"""What the command line says when something goes wrong, and how Ctrl-C ends it.

- Every failure is one line on stderr: bad input or flags (exit 2), a run that failed
  mid-way (exit 1: what failed, how many chunks are kept, and that ``--resume`` finishes
  the run), an interruption (130, or 143 for SIGTERM). The full traceback only with
  ``--debug`` or ``VOLARRAY_DEBUG=1``.
- Messages are the API's, with each parameter written as the flag the user typed
  (``weights='w.pt'`` becomes ``--weights w.pt``).
- The first Ctrl-C stops the run (its finished chunks are kept); a second one, while the
  first is handled, exits at once with 130. Ctrl-C while the modules load is one line.

Imports nothing heavy: ``volarray/__init__`` calls `quiet_start` before torch loads.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import threading
import warnings


class CLIError(Exception):
    """A problem worth one line on stderr, not a traceback."""


class RunFailed(Exception):
    """A run that stopped on an unexpected error after it began writing; ``line`` says
    what failed and what is kept, ``error`` is the error itself."""

    def __init__(self, line: str, error: BaseException):
        super().__init__(line)
        self.line, self.error = line, error


# parameters whose flag is not --<name with dashes>; None: the API's only
FLAG_OF = {"output": "--output", "tile_step_size": "--step", "mirror": "--no-mirror",
           "crop_nonzero": "--no-crop", "store": None, "volume": None, "dims": None,
           "placement": None, "channel_dim": None, "predictor": None, "multiple": None,
           "cache": None, "VOLARRAY_HEAP": None}  # an environment variable
# values whose flag spells them otherwise (scratch=True is --scratch disk)
VALUE_OF = {("scratch", "True"): "disk", ("scratch", "False"): "memory",
            ("chunks", "None"): "auto", ("roi_size", "None"): "auto"}


def flag_of(parameter: str | None) -> str | None:
    """The command line's name for the API parameter an error names, if it has one."""
    if parameter is None:
        return None
    return FLAG_OF.get(parameter, "--" + parameter.replace("_", "-"))


def debug_wanted(args=None) -> bool:
    """--debug, or VOLARRAY_DEBUG set to anything but 0: show tracebacks."""
    env = os.environ.get("VOLARRAY_DEBUG", "").strip().lower()
    return bool(getattr(args, "debug", False)) or env not in ("", "0", "false", "no")


def error_line(e: BaseException) -> str:
    """``volarray: error: [--flag: ]message``: the flag of the parameter at fault, from
    the error's ``parameter``; the message is the API's with its parameters as flags."""
    flag = flag_of(getattr(e, "parameter", None))
    message = in_flags(str(e))
    named = flag and not (message == flag or message.startswith(flag + " "))  # it names it
    return f"volarray: error: {flag + ': ' if named else ''}{message}"


# a parameter in a message: name=VALUE, optionally followed by "(--flag)"
_VALUE = r"""'[^']*'|"[^"]*"|\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}|[^\s,;:()\[\]{}]+"""
_ASSIGNED = re.compile(rf"(?<![\w.\-/'])([a-z][a-z0-9_]*)=({_VALUE})?(\s*\(--[a-z0-9-]+\))?")
_BARE = re.compile(r"(?<![\w.\-=/'])([a-z][a-z0-9]*(?:_[a-z0-9]+)+)\b(?![=(])")


def in_flags(message: str, options: dict | None = None) -> str:
    """``message`` with each parameter of the API that the command line has as a flag
    written as that flag: ``overwrite=True (--overwrite)`` -> ``--overwrite``,
    ``chunks=(8, 8, 8)`` -> ``--chunks 8,8,8``, ``memory_limit`` -> ``--memory-limit``."""
    if options is None:
        from .cli_parser import option_names
        options = option_names()

    def assigned(m: re.Match) -> str:
        name, value = m.group(1), m.group(2) or ""
        flag = flag_of(name)
        if flag not in options:
            return m.group(0)
        tail = value[-1] if value.endswith(".") and len(value) > 1 else ""
        same = (m.group(3) or "").strip() in ("", f"({flag})")
        apart = options[flag] in ("+", "*")  # --folds 0 1, not --folds 0,1
        return (_as_flag(name, flag, value[:len(value) - len(tail)], apart) + tail
                + ("" if same else m.group(3)))

    def bare(m: re.Match) -> str:
        flag = flag_of(m.group(1))
        return flag if flag in options else m.group(0)

    return _BARE.sub(bare, _ASSIGNED.sub(assigned, message))


def _as_flag(name: str, flag: str, value: str, apart: bool = False) -> str:
    if (name, value) in VALUE_OF:
        return f"{flag} {VALUE_OF[name, value]}"
    if value == "":
        return flag
    if value == "True":
        return flag if not flag.startswith("--no-") else f"no {flag}"
    if value == "False":
        return flag if flag.startswith("--no-") else f"no {flag}"
    if value == "None":
        return f"no {flag}"
    if value[0] in "([" and value[-1] in ")]":  # (64, 128, 128) -> 64,128,128
        value = (" " if apart else ",").join(v.strip() for v in value[1:-1].split(",")
                                             if v.strip())
    elif value[0] in "'\"" and re.fullmatch(r"[\w.,:/+-]+", value[1:-1]):
        value = value[1:-1]  # 'window' -> window; a path with spaces keeps its quotes
    return f"{flag} {value}"


# -- a run that failed mid-way -----------------------------------------------------------

NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def failure_line(error: BaseException, kept: str) -> str:
    """One line for a run stopped by ``error``: what failed (the error, and the line of
    the user's code it came from), then ``kept``, what is left and how to finish."""
    return (f"volarray: error: the run failed: {type(error).__name__}: {first_line(error)}"
            f"{user_code(error)}. {in_flags(kept)} (--debug shows the traceback)")


def what_to_fix(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        return "free disk space (or pass an output on another disk)"
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return "free memory or pass smaller --chunks"
    return "fix the cause"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def _library_dirs() -> tuple[str, ...]:
    import sysconfig
    paths = sysconfig.get_paths()
    here = os.path.dirname(os.path.abspath(__file__))
    return tuple(os.path.realpath(p) + os.sep for p in
                 {paths["stdlib"], paths["purelib"], paths["platlib"], here})


def user_code(error: BaseException) -> str:
    """' at FILE:LINE in FUNCTION (`source`)': the innermost frame of the error's
    traceback in the user's own code (a model's forward), not in a library; '' if none."""
    import traceback
    libraries = _library_dirs()
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith("<")
              and not os.path.realpath(f.filename).startswith(libraries)]
    if not frames:
        return ""
    f = frames[-1]
    where = os.sep.join(f.filename.split(os.sep)[-2:])
    return f" at {where}:{f.lineno} in {f.name} (`{(f.line or '').strip()}`)"


def unexpected_line(error: BaseException) -> str:
    """One line for an error that is nobody's message (a bug, a broken install)."""
    return (f"volarray: error: {type(error).__name__}: {first_line(error)}{user_code(error)} "
            "(--debug shows the traceback)")


@contextlib.contextmanager
def warnings_in_one_line():
    """While a command runs, volarray's own warnings (a plan of too many tasks) print
    as one line with flags, ``volarray: warning: ...``; others as Python prints them."""
    from .errors import VolarrayWarning
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, VolarrayWarning):
                print(f"volarray: warning: {in_flags(str(message))}", file=sys.stderr,
                      flush=True)
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


# -- Ctrl-C ------------------------------------------------------------------------------

STARTING = "volarray: interrupted while starting; nothing was written"


class RunState:
    """The output being written, if any, for the line of a second Ctrl-C."""

    output: str | None = None


RUN = RunState()


def command_line_process() -> bool:
    """True in the process of the ``volarray`` script or ``python -m volarray.cli``."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "volarray.cli":
        return True
    return any(a.startswith("-mvolarray.cli") for a in argv) or \
        os.path.basename(sys.argv[0] if sys.argv else "") == "volarray"


def quiet_start() -> None:
    """In a command-line process, Ctrl-C while the modules load (seconds: torch, dask)
    prints one line and exits with 130 instead of an import traceback; `main`
    takes over once it runs."""
    if threading.current_thread() is not threading.main_thread() or \
            not command_line_process():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupted_while_starting)


def interrupted_while_starting(signum, frame):
    exit_now(STARTING)


def exit_now(line: str | None, code: int = 130):
    """Flush what was printed, say ``line``, and leave without the interpreter's
    teardown (threads still in torch would abort it: 'terminate called ...')."""
    try:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.write(line + "\n" if line else "")
            sys.stderr.flush()
    finally:
        os._exit(code)


def second_interrupt_line() -> str:
    out = RUN.output
    if out is None or ("://" not in out and not os.path.exists(out)):
        return "volarray: stopped at once by a second Ctrl-C; nothing was written"
    return (f"volarray: stopped at once by a second Ctrl-C; the chunks finished in "
            f"{RUN.output!r} are kept: run again with the same arguments and --resume to "
            "compute the rest")


@contextlib.contextmanager
def second_interrupt_exits():
    """While a command runs: the first Ctrl-C raises KeyboardInterrupt (the run stops
    after the tasks in flight and keeps its finished chunks); a second one, while the
    first is handled, exits at once with 130; once the command is over (the process is
    ending), any Ctrl-C exits quietly with 130. The handler stays for the process's
    teardown once a Ctrl-C stopped the command, or in a command-line process; else
    (``main`` called from Python, not interrupted) the previous one comes back. Yields
    a list that holds the signal once a Ctrl-C came."""
    fired, handled = [], []
    if threading.current_thread() is not threading.main_thread():
        yield fired
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # a background job: Ctrl-C is not for this process
        yield fired
        return

    def handler(signum, frame):
        if handled:  # the command is over, the process is ending: end it now
            exit_now(None)
        if fired:
            exit_now(second_interrupt_line())
        fired.append(signum)
        if sys.stderr.isatty():
            sys.stderr.write("\nvolarray: stopping after the tasks in flight; "
                             "Ctrl-C again stops at once\n")
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield fired
    finally:
        handled.append(True)
        if not fired and not command_line_process():
            signal.signal(signal.SIGINT, previous)
