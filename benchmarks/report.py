"""How long the HTML report takes to build, and how big it is, for a large experiment.

Builds a synthetic experiment (tests/report_fixtures.py: the real on-disk format) in a temp
dir, times `write_report` (median of --repeats) and prints a markdown table. Targets for
1,000 trials: under 10 s and under 10 MB; exits 1 when a target is missed.

    PYTHONPATH=. .venv/bin/python benchmarks/report.py [--trials 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from report_fixtures import make_experiment  # noqa: E402
from reports.html import write_report  # noqa: E402

MAX_SECONDS, MAX_MB = 10.0, 10.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prunefuse-report-bench-") as root:
        exp = make_experiment(root, args.trials, seed=0, n_failed=args.trials // 50)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = write_report(exp)
            times.append(time.perf_counter() - start)
        seconds, mb = statistics.median(times), out.stat().st_size / 1e6
    print(f"| trials | build s (median of {args.repeats}) | file MB |")
    print("|---:|---:|---:|")
    print(f"| {args.trials:,} | {seconds:.2f} | {mb:.2f} |")
    ok = seconds < MAX_SECONDS and mb < MAX_MB
    print(f"\ntarget < {MAX_SECONDS:g} s and < {MAX_MB:g} MB: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
