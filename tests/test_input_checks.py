"""Hostile and careless input through the real console script: every case ends in one line and
exit 2, before Ray starts or anything trains, with every file that was there unchanged."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from conftest import run_cli
from report_fixtures import make_experiment

# 9 ** 8 = 43 million values from 80 lines: refused before a single one is built
ALIAS_BOMB = "  x0: &a0 [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]\n" + "".join(
    f"  x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))


def one_line(code, err) -> str:
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunefuse: error:"), err[-2000:]
    return lines[0]


def snapshot(root: Path) -> dict:
    """path -> sha256 of every file under root (what 'unchanged' means)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def console(tmp_path, *args, timeout=120):
    """The real console script in a subprocess: (exit code, stderr)."""
    started = time.time()
    code, out, err = run_cli(*args, cwd=tmp_path, timeout=timeout)
    assert "started an embedded local Ray" not in out, "Ray started before the input was checked"
    assert time.time() - started < 60, "a bad input took over a minute to refuse"
    return code, err


@pytest.fixture
def cli(capsys):
    """The CLI's `main` in this process: the code the console script runs, without a fresh
    interpreter per case (the console script itself is used once per class of input)."""
    from search.cli import main

    def run(cwd, *args):
        here = os.getcwd()
        os.chdir(cwd)
        try:
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's own mistakes
                code = exc.code
        finally:
            os.chdir(here)
        captured = capsys.readouterr()
        assert "started an embedded local Ray" not in captured.out, "Ray started before the input was checked"
        return code, captured.err
    return run


@pytest.fixture
def land(tmp_path):
    """A working folder with a file, a folder, and a policy / report where `--name ..` would land."""
    (tmp_path / "afile").write_text("keep\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "policy.yaml").write_text("mine\n")
    (tmp_path / "report.html").write_text("mine\n")
    return tmp_path


@pytest.mark.parametrize("args, words", [
    (["--name", ".."], "'..' is not a plain name"),
    (["--name", "../x"], "'../x' is not a plain name"),
    (["--name", "a/b"], "'a/b' is not a plain name"),
    (["--name", ""], "'' is not a plain name"),
    (["--resume", ".."], "--resume '..' is not a plain name"),
    (["--storage", "afile"], "--storage 'afile' is a file, not a folder"),
    (["--storage", "afile/runs"], "'afile' is a file, not a folder"),
    (["--time-budget", "nan"], "--time-budget: 'nan' is not a finite number"),
    (["--time-budget", "inf"], "--time-budget: 'inf' is not a finite number"),
    (["--cpus-per-trial", "nan"], "'nan' is not a finite number"),
    (["--max-concurrent", "0"], "--max-concurrent 0"),
    (["--max-task-drop", "-1"], "--max-task-drop -1.0"),
    (["--objectives", "params:min,params:min"], "params given more than once"),
    (["--objectives", "metric/nope:max,params:min"], "has no task 'nope'; its tasks: left, right, sum"),
    (["--suite-option", "train_pairs=100000000000"], "GiB of memory is free"),
    (["--suite-option", "offset=.nan"], "expected a finite number"),
    (["--train-option", "lr=.inf"], "--train-option 'lr=.inf': expected a finite number"),
])
def test_bad_search_flags(land, cli, args, words):
    before = snapshot(land)
    line = one_line(*cli(land, "search", "--storage", "runs", *args))
    assert words in line, line
    assert snapshot(land) == before and not any((land / "runs").iterdir())


@pytest.mark.parametrize("changes, words", [
    ({"name": ".."}, "'..' is not a plain name"),
    ({"time_budget_s": float("nan")}, "--time-budget nan: expected a finite number"),
    ({"max_concurrent": 0}, "--max-concurrent 0"),
    ({"max_task_drop": -0.5}, "--max-task-drop -0.5"),
    ({"objectives": [("params", "min"), ("params", "max")]}, "params given more than once"),
    ({"train": {"lr": float("inf")}}, "training lr=inf"),
    ({"sampler": "grid"}, "unknown sampler 'grid'"),
    ({"trials": None}, "needs --trials N or --time-budget S"),
    ({"retries": -1}, "--retries -1"),
    ({"colour": "red"}, "'colour' is not a setting"),
])
def test_search_config_checks_every_caller(changes, words):
    """`run_search` called from Python (as benchmarks/overhead.py does) gets the CLI's checks:
    SearchConfig validates where it is built, and stays frozen after."""
    from search.config import SearchConfig
    from spaces.errors import PrunefuseError

    with pytest.raises(PrunefuseError) as info:
        SearchConfig(**{"name": "x", **changes})
    assert words in str(info.value)
    cfg = SearchConfig(name="x")
    with pytest.raises(Exception):
        cfg.trials = 3
    with pytest.raises(PrunefuseError, match="--max-concurrent 0"):
        cfg.replace(max_concurrent=0)


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs: not writable even by root (skipped where mounting is not allowed)."""
    import subprocess

    where = tmp_path / "ro"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_read_only_storage(land, cli, read_only_folder):
    assert "is not writable" in one_line(*cli(land, "search", "--storage", read_only_folder / "runs"))


@pytest.mark.parametrize("text, words", [
    (b"pruning:\n" + ALIAS_BOMB.encode(), "aliases expand to more than"),
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not a text file (binary content)"),
    (b"pruning: {sparsity: {low: .nan, high: 0.5}}\n", "pruning.sparsity"),
    (b"pruning: {sparsity: [0.1, .inf]}\n", "pruning.sparsity"),
])
def test_bad_space_files(land, cli, text, words):
    (land / "space.yaml").write_bytes(text)
    before = snapshot(land)
    line = one_line(*cli(land, "search", "--storage", "runs", "--space", "space.yaml"))
    assert words in line, line
    assert snapshot(land) == before


POLICY = ("schema: prunefuse.policy/1\nsuite: {name: multidigits, train_pairs: 300, val_pairs: 100, test_pairs: 100}\n"
          "model: {trunk: mlp, width: 32, depth: 2}\n")


@pytest.mark.parametrize("text, words", [
    ((POLICY + "fusion: {method: ties, coefficients: {left: .nan, right: 1.0, sum: 1.0}}\n").encode(),
     "fusion.coefficients"),
    ((POLICY + "finetune: {lr: .inf}\n").encode(), "finetune.lr"),
    ((POLICY + "provenance:\n" + ALIAS_BOMB).encode(), "aliases expand to more than"),
    (b"\x00\x01\x02binary policy", "not a text file (binary content)"),
])
def test_bad_policy_files(land, cli, text, words):
    (land / "p.yaml").write_bytes(text)
    before = snapshot(land)
    line = one_line(*cli(land, "apply", "p.yaml", "-o", "model"))
    assert words in line, line
    assert snapshot(land) == before and not (land / "model").exists()


@pytest.mark.parametrize("args, words", [
    (["export", "EXP", "--knee", "-o", "adir"], "-o 'adir' is a folder"),
    (["export", "EXP", "--knee", "-o", "/dev/full"], "not a regular file"),
    (["export", "EXP", "--knee", "-o", "afile/p.yaml"], "'afile' is a file, not a folder"),
    (["export", "EXP", "--max-params", "nan", "-o", "p.yaml"], "'nan' is not a finite number"),
    (["report", "EXP", "-o", "adir"], "-o 'adir' is a folder"),
    (["apply", "EXP/policy.yaml", "-o", "afile"], "'afile' exists and is not a saved prunefuse model"),
    (["apply", "EXP/policy.yaml", "-o", "m", "--cache", "afile"], "--cache 'afile' is a file, not a folder"),
])
def test_bad_output_paths(land, cli, args, words):
    exp = make_experiment(land / "runs", 4)
    (exp / "policy.yaml").write_text(POLICY)
    before = snapshot(land)
    line = one_line(*cli(land, *[a.replace("EXP", str(exp)) for a in args]))
    assert words in line, line
    assert snapshot(land) == before


def test_base_checkpoint_of_nan_weights(land):
    import torch

    from mtl_models import suites

    model = suites.get("multidigits", train_pairs=300, val_pairs=100, test_pairs=100).build_model(trunk="mlp")
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, land / "base.pt")
    line = one_line(*console(land, "search", "--storage", "runs", "--base-checkpoint", "base.pt",
                         "--suite-option", "train_pairs=300"))
    assert "holds NaN or inf values" in line
    assert not any((land / "runs").iterdir())


def test_a_damaged_trial_reads_as_unreadable(land):
    exp = make_experiment(land / "runs", 6)
    trials = sorted(exp.glob("trial_*"))
    (trials[0] / "result.json").write_bytes(b"\x00\xff\xfe binary garbage")
    (trials[1] / "params.json").write_text("{not json")
    damaged = {t.name.removeprefix("trial_") for t in trials[:2]}
    before = snapshot(land)
    code, out, err = run_cli("report", exp, "-o", land / "r.html", cwd=land)
    assert code == 0, err[-2000:]
    html = (land / "r.html").read_text()
    assert all(t in html for t in damaged) and "unreadable: result.json is not text" in html
    assert "unreadable: params.json is not JSON" in html
    line = one_line(*console(land, "export", exp, "--trial", trials[0].name.removeprefix("trial_"), "-o", "p.yaml"))
    assert "unreadable: result.json is not text" in line
    code, out, err = run_cli("export", exp, "--knee", "-o", land / "p.yaml", cwd=land)
    assert code == 0, err[-2000:]  # the other trials still export
    after = snapshot(land)
    after.pop("r.html"), after.pop("p.yaml")
    assert after == before


def test_resume_of_a_finished_search_touches_nothing(land):
    exp = make_experiment(land / "runs", 4, name="done")
    before = {**snapshot(land), "mtimes": json.dumps(sorted((str(p), p.stat().st_mtime) for p in land.rglob("*")))}
    code, out, err = run_cli("search", "--resume", "done", "--storage", land / "runs", cwd=land)
    assert code == 0, err[-2000:]
    assert "had finished already; nothing to resume, nothing changed" in out and len(out.strip().splitlines()) == 1
    after = {**snapshot(land), "mtimes": json.dumps(sorted((str(p), p.stat().st_mtime) for p in land.rglob("*")))}
    assert after == before and exp.is_dir()


@pytest.mark.parametrize("args, words", [
    (["search", "--storage", "runs", "--name", ".."], "'..' is not a plain name"),
    (["search", "--storage", "afile"], "--storage 'afile' is a file, not a folder"),
    (["search", "--storage", "runs", "--time-budget", "nan"], "'nan' is not a finite number"),
    (["search", "--storage", "runs", "--space", "bomb.yaml"], "aliases expand to more than"),
    (["apply", "nan.yaml", "-o", "model"], "fusion.coefficients"),
    (["export", "EXP", "--knee", "-o", "adir"], "-o 'adir' is a folder"),
])
def test_each_class_through_the_console_script(land, args, words):
    """One case of each class of input above, through the installed `prunefuse` script."""
    exp = make_experiment(land / "runs", 2)
    (land / "bomb.yaml").write_text("pruning:\n" + ALIAS_BOMB)
    (land / "nan.yaml").write_text(POLICY + "fusion: {method: ties, coefficients: {left: .nan, right: 1, sum: 1}}\n")
    before = snapshot(land)
    assert words in one_line(*console(land, *[a.replace("EXP", str(exp)) for a in args]))
    assert snapshot(land) == before and not (land / "model").exists()


def test_a_second_driver_is_refused_while_one_holds_the_experiment(land):
    """Two searches of one name started together: the one that does not hold the folder's lock
    (held here by this test process, as a running driver holds it) refuses in one line."""
    from search.claim import claimed

    exp = land / "runs" / "busy"
    with claimed(exp):
        before = snapshot(land)
        line = one_line(*console(land, "search", "--storage", "runs", "--name", "busy", "--objectives", "params:min"))
        assert f"is being written by another search (pid {os.getpid()} on" in line, line
        assert snapshot(land) == before
    with claimed(exp):  # released when its holder let go (or died)
        pass


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    import subprocess

    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_a_full_disk_is_one_line(land, cli, small_disk):
    """Too little space is found before anything runs; a write that fills the disk later ends in
    one line naming the file and the reason, not a traceback, and leaves no partial file."""
    line = one_line(*cli(land, "search", "--storage", small_disk / "runs"))
    assert "no space left on its device" in line, line
    exp = make_experiment(land / "runs", 4)
    (small_disk / "filler").write_bytes(b"\0" * (2 << 20 | 512 << 10))  # leaves ~1.5 MiB: less than a report
    line = one_line(*cli(land, "report", exp, "-o", small_disk / "r.html"))
    assert "r.html" in line and "no space left on the device" in line, line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_resume_of_a_uri_experiment_refuses_before_ray(land, cli):
    make_experiment(land / "uri", 2, name="u", finished=False)
    before = snapshot(land)
    line = one_line(*cli(land, "search", "--resume", "u", "--storage", f"file://{land / 'uri'}"))
    assert "--resume needs the experiment on a local or shared folder" in line
    assert snapshot(land) == before
