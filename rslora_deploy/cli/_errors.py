"""Map exceptions to one line on stderr and an exit code (huggingface_hub ``cli/_errors.py`` idea).

Exit codes: 0 success; 1 any failure; 2 usage error; 3 built but over the memory budget.
A traceback is printed only with ``RSLORA_DEPLOY_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
import traceback

from rslora_deploy.errors import RsloraDeployError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_OVER_BUDGET = 0, 1, 2, 3


def debug_enabled() -> bool:
    """Whether ``RSLORA_DEPLOY_DEBUG`` asks for tracebacks."""
    return os.environ.get("RSLORA_DEPLOY_DEBUG", "") not in ("", "0", "false")


def report(exc: BaseException) -> int:
    """Print ``exc`` as one line (plus a traceback in debug mode) and return the exit code."""
    if debug_enabled():
        traceback.print_exception(exc)
    if isinstance(exc, RsloraDeployError):
        code = f"error {exc.code}: " if exc.code else "error: "
        print(f"{code}{exc.message}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        print("error: interrupted; nothing was written at the output path", file=sys.stderr)
        return EXIT_FAILURE
    if isinstance(exc, MemoryError):
        print("error: out of memory; use a smaller calibration set or model", file=sys.stderr)
        return EXIT_FAILURE
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    print(
        f"error: internal {type(exc).__name__}: {first} (rerun with RSLORA_DEPLOY_DEBUG=1 for "
        "the traceback and report it)",
        file=sys.stderr,
    )
    return EXIT_FAILURE
