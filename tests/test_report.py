"""The HTML report on synthetic experiments in the real on-disk format (no browser; see
test_report_browser.py for rendering)."""
from __future__ import annotations

import html
import json
import os
import re

import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from reports import html as report_html
from reports import select
from reports.experiment import load_experiment
from reports.html import DEFAULT_LATENCY, build_report, write_report
from report_fixtures import OBJECTIVES, make_experiment
from spaces.errors import PrunefuseError

PLOTLY_MARKER = "* plotly.js v"  # the bundle's licence header: once per inlined copy
SECTIONS = ("summary", "pareto", "pareto-3d", "hypervolume", "knobs", "sparsity", "tasks", "front", "failed")
EXTERNAL = re.compile(r"""<(script|link|img|iframe|source)\b[^>]*\b(src|href)\s*=\s*["']?\s*(https?:)?//""", re.I)


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return make_experiment(tmp_path_factory.mktemp("report"), 40, seed=3, n_failed=3)


@pytest.fixture(scope="module")
def page(exp):
    return build_report(exp)


def _figures(page: str) -> int:
    return page.count('class="plotly-graph-div"')


def _section(page: str, sid: str) -> str:
    """The HTML of one section (up to the next one)."""
    return page.split(f'id="{sid}"', 1)[1].split("<section ", 1)[0]


def _without_plotlyjs(page: str) -> str:
    return page.replace(get_plotlyjs(), "")


def test_plotlyjs_inlined_exactly_once(page):
    assert page.count(PLOTLY_MARKER) == 1
    assert page.count(get_plotlyjs()) == 1
    assert page.count("Plotly.newPlot(") == _figures(page) == 6  # pairs, 3-D, hypervolume, knobs, sparsity, tasks


def test_nothing_fetched_from_the_network(page):
    assert not EXTERNAL.search(page)
    rest = _without_plotlyjs(page).lower()
    assert "mathjax" not in rest and "cdn." not in rest and "http://" not in rest and "https://" not in rest


def test_every_section_present(page):
    for sid in SECTIONS:
        assert f'id="{sid}"' in page, sid
        assert f'href="#{sid}"' in page or sid == "pareto-3d", sid  # the nav links to it


def test_header_states_the_experiment(exp, page):
    df = load_experiment(exp)
    dense = json.loads((exp / "dense.json").read_text())
    assert "prunefuse report: synthetic" in page and "multidigits" in page and "tpe" in page
    for name, sense in OBJECTIVES:
        assert html.escape(report_html._label(name, sense)) in page
    for status in ("finished", "failed"):
        assert f"{(df['status'] == status).sum()} {status}" in page
    assert "0 running" in page and "search finished" in page
    assert f"params {dense['params']:,}" in page and f"score {report_html._fmt(dense['score'])}" in page
    assert DEFAULT_LATENCY in page


def test_latency_source_is_stated(exp):
    page = build_report(exp, latency_source="re-measured one at a time after the search")
    assert "re-measured one at a time after the search" in page and DEFAULT_LATENCY not in page


def test_front_table_has_every_front_trial_and_its_export_command(exp, page):
    df = load_experiment(exp)
    front = select.front(df, OBJECTIVES, exp)
    assert 2 <= len(front) < len(df)
    table = _section(page, "front")
    assert table.count("<tr") == len(front) + 1  # one header row
    for trial_id in front["trial_id"]:
        assert f"prunefuse export {exp} --trial {trial_id} -o policy.yaml" in table
    knee = select.by_knee(df, OBJECTIVES, exp)["trial_id"]
    knee_rows = re.findall(r"<tr class=knee>(.*?)</tr>", table)
    assert len(knee_rows) == 1 and f"--trial {knee} " in knee_rows[0]


def test_export_command_uses_the_path_as_given_quoted(tmp_path, monkeypatch):
    exp = make_experiment(tmp_path / "my runs", 12, name="exp one")
    monkeypatch.chdir(tmp_path)
    page = build_report("my runs/exp one")
    assert "prunefuse export &#x27;my runs/exp one&#x27; --trial " in page


def test_failed_reasons_listed_and_escaped(exp, page):
    failed = load_experiment(exp).query("status == 'failed'")
    table = _section(page, "failed")
    assert len(failed) == 3 and f"Failed trials ({len(failed)})" in table
    for row in failed.itertuples():
        assert row.trial_id in table and html.escape(row.error) in table
    assert "&lt;fused trunk&gt;" in table and "<fused trunk>" not in page


def test_hover_shows_brief_policy(page):
    assert "mean sparsity" in page and "importance" in page and "weighting static" in page
    # Figure JSON escapes non-ASCII and "<", so match the "·" either way.
    assert re.search(r"fusion (none|ties|task_arithmetic) (·|\\u00b7) importance (l2|multitask_taylor)", page)


def test_running_experiment_builds(tmp_path):
    exp = make_experiment(tmp_path, 30, n_running=6, n_failed=2, finished=False)
    df = load_experiment(exp)
    assert (df["status"] == "running").sum() == 6 and not (exp / "finished.json").exists()
    assert any(not (exp / f"trial_{t}" / "result.json").exists() for t in df["trial_id"])
    page = build_report(exp)
    assert "6 running" in page and "running or cut short" in page and _figures(page) == 6


def test_builds_before_the_dense_base_is_measured(tmp_path):
    exp = make_experiment(tmp_path, 10, finished=False)
    (exp / "dense.json").unlink()  # the search writes it after training the base
    page = build_report(exp)
    assert "dense base" not in _section(page, "summary") and _figures(page) == 6


def test_cut_short_experiment_counts_stopped(tmp_path):
    exp = make_experiment(tmp_path, 20, n_running=4, finished=False)
    (exp / "finished.json").write_text("{}")
    assert "4 stopped" in build_report(exp)


@pytest.mark.parametrize("kind", ["all running", "all failed", "no trial"])
def test_zero_finished_trials_says_so(tmp_path, kind):
    if kind == "no trial":
        exp = make_experiment(tmp_path, 0, finished=False)
    else:
        exp = make_experiment(tmp_path, 6, finished=False, n_running=6 if kind == "all running" else 0,
                              n_failed=6 if kind == "all failed" else 0)
    page = build_report(exp)
    assert "No finished trial yet" in page and _figures(page) == 0
    assert "the front is empty" in page and page.count(PLOTLY_MARKER) == 1
    assert ("Failed trials (6)" in page) == (kind == "all failed")


def test_infeasible_trials_kept_off_the_front(tmp_path):
    exp = make_experiment(tmp_path, 60, seed=1, max_task_drop=6.0)
    df = load_experiment(exp)
    done = select.finished(df, OBJECTIVES)
    infeasible = done[~select.feasible(done, exp)]
    assert len(infeasible) > 0
    page = build_report(exp)
    assert "infeasible (task drop)" in page and "within 6.0 points of the dense base" in page
    table = _section(page, "front")
    for trial_id in infeasible["trial_id"]:
        assert f"--trial {trial_id} " not in table


@pytest.mark.parametrize("objectives, figures, pairs", [
    ((("score", "max"), ("params", "min")), 5, 1),
    ((("score", "max"), ("params", "min"), ("latency_ms", "min"), ("macs", "min")), 6, 6),
])
def test_other_objective_counts(tmp_path, objectives, figures, pairs):
    page = build_report(make_experiment(tmp_path, 25, objectives=objectives))
    assert _figures(page) == figures and ('id="pareto-3d"' in page) == (len(objectives) >= 3)
    assert _section(page, "pareto").count('"name":"Pareto front"') == pairs  # one front trace per subplot


def test_missing_experiment_raises(tmp_path):
    with pytest.raises(PrunefuseError, match="not found"):
        build_report(tmp_path / "nope")
    with pytest.raises(PrunefuseError, match="not a prunefuse experiment"):
        write_report(tmp_path)
    with pytest.raises(PrunefuseError):
        write_report(tmp_path / "nope", tmp_path / "out.html")
    assert not (tmp_path / "out.html").exists()


def test_written_atomically_to_the_default_path(exp):
    out = exp / "report.html"
    out.write_text("old, half-written report")
    assert write_report(exp) == out
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert [p.name for p in exp.iterdir() if p.name.startswith(".report.html")] == []


def test_failed_write_leaves_the_old_report(exp, tmp_path, monkeypatch):
    out = tmp_path / "r.html"
    out.write_text("old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(exp, out)
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_global_sparsity_overrides_layers():
    rows = pd.DataFrame({"policy/pruning/sparsity/a": [0.1, 0.2], "policy/pruning/sparsity/b": [0.3, 0.4],
                         "policy/pruning/global_sparsity": [None, 0.5]})
    table = report_html._sparsity(rows)
    assert list(table.columns) == ["a", "b"] and table.to_numpy().tolist() == [[0.1, 0.3], [0.5, 0.5]]
    only_global = report_html._sparsity(pd.DataFrame({"policy/pruning/global_sparsity": [0.25]}))
    assert only_global.to_numpy().tolist() == [[0.25]]


