"""The HTML report of an experiment: one self-contained file that opens offline.

plotly.js is inlined once; each figure is a <div> plus a Plotly.newPlot call, and nothing is
fetched from the network (no CDN, no MathJax). The numbers come from `reports.select` (which
trials are finished, feasible, on the front; the knee) and `reports.pareto` (hypervolume);
this module only draws them. It works on a finished, running or cut-short search, and on one
with no finished trial yet (the report then says so).
"""
from __future__ import annotations

import html
import itertools
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from spaces.errors import PrunefuseError
from spaces.files import atomic_write_text
from spaces.scores import mean_score
from spaces.vocabulary import MEAN_SCORE, REPORT_FILE, TASK_METRIC, task_metric

from . import pareto, select
from .experiment import FINISHED_FILE, STATUS, experiment_dir, load_experiment, records

DEFAULT_LATENCY = "measured during the search, trials running side by side"
SPARSITY = "policy/pruning/sparsity/"
FRONT, DOMINATED, INFEASIBLE, DENSE, CONTROL = "#e4572e", "#9aa5b1", "#7b2cbf", "#f2b705", "#2a9d8f"
TASK_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
KNOB_LABELS = {"pruning/sparsity/": "sparsity ", "weighting/weights/": "weight ", "fusion/coefficients/": "coef ",
               "fusion/params/": "fusion ", "fusion/": "fusion ", "pruning/": "", "weighting/": "weighting "}


@dataclass
class _Data:
    path: str                     # the experiment as the user gave it (used in export commands)
    config: dict
    dense: dict | None
    trials: pd.DataFrame          # every trial, in start order
    objectives: list[tuple[str, str]]
    done: pd.DataFrame            # finished trials in start order, plus _feasible, _front (and _hover)
    front: pd.DataFrame           # the Pareto front, best first by the first objective
    knee: str | None              # trial id of the front's knee
    control: dict | None = None   # the equal-budget dense control (control.json), when recorded
    recipes: dict | None = None   # name -> metrics of the standard merges of a user's experts (recipes.json)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.objectives]

    @property
    def tasks(self) -> list[str]:
        return [c.removeprefix(TASK_METRIC) for c in self.trials.columns if c.startswith(TASK_METRIC)]

    def sense(self, task: str) -> str:
        return ((self.dense or {}).get("senses") or {}).get(task, "max")

    def task_label(self, task: str) -> str:
        """`depth: abs_err ↓ (lower is better)`: the task, its metric and which way is better."""
        metric = ((self.dense or {}).get("task_metrics") or {}).get(task)
        sense = self.sense(task)
        what = f"{metric} " if metric else ""
        return f"{task}: {what}{'↑' if sense == 'max' else '↓ (lower is better)'}"

    def delta_m(self, rows: pd.DataFrame, *, against: str = "dense base") -> pd.Series:
        """Δm% of each row against the dense base, or against the dense control (the base
        fine-tuned exactly as the trials are): the oriented score, `spaces.scores`."""
        if against == "dense base":
            refs = (self.dense or {}).get("dense_val") or {}
        else:
            refs = {k.removeprefix(TASK_METRIC): v for k, v in (self.control or {}).items() if k.startswith(TASK_METRIC)}
        refs = {t: r for t, r in refs.items() if task_metric(t) in rows}
        if not refs or rows.empty:
            return pd.Series(np.nan, index=rows.index)
        senses = {t: self.sense(t) for t in refs}
        return rows.apply(lambda r: mean_score({t: float(r[task_metric(t)]) for t in refs}, refs, senses), axis=1)


def _gather(experiment) -> _Data:
    rec, trials = records(experiment), load_experiment(experiment)  # PrunefuseError if missing
    config = rec.config
    objectives = [(str(n), str(s)) for n, s in config["objectives"]]
    done = select.finished(trials, objectives)
    front = select.front(trials, objectives, rec)
    done = done.assign(_feasible=select.feasible(done, rec).to_numpy(bool),
                       _front=done.index.isin(front.index))
    if not front.empty:
        front = front.sort_values(objectives[0][0], ascending=objectives[0][1] == "min", kind="stable")
    try:
        knee = str(select.by_knee(trials, objectives, rec)["trial_id"])
    except PrunefuseError:  # no finished feasible trial
        knee = None
    d = _Data(str(experiment), config, rec.dense, trials, objectives, done, front, knee, rec.control, rec.recipes)
    d.done, d.front = d.done.assign(_delta_m=d.delta_m(d.done)), d.front.assign(_delta_m=d.delta_m(d.front))
    d.front = d.front.assign(_vs_control=d.delta_m(d.front, against="dense control"))
    return d


# -- helpers ---------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None or isinstance(v, str):
        return "–" if v is None else v
    v = float(v)
    if not math.isfinite(v):
        return "–"
    return f"{int(v):,}" if v.is_integer() and abs(v) >= 1000 else f"{v:.4g}"


def _label(name: str, sense: str) -> str:
    return f"{name} ({sense} {'↑' if sense == 'max' else '↓'})"


def _text(v, default: str = "none") -> str:
    return default if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _sparsity(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-layer sparsity of each row: policy/pruning/sparsity/*, or global_sparsity where set."""
    table = rows[[c for c in rows.columns if c.startswith(SPARSITY)]].astype(float)
    table = table.rename(columns=lambda c: c.removeprefix(SPARSITY))
    glob = rows.get("policy/pruning/global_sparsity", pd.Series(np.nan, index=rows.index)).astype(float)
    if table.shape[1] == 0:
        return pd.DataFrame({"all layers": glob}) if glob.notna().any() else table
    return table.apply(lambda col: glob.where(glob.notna(), col))


def _hover(d: _Data, rows: pd.DataFrame) -> list[str]:
    """Trial id, a brief policy and the objectives, one hover text per row."""
    out = []
    for r, s in zip(rows.to_dict("records"), _sparsity(rows).mean(axis=1).to_numpy()):
        knob = {k: html.escape(_text(r.get(f"policy/{k}")))
                for k in ("fusion/method", "pruning/importance", "weighting/method")}
        objs = "<br>".join(f"{n}: {_fmt(r[n])}" for n in d.names)
        objs += f"<br>Δm vs dense: {_fmt(r.get('_delta_m'))}%"
        objs += _gpu_line(r) + _deploy_line(r)
        objs += _carried_line(r)
        out.append(f"<b>trial {html.escape(str(r['trial_id']))}</b><br>fusion {knob['fusion/method']} · importance "
                   f"{knob['pruning/importance']}<br>mean sparsity {_fmt(s)} · weighting "
                   f"{knob['weighting/method']}<br>{objs}")
    return out


def _carried_line(r: dict) -> str:
    src = r.get("carried_from")
    return f"<br>carried over from {html.escape(str(src))}" if isinstance(src, str) and src else ""


def _carried(r: dict) -> bool:
    return isinstance(r.get("carried_from"), str) and bool(r.get("carried_from"))


def _deploy_line(r: dict) -> str:
    """Which runtime timed the trial and, for an int8 policy, its method and the fp32 model's score."""
    parts = []
    if isinstance(r.get("latency_backend"), str):
        parts.append(f"latency timed in {r['latency_backend']}")
    if isinstance(r.get("quantization"), str) and r["quantization"] != "none":
        parts.append(f"{r['quantization']} (fp32 score {_fmt(r.get('fp32_score'))})")
    return "<br>" + html.escape(" · ".join(parts)) if parts else ""


def _gpu_line(r: dict) -> str:
    """Where a trial ran on CUDA: the GPU and the memory the trial peaked at (nothing on the CPU)."""
    peak = r.get("cuda_peak_mb")
    if not isinstance(peak, (int, float)) or not peak > 0:
        return ""
    gpu = r.get("device_name")
    where = f" on {html.escape(str(gpu))}" if isinstance(gpu, str) and gpu else ""
    half = r.get("latency_ms_half")
    half = f"<br>latency in {html.escape(str(r.get('half_precision')))}: {_fmt(half)}" \
        if isinstance(half, (int, float)) and half == half else ""
    return f"<br>CUDA peak {peak:,.0f} MiB{where}{half}"


def _groups(d: _Data):
    """(name, rows, marker) for dominated, infeasible and front trials, drawn in that order."""
    done = d.done
    return [("dominated", done[done["_feasible"] & ~done["_front"]], dict(color=DOMINATED, size=6, opacity=0.45)),
            ("infeasible (task drop)", done[~done["_feasible"]],
             dict(color=INFEASIBLE, size=7, symbol="x", opacity=0.7)),
            ("Pareto front", done[done["_front"]], dict(color=FRONT, size=9, line=dict(color="white", width=1)))]


def _dense(d: _Data, *names, which: str = "dense base") -> tuple[list[float], str] | None:
    """A reference's values of `names` and its hover text; None when it lacks one.
    which: "dense base" (the base as trained) or "dense control" (the base fine-tuned as trials are)."""
    source = {"dense base": d.dense, "dense control": d.control, **(d.recipes or {})}.get(which)
    values = [(source or {}).get(n) for n in names]
    if not all(isinstance(v, (int, float)) for v in values):
        return None
    return values, f"<b>{which}</b><br>" + "<br>".join(f"{n}: {_fmt(v)}" for n, v in zip(names, values))


# The reference points every scatter draws: (name, symbol in 2-D, symbol in 3-D, colour).
REFERENCES = (("dense base", "star", "diamond", DENSE), ("dense control", "star-triangle-up", "cross", CONTROL))
# The standard merges of a user's experts (task arithmetic at λ = 0.3, TIES at its defaults), one style each.
RECIPE_STYLES = (("square", "square", "#3a86ff"), ("hexagram", "diamond-open", "#8338ec"))


def _references(d: _Data) -> list[tuple[str, str, str, str]]:
    """The reference points a scatter draws: the dense base, the control, and each recipe recorded."""
    recipes = [(name, *RECIPE_STYLES[k % len(RECIPE_STYLES)]) for k, name in enumerate(d.recipes or {})]
    return [*REFERENCES, *recipes]


# -- figures (one function each) -------------------------------------------------------------

def _pareto_pairs(d: _Data) -> go.Figure:
    pairs = list(itertools.combinations(d.objectives, 2))
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.09, vertical_spacing=0.16 if rows > 1 else 0.1)
    front, knee = d.done[d.done["_front"]], d.done[d.done["trial_id"] == d.knee]
    for k, ((x, sx), (y, sy)) in enumerate(pairs):
        at, legend = dict(row=k // cols + 1, col=k % cols + 1), dict(showlegend=k == 0)
        for name, part, marker in _groups(d):
            fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="markers", name=name, legendgroup=name,
                                     marker=marker, hovertext=part["_hover"], hoverinfo="text", **legend), **at)
        # This pair's own front (a subset of the full one), joined as a staircase.
        pts = front[[x, y]].astype(float)
        line = pts[pareto.pareto_front(pts.to_numpy(), [sx, sy])].sort_values(x) if len(pts) else pts
        fig.add_trace(go.Scatter(x=line[x], y=line[y], mode="lines", name="front (2-D)", legendgroup="2d",
                                 line=dict(color=FRONT, width=1.5, shape="hv" if sx == "min" else "vh"),
                                 hoverinfo="skip", **legend), **at)
        fig.add_trace(go.Scatter(x=knee[x], y=knee[y], mode="markers", name="knee", legendgroup="knee",
                                 hoverinfo="skip", **legend,
                                 marker=dict(size=17, color="rgba(0,0,0,0)", line=dict(color="#111", width=2))), **at)
        for which, symbol, _, colour in _references(d):
            if ref := _dense(d, x, y, which=which):
                (dx, dy), hover = ref
                fig.add_trace(go.Scatter(x=[dx], y=[dy], hovertext=[hover], hoverinfo="text", mode="markers",
                                         name=which, legendgroup=which, **legend,
                                         marker=dict(symbol=symbol, size=16, color=colour, line=dict(color="#333"))),
                              **at)
        fig.update_xaxes(title_text=_label(x, sx), **at)
        fig.update_yaxes(title_text=_label(y, sy), **at)
    return fig.update_layout(height=390 * rows, margin=dict(t=30, b=60, l=60, r=20),
                             legend=dict(orientation="h", y=1.02 + 0.04 / rows, yanchor="bottom", x=0))


def _pareto_3d(d: _Data) -> go.Figure:
    (x, sx), (y, sy), (z, sz) = d.objectives[:3]
    fig = go.Figure()
    for name, part, marker in _groups(d):
        fig.add_trace(go.Scatter3d(x=part[x], y=part[y], z=part[z], mode="markers", name=name,
                                   marker={**marker, "size": marker["size"] * 0.6},
                                   hovertext=part["_hover"], hoverinfo="text"))
    for which, _, symbol, colour in _references(d):
        if ref := _dense(d, x, y, z, which=which):
            (dx, dy, dz), hover = ref
            fig.add_trace(go.Scatter3d(x=[dx], y=[dy], z=[dz], hovertext=[hover], hoverinfo="text",
                                       mode="markers", name=which,
                                       marker=dict(symbol=symbol, size=8, color=colour, line=dict(color="#333"))))
    scene = dict(xaxis_title=_label(x, sx), yaxis_title=_label(y, sy), zaxis_title=_label(z, sz),
                 camera=dict(eye=dict(x=1.7, y=1.7, z=1.0)), aspectmode="cube")
    return fig.update_layout(height=600, scene=scene, margin=dict(t=10, b=10, l=10, r=10),
                             legend=dict(orientation="h", x=0, y=1.0))


def _hypervolume(d: _Data) -> tuple[go.Figure | None, str]:
    """Hypervolume of the feasible finished trials in start order; the caption states the reference."""
    points = np.array(d.done[d.names], dtype=float)
    points[~d.done["_feasible"].to_numpy()] = np.nan  # infeasible trials never extend the front
    senses = [s for _, s in d.objectives]
    if not np.isfinite(points).all(axis=1).any():
        return None, "No feasible finished trial: no hypervolume to draw."
    ref = pareto.default_reference(points, senses)
    history = pareto.hypervolume_history(points, senses, ref)
    caption = ("Volume dominated by the feasible finished trials so far, in the order they started. Reference point: "
               + ", ".join(f"{n} = {_fmt(r)}" for n, r in zip(d.names, ref))
               + " (each objective's worst value pushed out by 10% of its range).")
    fig = go.Figure(go.Scatter(x=np.arange(1, len(history) + 1), y=history, mode="lines+markers",
                               line=dict(color=FRONT, shape="hv"), marker=dict(size=4),
                               hovertext=[f"trial {t}" for t in d.done["trial_id"]],
                               hovertemplate="%{hovertext}<br>#%{x}: %{y:.4g}<extra></extra>"))
    return fig.update_layout(height=340, margin=dict(t=20, b=50, l=70, r=20), yaxis_title="hypervolume",
                             xaxis_title="finished trials, in start order"), caption


def _dimension(label: str, s: pd.Series) -> dict | None:
    """A parallel-coordinates axis for a knob that varies: numeric (n/a below the range) or categorical."""
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        v = s.astype(float)
        lo, hi = v.min(), v.max()
        if v.nunique() < 2:
            return None
        if v.notna().all():
            return dict(label=label, values=v, tickformat=".3~g")
        na, ticks = lo - 0.15 * (hi - lo), np.linspace(lo, hi, 4)
        return dict(label=label, values=v.fillna(na), range=[na, hi], tickvals=[na, *ticks],
                    ticktext=["n/a", *(f"{t:.3g}" for t in ticks)])
    cats = s.map(_text)
    levels = sorted(cats.unique())
    if not 1 < len(levels) <= 12:
        return None
    return dict(label=label, values=cats.map(levels.index), tickvals=list(range(len(levels))), ticktext=levels)


def _knobs(d: _Data) -> go.Figure | None:
    dims = []
    for col in (c for c in d.done.columns if c.startswith("policy/")):
        label = col.removeprefix("policy/")
        label = next((label.replace(k, v, 1) for k, v in KNOB_LABELS.items() if label.startswith(k)), label)
        if dim := _dimension(label, d.done[col]):
            dims.append(dim)
    if not dims:
        return None
    name, sense = d.objectives[0]
    color = d.done[name].astype(float)
    dims.append(dict(label=_label(name, sense), values=color, tickformat=".4~g"))
    fig = go.Figure(go.Parcoords(dimensions=dims, labelangle=-20, labelfont=dict(size=11),
                                 line=dict(color=color, colorscale="Viridis", reversescale=sense == "min",
                                           showscale=True, colorbar=dict(title=dict(text=name)))))
    return fig.update_layout(height=480, margin=dict(t=110, b=30, l=70, r=40))


def _front_labels(d: _Data) -> list[str]:
    return [f"{t} ★knee" if t == d.knee else str(t) for t in d.front["trial_id"]]


def _sparsity_heatmap(d: _Data) -> go.Figure | None:
    table = _sparsity(d.front)
    if table.shape[1] == 0:
        return None
    z = table.to_numpy()
    fig = go.Figure(go.Heatmap(z=z, x=list(table.columns), y=_front_labels(d), colorscale="Blues", zmin=0,
                               zmax=max(0.95, float(np.nanmax(z))), texttemplate="%{z:.2f}" if z.size <= 400 else None,
                               colorbar=dict(title=dict(text="sparsity")),
                               hovertemplate="trial %{y}<br>%{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", type="category", title_text="front trial (best first)")
    return fig.update_layout(height=min(1400, 140 + 24 * len(table)), margin=dict(t=20, b=40, l=120, r=20))


def _task_bars(d: _Data) -> go.Figure | None:
    if not d.tasks:
        return None
    labels, fig, values = _front_labels(d), go.Figure(), []
    for k, task in enumerate(d.tasks):
        color, y = TASK_COLORS[k % len(TASK_COLORS)], d.front[task_metric(task)].astype(float)
        values += list(y)
        fig.add_trace(go.Bar(x=labels, y=y, name=d.task_label(task), marker_color=color,
                             hovertemplate=f"trial %{{x}}<br>{html.escape(d.task_label(task))}: %{{y:.4f}}"
                                           "<extra></extra>"))
        if dense := _dense(d, task_metric(task)):  # a dashed line above the bars, and its legend entry
            (ref,), _ = dense
            values.append(ref)
            fig.add_hline(y=ref, line=dict(color=color, dash="dash", width=2), layer="above")
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"dense {task} ({ref:.4f})",
                                     line=dict(color=color, dash="dash", width=2)))
        if (own := _expert_metrics(d).get(task)) is not None:  # the user's expert on its own task: dotted
            values.append(own)
            fig.add_hline(y=own, line=dict(color=color, dash="dot", width=2), layer="above")
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"expert {task} ({own:.4f})",
                                     line=dict(color=color, dash="dot", width=2)))
    lo, hi = np.nanmin(values), np.nanmax(values)
    pad = 0.15 * (hi - lo or abs(hi) or 1.0)
    fig.update_yaxes(range=[lo - pad, hi + pad], title_text="validation metric")
    fig.update_xaxes(type="category", title_text="front trial (best first)")
    return fig.update_layout(barmode="group", height=420, margin=dict(t=20, b=60, l=70, r=20),
                             legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0))


# -- page ------------------------------------------------------------------------------------

def _section(sid: str, title: str, caption: str, body: str) -> str:
    cap = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>{cap}{body}</section>'


def _figure(fig: go.Figure | None, empty: str = "Nothing to draw.") -> str:
    if fig is None:
        return _note(empty)
    fig.update_layout(template="plotly_white", font=dict(size=12))
    return fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                       config={"displaylogo": False, "responsive": True})


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _spec(spec) -> str:
    """`multidigits (offset=2)` from {"name": "multidigits", "offset": 2}."""
    spec = dict(spec) if isinstance(spec, dict) else {"name": _text(spec)}
    head = spec.pop("name", None) or spec.pop("trunk", "")
    return f"{head} ({', '.join(f'{k}={v}' for k, v in spec.items())})" if spec else str(head)


def _header(d: _Data, latency_source: str | None) -> str:
    c, counts, db = d.config, d.trials["status"].value_counts(), d.dense or {}
    state = "finished" if (Path(d.path) / FINISHED_FILE).is_file() else "running or cut short"
    planned = f" of {c['trials']} planned" if c.get("trials") else ""
    facts = {"suite": _spec(c.get("suite")), "model": _spec(c.get("model")), "sampler": str(c.get("sampler")),
             "objectives": ", ".join(_label(n, s) for n, s in d.objectives),
             "trials": " · ".join(f"{int(counts.get(s, 0))} {s}" for s in STATUS) + f"{planned} (search {state})"}
    if c.get("max_task_drop") is not None:
        facts["feasible"] = (f"every task within {c['max_task_drop']} points of the dense base (its oriented "
                             f"score ≥ −{c['max_task_drop']}: % worse, whichever way its metric is better)")
    if db:
        facts["dense base"] = " · ".join(f"{n} {_fmt(db[n])}" for n in (MEAN_SCORE, "params", "latency_ms") if n in db)
        facts["dense per task"] = ", ".join(f"{d.task_label(t)} {_fmt(db[task_metric(t)])}" for t in d.tasks
                                            if task_metric(t) in db)
    if d.control:
        ft = (d.control.get("policy") or {}).get("finetune") or {}
        beat = int((d.front["_vs_control"] > 0).sum()) if "_vs_control" in d.front else 0
        facts["dense control"] = (" · ".join(f"{n} {_fmt(d.control[n])}" for n in (MEAN_SCORE, "params", "latency_ms")
                                             if n in d.control)
                                  + f" (the base fine-tuned as the trials are: {_fmt(ft.get('epochs'))} epochs at lr "
                                    f"{_fmt(ft.get('lr'))}, unpruned, unfused; {beat} of {len(d.front)} front "
                                    f"point(s) score above it)")
    facts.update(_expert_facts(d))
    # A re-measurement names its own backend; the search's is the one dense.json records.
    backend = "" if latency_source else f", timed in {db.get('latency_backend') or 'torch'}"
    batch = f" (batch {_fmt(db['latency_batch'])}, {_fmt(db.get('threads'))} thread(s){backend})" \
        if "latency_batch" in db else ""
    facts["latency shown"] = (latency_source or DEFAULT_LATENCY) + batch
    if c.get("early_stop"):
        facts["early stopping"] = {"pareto": f"pareto: each pruning step keeps the best {c.get('early_stop_keep', 0.5):g} "
                                             "of the trials there by non-dominated rank",
                                   "asha": "asha: on the score, per pruning step"}.get(c["early_stop"], c["early_stop"])
    if "carried_from" in d.trials and d.trials["carried_from"].notna().any():
        carried = d.trials["carried_from"].dropna()
        facts["warm start"] = f"{len(carried)} trial(s) carried over from {', '.join(sorted(set(carried)))}"
    facts["front"] = f"{len(d.front)} trial(s); knee {d.knee}" if d.knee else "no feasible finished trial yet"
    rows = "".join(f"<dt>{k}</dt><dd>{html.escape(v or '–')}</dd>" for k, v in facts.items())
    return (f'<header id="summary"><h1>prunefuse report: {html.escape(str(c.get("name", d.path)))}</h1>'
            f'<p class="caption">{html.escape(d.path)} · generated {time.strftime("%Y-%m-%d %H:%M")}</p>'
            f'<dl class="facts">{rows}</dl></header>')


def _expert_metrics(d: _Data) -> dict[str, float]:
    """task -> its user-given expert's own validation metric (dense.json), when the search had --experts."""
    return ((d.dense or {}).get("experts") or {}).get("val") or {}


def _expert_facts(d: _Data) -> dict[str, str]:
    """The individual-model references of a search on a user's experts, and the standard recipes on them."""
    facts, own = {}, _expert_metrics(d)
    if own:
        facts["experts (each on its task)"] = (", ".join(f"{d.task_label(t)} {_fmt(v)}" for t, v in own.items())
                                               + " (the individual-model reference: delta_m is Δm% against these)")
    for name, m in (d.recipes or {}).items():
        tasks = ", ".join(f"{t} {_fmt(m[task_metric(t)])}" for t in d.tasks if task_metric(t) in m)
        facts[name] = " · ".join(f"{n} {_fmt(m[n])}" for n in (MEAN_SCORE, "delta_m", "params") if n in m) + \
            f" ({tasks}; the standard recipe on the same experts, unpruned, no fine-tune)"
    return facts


def _front_table(d: _Data) -> str:
    if d.front.empty:
        return _section("front", "Front policies", "", _note("No feasible finished trial yet: the front is empty."))
    vs_control = ["Δm% vs control"] if d.control else []
    # Both figures when the front was re-timed: the one-process timing (shown as latency_ms) and the search's.
    during = ["latency_ms_search"] if "latency_ms_search" in d.front else []
    heads = ["", "trial", *(_label(n, s) for n, s in d.objectives), *(["latency_ms during the search"] if during else []),
             "Δm% vs dense", *vs_control, *map(d.task_label, d.tasks),
             "export command"]
    head = "".join(f'<th{" class=l" if h in ("trial", "export command") else ""}>{html.escape(h)}</th>' for h in heads)
    body = []
    for r in d.front.to_dict("records"):
        knee, tid = r["trial_id"] == d.knee, str(r["trial_id"])
        cmd = f"prunefuse export {shlex.quote(d.path)} --trial {shlex.quote(tid)} -o policy.yaml"
        badges = ("<span class=badge>knee</span>" if knee else "") + (
            " <span class='badge carried'>carried over</span>" if _carried(r) else "")
        cells = [f'<td class="l">{badges}</td>',
                 f'<td class="l"><code>{html.escape(tid)}</code></td>',
                 *(f"<td>{_fmt(r[c])}</td>" for c in [*d.names, *during, "_delta_m",
                                                      *(["_vs_control"] if d.control else []),
                                                      *(task_metric(t) for t in d.tasks)]),
                 f'<td class="l cmd"><code>{html.escape(cmd)}</code></td>']
        body.append(f'<tr{" class=knee" if knee else ""}>{"".join(cells)}</tr>')
    return _section("front", "Front policies", "Best first by the first objective; Δm%: the mean over tasks of "
                    "each task's relative change vs the dense base (vs control: vs the dense control, the base "
                    "fine-tuned exactly as every trial is, so what compression costs at equal training), signed so "
                    "higher is better; per task: the "
                    "validation metric (↑ higher is better, ↓ lower is better). Copy a row's command to export its "
                    "policy.",
                    f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
                    "</table></div>")


def _stopped_table(d: _Data) -> str:
    """Trials an early-stopping rule (--early-stop) ended between pruning steps: Optuna has them as pruned."""
    stopped = d.trials[d.trials["status"] == "stopped"]
    if stopped.empty:
        return ""
    rule = d.config.get("early_stop") or ("asha" if d.config.get("asha") else None)
    why = {"pareto": "dominated by enough of the trials that reached the same step (non-dominated rank)",
           "asha": "below the best trials' score at the same step (ASHA)"}.get(rule, "stopped before their last step")
    score = MEAN_SCORE if MEAN_SCORE in stopped else None
    rows = "".join(f'<tr><td class="l"><code>{html.escape(str(r["trial_id"]))}</code></td>'
                   f'<td>{_fmt(r.get("step"))} of {_fmt(r.get("steps"))}</td>'
                   f'<td>{_fmt(r.get(score)) if score else "–"}</td></tr>' for r in stopped.to_dict("records"))
    return _section("stopped", f"Stopped early ({len(stopped)})", f"Ended after an intermediate pruning step: {why}. "
                    "Their last step's metrics are not the policy's, so they are off the front.",
                    '<table><thead><tr><th class="l">trial</th><th>stopped after step</th>'
                    f"<th>{html.escape(MEAN_SCORE)} then</th></tr></thead><tbody>{rows}</tbody></table>")


def _failed_table(d: _Data) -> str:
    failed = d.trials[d.trials["status"] == "failed"]
    if failed.empty:
        return _section("failed", "Failed trials", "", _note("No trial failed."))
    rows = "".join(f'<tr><td class="l"><code>{html.escape(str(r.trial_id))}</code></td>'
                   f'<td class="l reason">{html.escape(_text(r.error, "failed"))}</td></tr>'
                   for r in failed.itertuples())
    return _section("failed", f"Failed trials ({len(failed)})", "The last line of each trial's error.txt.",
                    '<table><thead><tr><th class="l">trial</th><th class="l">reason</th></tr></thead>'
                    f"<tbody>{rows}</tbody></table>")


def _figures(d: _Data) -> list[str]:
    if d.done.empty:
        return [_section("pareto", "Pareto front", "", _note("No finished trial yet: nothing to plot. "
                                                              "The trial counts above say what has run so far."))]
    d.done = d.done.assign(_hover=_hover(d, d.done))
    pairs = (_figure(_pareto_pairs(d)) if len(d.objectives) > 1 else _note("One objective: no trade-off to draw."))
    out = [_section("pareto", "Pareto front, each pair of objectives", "Front trials in colour (joined where they "
                    "are also on the pair's own front), dominated ones faded, infeasible ones as ×, the dense base as "
                    "a star, the knee ringed. Hover a point for its policy.", pairs)]
    if len(d.objectives) >= 3:
        out.append(_section("pareto-3d", "First three objectives in 3-D", "Drag to rotate.", _figure(_pareto_3d(d))))
    fig, caption = _hypervolume(d)
    out.append(_section("hypervolume", "Hypervolume over trials", caption if fig else "", _figure(fig, caption)))
    has_front = not d.front.empty
    out.append(_section("knobs", "Policy knobs", "Every knob that varies, one line per finished trial, coloured by "
                        "the first objective; drag along an axis to filter. n/a: the knob does not apply.",
                        _figure(_knobs(d))))
    out.append(_section("sparsity", "Per-layer sparsity of the front", "Fraction of units (or weights) removed.",
                        _figure(_sparsity_heatmap(d) if has_front else None, "The front is empty.")))
    out.append(_section("tasks", "Per-task metrics of the front", "Validation metric per task; dashed: the dense "
                        "base.", _figure(_task_bars(d) if has_front else None, "The front is empty.")))
    return out


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2933;background:#f3f5f8;margin:0}
main{max-width:1320px;margin:0 auto;padding:20px 28px 48px}
header,section{background:#fff;border:1px solid #e1e5ea;border-radius:8px;padding:16px 20px;margin:16px 0}
h1{font-size:22px;margin:0 0 2px}h2{font-size:17px;margin:0 0 4px}
.caption{color:#52606d;margin:0 0 8px}.note{background:#fffbea;border-left:4px solid #f0b429;padding:8px 12px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 18px;margin:10px 0 0}dt{color:#52606d}dd{margin:0}
nav a{margin-right:14px;color:#2a6fdb;text-decoration:none}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:13px;width:100%}
th,td{padding:5px 9px;border-bottom:1px solid #e8ebef;text-align:right;white-space:nowrap}
th{background:#f7f9fb;font-weight:600}.l{text-align:left}td.reason{white-space:normal;font-family:monospace}
code{font-size:12px}td.cmd{white-space:normal;overflow-wrap:anywhere}
td.cmd code{background:#f0f4f8;padding:2px 5px;border-radius:3px;user-select:all}
tr.knee{background:#fff1e6}.badge{background:#e4572e;color:#fff;border-radius:9px;padding:1px 7px;font-size:11px}
"""
NAV = (("summary", "Summary"), ("pareto", "Pareto"), ("pareto-3d", "3-D"), ("hypervolume", "Hypervolume"),
       ("knobs", "Knobs"), ("sparsity", "Sparsity"), ("tasks", "Tasks"), ("front", "Front"), ("stopped", "Stopped"),
       ("failed", "Failed"))


def build_report(experiment, *, latency_source: str | None = None) -> str:
    """The report of EXPERIMENT as one self-contained HTML page."""
    d = _gather(experiment)
    body = "".join([_header(d, latency_source), *_figures(d), _front_table(d), _stopped_table(d), _failed_table(d)])
    nav = "".join(f'<a href="#{i}">{t}</a>' for i, t in NAV if f'id="{i}"' in body)
    title = html.escape(f"prunefuse report: {d.config.get('name', d.path)}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style>'
            f'<script type="text/javascript">{get_plotlyjs()}</script></head>'
            f"<body><main><nav>{nav}</nav>{body}</main></body></html>\n")


def write_report(experiment, out_path=None, *, latency_source: str | None = None) -> Path:
    """Write the report (default EXPERIMENT/report.html) whole or not at all; returns its path."""
    out = Path(out_path) if out_path is not None else experiment_dir(experiment) / REPORT_FILE
    atomic_write_text(out, build_report(experiment, latency_source=latency_source))
    return out
