"""How a CLI command that refuses its input must end: one assertion shared by every CLI test.

Exit code 1, exactly one ``error`` line on stderr that names the problem, no traceback, and
nothing at the target: no output directory, no staging or temporary leftovers beside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rslora_deploy.cli.app import main


def assert_failed_cleanly(
    code: int, err: str, target: Path, *needles: str, only_line: bool = False
) -> str:
    """Assert a finished command failed cleanly; return its error line.

    Args:
        code: the exit code.
        err: everything it wrote to stderr.
        target: the output path that must not exist afterwards.
        needles: substrings the error line must contain.
        only_line: stderr holds nothing but the error line (no log lines either).
    """
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1, err
    if only_line:
        assert [ln for ln in err.splitlines() if ln.strip()] == lines, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not target.exists(), f"{target} exists after a failed command"
    leftovers = [p.name for p in target.parent.glob(f".{target.name}*")]
    assert not leftovers, leftovers
    return lines[0]


def assert_clean_failure(
    argv: list[str], capsys: pytest.CaptureFixture[str], target: Path, *needles: str
) -> str:
    """Run the CLI in-process with ``argv``; assert it failed cleanly (see the module)."""
    code = main(argv)
    return assert_failed_cleanly(code, capsys.readouterr().err, target, *needles)
