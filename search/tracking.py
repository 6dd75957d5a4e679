"""`--tracking mlflow[=URI]`: every trial as an MLflow run, through Ray Tune's MLflow callback.

Each run holds the trial's policy knobs as params (`policy/pruning/sparsity/trunk.fc1`, ...),
every report as metrics (one step per pruning step), and the trial's policy as the artifact
`policy.yaml`. The callback runs on the driver, so a local store needs no shared folder.
Without a URI the runs go to a local MLflow file store inside the experiment
(`EXPERIMENT/mlruns`); `mlflow=http://host:5000` (or any tracking URI) sends them to a server.
"""
from __future__ import annotations

import os

from spaces.errors import PrunefuseError
from spaces.files import is_uri, join


TRACKERS = ("mlflow",)
MLRUNS = "mlruns"


def parse(spec: str) -> tuple[str, str | None]:
    """`mlflow` -> ("mlflow", None); `mlflow=URI` -> ("mlflow", URI)."""
    name, sep, uri = spec.partition("=")
    if name not in TRACKERS:
        raise PrunefuseError(f"--tracking {spec!r}: expected mlflow or mlflow=URI (e.g. mlflow=http://host:5000)")
    if sep and not uri.strip():
        raise PrunefuseError(f"--tracking {spec!r}: give a tracking URI after '=', or just mlflow for a local store")
    return name, (uri.strip() or None)


def tracking_uri(cfg: SearchConfig) -> str:
    """The MLflow tracking URI: the one given, else a file store in the experiment (beside the
    artifact cache when the experiment lives at a URI the driver cannot write files into)."""
    _, uri = parse(cfg.tracking)
    if uri:
        return uri
    folder = (os.path.join(os.path.expanduser("~"), ".cache", "prunefuse", MLRUNS, cfg.name) if is_uri(cfg.storage)
              else os.path.abspath(join(cfg.path, MLRUNS)))
    return "file://" + folder


def allow_file_store(uri: str) -> None:
    # MLflow 3 keeps its file store in maintenance mode and refuses it unless this is set;
    # a local store needs no server, which is what a default search wants.
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def callbacks(cfg: SearchConfig) -> list:
    """[the MLflow callback] when the search tracks, else []."""
    if not cfg.tracking:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise PrunefuseError("--tracking mlflow needs mlflow: pip install 'prunefuse[deploy]' "
                             "(or mlflow-skinny)") from None

    class PolicyLogger(MLflowLoggerCallback):
        """Ray's callback, plus the trial's policy as an artifact when the trial ends."""

        def log_trial_end(self, trial, failed: bool = False):
            run_id = self._trial_runs.get(trial)
            policy = (trial.config or {}).get("policy")
            if run_id is not None and policy is not None:
                from spaces import Policy

                text = Policy.from_dict(policy, source="trial config").to_yaml()
                self.mlflow_util._mlflow.MlflowClient().log_text(run_id, text, "policy.yaml")
            super().log_trial_end(trial, failed=failed)

    uri = tracking_uri(cfg)
    allow_file_store(uri)
    return [PolicyLogger(tracking_uri=uri, experiment_name=cfg.name,
                         tags={"prunefuse.experiment": cfg.path, "prunefuse.suite": cfg.suite["name"]})]
