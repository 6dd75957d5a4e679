"""Part `size` of benchmarks/fusion.py: merging three BERT-base-sized experts (random weights).

Each row runs in its own process (peak RSS is per process): build `BertModel(BertConfig())`
with random init as the base, three experts as base + 0.01 N(0, 1) perturbations of every
float tensor (state dicts only, the models freed), then merge. "before" is `fusion.merge` as
of commit BEFORE (its fusion package read with `git archive`, run unchanged); "after" is the merge of this tree,
twice in one process (a search merges the same experts once per trial: the second merge
shows what the cross-trial cache saves); so is TSV-M's "before", which already cached each task
vector's top singular triplets. Columns: wall seconds and CPU seconds of the merge
(CPU seconds compare rows fairly when other work shares the cores), peak RSS of the process,
and the merge's own part of it (peak RSS minus the RSS before merging: inputs excluded).
Rows: TIES (density 0.2) and task arithmetic before and after; TSV-M, Iso-C and Iso-CTS before
(the fusion package at commit SINGULAR_BEFORE: full SVDs) and after (Gram eigendecompositions,
fusion/cache.py in the 2nd merge). `--size-rows` picks rows (`tsv:after,iso_c`). With --threads 2
the after code runs two keys at a time, each op single-threaded (merge's `_keys_in_parallel`).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "aeab905"  # the last commit with the single-module fusion/__init__.py
SINGULAR_BEFORE = "e49b335"  # main before the singular merges used Gram eigendecompositions
CACHED_BEFORE = {"tsv"}  # its "before" already kept work across merges: that row merges twice too
ROWS = [("ties", "before", {"density": 0.2}), ("ties", "after", {"density": 0.2}),
        ("task_arithmetic", "before", {}), ("task_arithmetic", "after", {}),
        ("tsv", "before", {}), ("tsv", "after", {}), ("iso_c", "before", {}), ("iso_c", "after", {}),
        ("iso_cts", "before", {}), ("iso_cts", "after", {})]


def revision(method: str, variant: str) -> str | None:
    """The commit a "before" row runs (None: this tree)."""
    if variant == "after":
        return None
    return SINGULAR_BEFORE if method in ("tsv", "iso_c", "iso_cts") else BEFORE


def pick_rows(spec: str | None) -> list[tuple[str, str, dict]]:
    """ROWS named by `spec` ("tsv:after,iso_c": a method alone names both its rows); None: all."""
    if not spec:
        return list(ROWS)
    wanted = [w.strip().split(":") for w in spec.split(",") if w.strip()]
    rows = [r for r in ROWS if any(w[0] == r[0] and (len(w) == 1 or w[1] == r[1]) for w in wanted)]
    if not rows:
        raise SystemExit(f"--size-rows {spec!r} names no row; rows are: "
                         f"{', '.join(f'{m}:{v}' for m, v, _ in ROWS)}")
    return rows


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _state_dicts(seed: int):
    import torch

    from mtl_models.models import imports

    transformers = imports.transformers("the real-size merge benchmark")
    BertConfig, BertModel = transformers.BertConfig, transformers.BertModel

    torch.manual_seed(seed)
    base = {k: v.detach().clone() for k, v in BertModel(BertConfig()).state_dict().items()}
    experts = {t: {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in base.items()}
               for t in ("a", "b", "c")}
    return base, experts


def _merge_fn(commit: str | None):
    """`merge` of this tree (None) or of the fusion package at `commit`, imported unchanged under
    the name fusion_before (its relative imports resolve inside the extracted copy)."""
    if commit is None:
        from mtl_models import fusion

        return fusion.merge
    import importlib.util
    import tarfile

    where = Path(tempfile.mkdtemp(prefix="fusion-before-"))
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "mtl_models/fusion"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    (where / "fusion.tar").write_bytes(archive)
    with tarfile.open(where / "fusion.tar") as tar:
        tar.extractall(where, filter="data")
    package = where / "mtl_models" / "fusion"
    spec = importlib.util.spec_from_file_location("fusion_before", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fusion_before"] = module
    spec.loader.exec_module(module)
    return module.merge


def worker(method: str, variant: str, params: dict, threads: int) -> dict:
    """One row, in this process: {seconds: [first, second], peak_gb, merge_gb, inputs_gb}."""
    import torch

    torch.set_num_threads(threads)
    merge = _merge_fn(revision(method, variant))
    base, experts = _state_dicts(0)
    inputs = _rss_gb()
    seconds, cpu = [], []
    twice = variant == "after" or method in CACHED_BEFORE
    for lam in (0.3, 0.5)[:2 if twice else 1]:  # trials: other coefficients, same experts
        start, start_cpu = time.perf_counter(), time.process_time()
        merged = merge(base, experts, method, {t: lam for t in experts}, **params)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        del merged
    return {"seconds": seconds, "cpu_s": cpu, "peak_gb": _peak_gb(), "merge_gb": _peak_gb() - inputs,
            "inputs_gb": inputs}


def run(threads: int, log=print, rows_spec: str | None = None) -> list[dict]:
    rows = []
    for method, variant, params in pick_rows(rows_spec):
        cmd = [sys.executable, __file__, json.dumps([method, variant, params, threads])]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"size row {method}/{variant} failed:\n{out.stderr[-3000:]}")
        commit = revision(method, variant)
        row = {"method": method, "variant": f"{variant} ({commit})" if commit else variant,
               **json.loads(out.stdout.strip().splitlines()[-1])}
        log(f"  {method} {variant}: {row}")
        rows.append(row)
    return rows


def report(rows: list[dict], markdown_table, fmt) -> list[tuple[str, bool, str]]:
    print("\n### Merging at real size: 3 BERT-base experts (random weights), one process per row\n")
    second = lambda values: values[1] if len(values) > 1 else None  # noqa: E731
    print(markdown_table(["method", "code", "wall s (1st trial)", "CPU s (1st)", "wall s (2nd trial)", "CPU s (2nd)",
                          "peak RSS GB", "merge's own RSS GB", "inputs RSS GB"],
                         [[r["method"], r["variant"], fmt(r["seconds"][0], 1), fmt(r["cpu_s"][0], 1),
                           fmt(second(r["seconds"]), 1), fmt(second(r["cpu_s"]), 1),
                           fmt(r["peak_gb"]), fmt(r["merge_gb"]), fmt(r["inputs_gb"])] for r in rows]))
    goals = []
    for method in ("ties", "tsv"):  # the goal (TIES), and TSV-M's time; where both rows ran
        before = next((r for r in rows if r["method"] == method and r["variant"].startswith("before")), None)
        after = next((r for r in rows if r["method"] == method and r["variant"] == "after"), None)
        if before and after:
            goals += _goals(method, before, after)[:3 if method == "ties" else 2]
    return goals


def _goals(method: str, before: dict, after: dict) -> list[tuple[str, bool, str]]:
    """CPU time of the 1st and 2nd merge, the merge's own RSS: after / before <= 1/3."""
    time_ratio = after["cpu_s"][0] / before["cpu_s"][0]
    second_ratio = after["cpu_s"][1] / before["cpu_s"][-1]  # before's own 2nd merge where it merged twice
    memory_ratio = after["merge_gb"] / max(before["merge_gb"], 1e-9)
    return [(f"{method}, 3 BERT-base experts: CPU time after / before ≤ 1/3 (1st merge)", time_ratio <= 1 / 3,
             f"{time_ratio:.2f} (wall {after['seconds'][0]:.1f} vs {before['seconds'][0]:.1f} s, shared machine)"),
            (f"{method}, 3 BERT-base experts: CPU time after / before ≤ 1/3 (2nd merge, same experts)",
             second_ratio <= 1 / 3, f"{second_ratio:.2f} (wall {after['seconds'][1]:.1f} s)"),
            (f"{method}, 3 BERT-base experts: merge's own RSS after / before ≤ 1/3", memory_ratio <= 1 / 3,
             f"{memory_ratio:.2f} (peak {after['peak_gb']:.2f} vs {before['peak_gb']:.2f} GB with the inputs)")]

if __name__ == "__main__":
    method, variant, params, threads = json.loads(sys.argv[1])
    print(json.dumps(worker(method, variant, params, threads)))
