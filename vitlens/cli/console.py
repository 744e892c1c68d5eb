"""Consoles, logging and the one place where :class:`~vitlens.errors.VitlensError` becomes an exit code."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import typer
from rich.console import Console
from rich.markup import escape

from vitlens.errors import Interrupted, ParameterError, VitlensError
from vitlens.log import logger

if TYPE_CHECKING:
    from pathlib import Path

    from vitlens.result import Result


def err_console() -> Console:
    """A console on the current stderr (made per call so test runners that swap streams see the output)."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def out_console() -> Console:
    return Console(highlight=False)


_debug_flag = False  # --debug of the current invocation; set by the app callback on every invocation


def set_debug(enabled: bool) -> None:
    """Record this invocation's ``--debug`` (reset each time, so in-process invocations do not inherit it)."""
    global _debug_flag
    _debug_flag = enabled


def debug_enabled() -> bool:
    return _debug_flag or os.environ.get("VITLENS_DEBUG", "").lower() not in ("", "0", "false", "no")


class _LineHandler(logging.Handler):
    """One record, one line on stderr (``warning: ...``), never wrapped to the terminal's width."""

    _STYLES: ClassVar[dict[str, str]] = {
        "DEBUG": "dim",
        "INFO": "cyan",
        "WARNING": "yellow",
        "ERROR": "bold red",
        "CRITICAL": "bold red",
    }

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = " ".join(self.format(record).split("\n"))
            style = self._STYLES.get(record.levelname, "")
            label = record.levelname.lower()
            err_console().print(f"[{style}]{label}:[/] {escape(message)}", markup=True, highlight=False)
        except Exception:
            self.handleError(record)


def setup_logging(*, quiet: bool = False, verbose: bool = False) -> None:
    """Route the ``vitlens`` logger to stderr, a line per record (warnings always, info with --verbose)."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = _LineHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    # The hub client logs every retry of a failed download; vitlens reports the failure once, in one line.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def fail(message: str, code: int) -> typer.Exit:
    """Print one red line on stderr; return the Exit to raise."""
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    err_console().print(f"[bold red]error:[/] {first}", markup=True, highlight=False)
    return typer.Exit(code)


# Library parameters whose flag is not simply ``--`` + the name with dashes.
PARAMETER_FLAGS = {
    "num_components": "--components",
    "fmt": "--format",
    "layers": "--layer",
    "layers_b": "--layer-b",
    "per_head_layer": "--layer",
    "spec": "--data",  # open_dataset's spec; other arguments holding a spec rename it (errors.spec_named)
    "class_": "--class",  # explain: `class` is a Python keyword
    "checkpoints": "CHECKPOINTS",  # compare: the positional argument
}


def flag_for(param: str) -> str:
    """The CLI flag of a library parameter: ``num_images`` -> ``--num-images``."""
    return PARAMETER_FLAGS.get(param, "--" + param.replace("_", "-"))


def cli_message(error: VitlensError) -> str:
    """The error's message in the CLI's words: a :class:`ParameterError` names the flag, not the parameter."""
    message = str(error)
    if isinstance(error, ParameterError) and error.param:
        message = message.replace(error.param, flag_for(error.param), 1)
    return message


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-caused errors into one line on stderr and an exit code; Ctrl-C into exit 130.

    With ``--debug`` or ``VITLENS_DEBUG=1`` the traceback is kept.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        level = logger.level
        if kwargs.get("quiet"):  # --quiet: errors only, warnings included
            logger.setLevel(logging.ERROR)
        try:
            with torchrun_job(device=str(kwargs.get("device") or "auto")):
                return func(*args, **kwargs)
        except VitlensError as e:
            if debug_enabled():
                raise
            raise fail(_on_rank(cli_message(e)), e.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            raise fail(_on_rank("interrupted"), Interrupted.exit_code) from None
        except Exception as e:
            if torchrun_rank() is None or debug_enabled():  # a single process: a bug keeps its traceback
                raise
            # under torchrun N interleaved tracebacks hide which rank failed: one line each (--debug keeps them)
            raise fail(_on_rank(f"{type(e).__name__}: {e}"), 1) from None
        finally:
            logger.setLevel(level)

    return wrapper


def torchrun_rank() -> int | None:
    """This process's rank when launched by torchrun with more than one process, else None (env only, no torch)."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1"):
        return None
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return None


def _on_rank(message: str) -> str:
    """``message`` prefixed with ``rank R:`` under torchrun (once), so each rank's error line says whose it is."""
    rank = torchrun_rank()
    return message if rank is None or message.startswith("rank ") else f"rank {rank}: {message}"


@contextmanager
def torchrun_job(*, device: str = "auto") -> Iterator[None]:
    """Under torchrun: join the process group for the command (:func:`vitlens.distributed.distributed_context`:
    NCCL when the command's ``--device`` resolves to CUDA, gloo otherwise, so ``--device cpu`` on a GPU node runs
    on gloo), and keep ranks other than 0 silent (no stdout, errors only) unless ``--debug``. Nothing at all
    otherwise."""
    if torchrun_rank() is None:
        yield
        return
    import contextlib

    from vitlens.distributed import distributed_context

    with distributed_context(device=device) as env, contextlib.ExitStack() as stack:
        if env is not None and env.rank != 0 and not debug_enabled():
            level = logger.level
            logger.setLevel(logging.ERROR)
            stack.callback(logger.setLevel, level)
            devnull = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(devnull))
        yield


def save_and_print(
    result: Result,
    out: Path,
    fmt: str,
    meta: dict[str, Any],
    *,
    json_: bool,
    quiet: bool,
    summarise: Callable[[list[Path]], None],
) -> None:
    """The end of every analysis command: ``result.save`` its files, then print the result as JSON (``--json``:
    the payload, the files written and ``meta``) or the command's terminal summary ``summarise(files)``."""
    files = result.save(out, fmt, meta=meta)
    if json_:
        print_json({**result.to_dict(), "files": [str(f) for f in files], "meta": meta})
    elif not quiet:
        summarise(files)


def run_metadata(started: float, **extra: Any) -> dict[str, Any]:
    """Versions, timing and settings that go with every --json result."""
    import platform

    import vitlens

    meta: dict[str, Any] = {
        "vitlens_version": vitlens.__version__,
        "python": platform.python_version(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    for name in ("torch", "timm"):
        mod = sys.modules.get(name)
        if mod is not None:
            meta[f"{name}_version"] = getattr(mod, "__version__", "?")
    meta.update(extra)
    return meta


def print_json(obj: dict[str, Any]) -> None:
    """Write exactly one JSON object to stdout (and nothing else goes there in --json mode)."""
    sys.stdout.write(json.dumps(obj, allow_nan=False) + "\n")
    sys.stdout.flush()


@contextmanager
def progress_bar(description: str, *, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr, yielded as a ``progress(done, total)`` callback (None when disabled).

    Drawn only on a terminal, and transient there, so that it leaves nothing behind: not in a log, not in a
    captured stderr, not before an error line.
    """
    console = err_console()
    if not enabled or not console.is_terminal or (torchrun_rank() or 0) != 0:  # torchrun: rank 0 draws
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
