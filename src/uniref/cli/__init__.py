"""The ``uniref`` command line: one small module per command group, registered on one Typer app.

Any :class:`~uniref.errors.UniRefError` (bad input) is printed as one line ``error: ...`` on stderr
with exit code 2; usage errors are Typer's own (also exit code 2).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator

import typer

from uniref.errors import UniRefError

app = typer.Typer(
    name="uniref",
    help="UniRef: multi-reference image editing (SELF, SFT, MSGRPO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """UniRef: multi-reference image editing (SELF, SFT, MSGRPO)."""


def _register() -> None:
    # Each command module adds its commands to `app`; imported here so `uniref --help` lists them all.
    from uniref.cli import bench, data, edit, eval, plan, serve, train  # noqa: F401


@contextlib.contextmanager
def warnings_to_stderr() -> Iterator[None]:
    """Show Python warnings (e.g. unknown words for the tiny model) as one ``warning:`` line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                typer.echo(f"warning: {w.message}", err=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except UniRefError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
