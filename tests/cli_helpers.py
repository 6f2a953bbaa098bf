"""Running the ``uniref`` command in-process for tests."""

from __future__ import annotations

import pytest

from uniref.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``uniref ARGS``, exactly as the console script would end."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
