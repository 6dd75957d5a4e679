"""Every benchmark still runs end to end (tiny settings) and prints its tables.

The numbers in README come from full runs; these only keep the scripts from rotting when the
code they call changes (a renamed helper once broke benchmarks/overhead.py unnoticed).
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RUNS = {
    "pruning": ["--seeds", "0", "--trials", "2", "--epochs", "0.3", "--rounds", "1", "--cache", "{tmp}"],
    "fusion": ["--suites", "synthetic-conflict", "--seeds", "0", "--trials", "3", "--epochs", "1",
               "--expert-epochs", "0.5", "--bn-train-pairs", "300", "--bn-epochs", "0.5", "--cache-dir", "{tmp}"],
    "weighting": ["--ps", "0.5", "--seeds", "0", "--trials", "2", "--epochs", "1", "--train-samples", "500",
                  "--eval-samples", "200", "--jobs", "1", "--cache-dir", "{tmp}"],
    "overhead": ["--tiny", "--trials", "3", "--variants", "a,b", "--cache", "{tmp}"],
    "report": ["--trials", "50", "--repeats", "1"],
    "search": ["--quick", "--cache", "{tmp}", "--out", "{tmp}/search.html"],
    "deploy": ["--quick", "--cache", "{tmp}"],
    "distill": ["--quick", "--cache", "{tmp}"],
    "data": ["--quick", "--cache", "{tmp}"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_runs_and_prints_a_table(name, tmp_path):
    args = [a.format(tmp=tmp_path) for a in RUNS[name]]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert any(set(line) <= set("|-: ") for line in rows), proc.stdout[-2000:]  # a markdown table's rule
    assert len(rows) >= 3
