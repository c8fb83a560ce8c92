"""What every command-line entry point does (``python -m lightning_app``, ``python -m lightning_app.robustness``,
``python -m converters``):

* known third-party noise is filtered: Lightning's litlogger tip, the ``LeafSpec`` deprecation that torch raises
  from inside Lightning;
* a :class:`~lightning_app.errors.UserError`, raised directly or wrapped by jsonargparse or Lightning (the
  ``__cause__`` / ``__context__`` chain is searched), is printed as one paragraph, ``<kind>: <message>``, with exit
  code 2 and no traceback. A class that jsonargparse could not build from the configuration (a plain ``ValueError``
  from torch, say) is reported the same way, naming the class. Anything else keeps its traceback (a bug).
  ``--debug`` on the command line or ``LIGHTNING_APP_DEBUG=1`` shows the traceback in every case;
* a run stopped by SIGTERM or Ctrl+C (:class:`lightning_app.checkpoint.ModelCheckpoint` turns a first Ctrl+C into
  Lightning's graceful SIGTERM stop) ends with one line saying where ``last.ckpt`` resumes, exit code 143 / 130;
* after a run that finished, the ``torch.distributed`` process group a DDP run left is destroyed
  (:func:`close_process_group`).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Callable, List, Optional, Sequence, TypeVar

from lightning_app.errors import ConfigError, UserError

DEBUG_ENV = "LIGHTNING_APP_DEBUG"
DEBUG_FLAG = "--debug"
T = TypeVar("T")

#: (logger name, substring) of log records that are advertising or noise, never information about the run
_NOISY_RECORDS = (("pytorch_lightning.utilities.rank_zero", "litlogger"),
                  ("lightning.pytorch.utilities.rank_zero", "litlogger"))
#: regexes of warnings raised by third-party code about third-party code
_NOISY_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",)
_UNION_FAILURE = "Does not validate against any of the Union subtypes"


class _DropNoise(logging.Filter):
    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


def filter_noise() -> None:
    """Drop known third-party noise (idempotent; the filters live on the named loggers and in ``warnings``)."""
    for name, needle in _NOISY_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) and f.needle == needle for f in logger.filters):
            logger.addFilter(_DropNoise(needle))
    for message in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def debug_requested() -> bool:
    """Whether tracebacks were asked for (``LIGHTNING_APP_DEBUG`` set to anything but ``0`` / empty)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def pop_debug_flag(argv: Sequence[str]) -> List[str]:
    """``argv`` without ``--debug``; when it was there, sets ``LIGHTNING_APP_DEBUG=1`` (inherited by DDP ranks)."""
    argv = list(argv)
    if DEBUG_FLAG in argv:
        argv = [a for a in argv if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"
    return argv


def _chain(exc: BaseException) -> List[BaseException]:
    seen, out = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def user_error_in(exc: BaseException) -> Optional[UserError]:
    """The first :class:`UserError` in ``exc``'s cause / context chain, or one made for a class jsonargparse could not
    build from the configuration; ``None`` for anything else."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, UserError):
            return e
    if str(exc).startswith(_UNION_FAILURE) and len(chain) > 1:
        cause = chain[-1]
        match = re.search(r"class_path='([\w.]+)'", str(exc))
        what = f"could not build {match.group(1)} from the configuration" if match else "invalid configuration"
        return ConfigError(f"{what}: {type(cause).__name__}: {cause}. Fix that setting (python -m lightning_app "
                           f"<subcommand> --config ... --print_config shows them all).")
    return None


def format_user_error(err: UserError) -> str:
    hint = f" (add {DEBUG_FLAG} or set {DEBUG_ENV}=1 for the traceback)"
    return f"{getattr(err, 'kind', 'error')}: {str(err).rstrip()}{hint}"


def run(main: Callable[[Optional[List[str]]], T], argv: Optional[Sequence[str]] = None) -> T:
    """Call ``main(argv)`` with ``--debug`` removed (from ``sys.argv`` itself when ``argv`` is ``None``: DDP
    re-executes ``sys.argv`` for the other ranks), noise filtered and user errors printed as one paragraph
    (exit code 2)."""
    if argv is None:
        sys.argv[1:] = pop_debug_flag(sys.argv[1:])
    else:
        argv = pop_debug_flag(argv)
    filter_noise()
    try:
        result = main(argv)
    except BaseException as exc:  # noqa: BLE001 - re-raised unless it is a user error or an interruption
        if type(exc).__name__ == "SIGTERMException" and not debug_requested():
            # Lightning's graceful stop (SIGTERM, or a first Ctrl+C: lightning_app.checkpoint), a SystemExit
            note = getattr(exc, "lightning_app_note", "") or "stopped by SIGTERM"
            print(note, file=sys.stderr)
            raise SystemExit(130 if "Ctrl+C" in note else 143) from None
        if debug_requested() or isinstance(exc, SystemExit):
            raise
        err = user_error_in(exc)
        if err is None:
            raise
        print(format_user_error(err), file=sys.stderr)
        raise SystemExit(2) from None
    close_process_group()
    return result


def close_process_group() -> None:
    """Destroy the default ``torch.distributed`` process group, if one is initialised. Lightning does so at exit only
    for NCCL; a gloo group (DDP on CPUs) left to the interpreter's teardown sometimes aborted the process after a
    finished run: "terminate called without an active exception", exit code -6 (pytorch/pytorch#190489; 2 of about
    10 runs of this project's 2-process DDP test). Called only after a run that finished: after an error another
    rank may still be waiting in a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DEBUG_ENV", "DEBUG_FLAG", "close_process_group", "debug_requested", "filter_noise", "format_user_error",
           "pop_debug_flag", "run", "user_error_in"]
