"""On a machine with an NVIDIA GPU: measured device memory of a t4-2gb package against its estimate.

    pip install nvidia-ml-py onnxruntime-gpu onnxruntime-genai-cuda   # the CUDA builds
    python benchmarks/gpu_budget_check.py PACKAGE [--lengths 512 2048] [--out JSON]

PACKAGE is a package built for a CUDA profile (``rslora-deploy build --profile t4-2gb``; build it
on any machine, copy it over). For each max_length the two probes of ``budget --measure`` run in
their own child processes: the CUDA context + provider alone (an onnxruntime CUDA EP session of a
one-node graph), then the package's worst case (prompt of max_length - 16 tokens, greedy decode to
max_length). Device memory is read with NVML every 2 ms in the probe, minus the reading taken before
the probe touched the GPU, so other processes' memory is not counted unless it changes meanwhile.
Each probe takes seconds; the whole check well under 5 minutes. It prints measured vs estimate and
the reserved term a profile should carry for this GPU (its context reading, device and driver).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MIB = 2**20


def check(package: Path, profile_name: str, lengths: list[int]) -> list[dict[str, Any]]:
    """Estimate and NVML measurement at each max_length (refuses when no GPU can be read)."""
    from rslora_deploy.cli.budget_cmd import price, resolve_target
    from rslora_deploy.memory.measure import measure_package, require_device
    from rslora_deploy.profiles import load_profile

    profile = load_profile(profile_name)
    require_device(profile.device.value)  # one line naming the device when there is none
    target = resolve_target(package, 4, 64)
    if target.onnx_dir is None:
        raise SystemExit(f"{package} is not a package or an onnxruntime-genai folder")
    rows = []
    for length in lengths:
        report, _, _ = price(target, profile, length, None)
        measured = measure_package(target.onnx_dir, profile, max_length=length)
        rows.append({"max_length": length, "estimate": report, "measured": measured})
    return rows


def show(rows: list[dict[str, Any]]) -> str:
    """A table: estimate terms, measured context and peak, ratio."""
    first = rows[0]["measured"]
    lines = [
        f"device: {first['device']}, driver {first['driver']}, runtime {first['runtime']}",
        f"{'max_length':>10} {'estimate':>10} {'reserved':>10} {'context':>10} {'peak':>10} "
        f"{'model part':>10} {'est/meas':>9}  (MiB)",
    ]
    for row in rows:
        est, probes = row["estimate"], row["measured"]["probes_bytes"]
        model_terms = est["estimate_bytes"] - est["terms_bytes"]["reserved"]
        lines.append(
            f"{row['max_length']:>10} {est['estimate_bytes'] / MIB:>10.1f} "
            f"{est['terms_bytes']['reserved'] / MIB:>10.1f} {probes['context'] / MIB:>10.1f} "
            f"{probes['worst_case_peak'] / MIB:>10.1f} "
            f"{row['measured']['model_dependent_bytes'] / MIB:>10.1f} "
            f"{est['estimate_bytes'] / probes['worst_case_peak']:>9.3f}"
        )
        lines.append(
            f"{'':>10} model terms {model_terms / MIB:.1f} MiB vs measured model part "
            f"{row['measured']['model_dependent_bytes'] / MIB:.1f} MiB"
        )
    context = max(r["measured"]["probes_bytes"]["context"] for r in rows)
    lines.append(
        f"reserved_source row for this GPU: device={first['device']!r} driver={first['driver']!r} "
        f"bytes={context}"
    )
    return "\n".join(lines)


def main() -> None:
    """Parse, check, print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("package", type=Path)
    parser.add_argument("--profile", default="t4-2gb")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--out", type=Path, default=Path("gpu_budget_check.json"))
    args = parser.parse_args()
    from rslora_deploy.errors import RsloraDeployError

    try:
        rows = check(args.package, args.profile, args.lengths)
    except RsloraDeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(show(rows))


if __name__ == "__main__":
    main()
