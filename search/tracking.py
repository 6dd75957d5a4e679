"""`--tracking mlflow[=URI]`: every trial as an MLflow run, through Ray Tune's MLflow callback.

Each run holds the trial's policy knobs as params (`policy/pruning/sparsity/trunk.fc1`, ...),
every report as metrics (one step per pruning step), and the trial's policy as the artifact
`policy.yaml`. The callback runs on the driver, so a local store needs no shared folder.
Without a URI the runs go to the backend MLflow recommends for a local store, a SQLite file
inside the experiment (`EXPERIMENT/mlflow.db`, artifacts in `EXPERIMENT/mlartifacts`): MLflow 3
keeps its file store (`mlruns/`) in maintenance mode and refuses to read it unless told to.
`mlflow=http://host:5000` (or any tracking URI) sends them where the user says, unchanged.
"""
from __future__ import annotations

import os

from spaces.errors import PrunefuseError
from spaces.files import is_uri, join


TRACKERS = ("mlflow",)
MLFLOW_DB = "mlflow.db"           # the default store: a SQLite file inside the experiment
MLFLOW_ARTIFACTS = "mlartifacts"  # beside it: each run's policy.yaml


def parse(spec: str) -> tuple[str, str | None]:
    """`mlflow` -> ("mlflow", None); `mlflow=URI` -> ("mlflow", URI)."""
    name, sep, uri = spec.partition("=")
    if name not in TRACKERS:
        raise PrunefuseError(f"--tracking {spec!r}: expected mlflow or mlflow=URI (e.g. mlflow=http://host:5000)")
    if sep and not uri.strip():
        raise PrunefuseError(f"--tracking {spec!r}: give a tracking URI after '=', or just mlflow for a local store")
    return name, (uri.strip() or None)


def _default_folder(cfg) -> str:
    """Where the default store lives: the experiment, or (when the experiment is at a URI the
    driver cannot write files into) a folder of the driver's own cache."""
    if is_uri(cfg.storage):
        return os.path.join(os.path.expanduser("~"), ".cache", "prunefuse", "mlflow", cfg.name)
    return os.path.abspath(cfg.path)


def tracking_uri(cfg) -> str:
    """The MLflow tracking URI: the one given, else a SQLite file in the experiment."""
    _, uri = parse(cfg.tracking)
    if uri:
        return uri
    return "sqlite:///" + os.path.join(_default_folder(cfg), MLFLOW_DB)


def artifact_location(cfg) -> str | None:
    """Where the default store keeps artifacts (None: the given URI's server or store decides)."""
    if parse(cfg.tracking)[1]:
        return None
    return "file://" + os.path.join(_default_folder(cfg), MLFLOW_ARTIFACTS)


def allow_file_store(uri: str) -> None:
    # A file store the user asked for by URI: MLflow 3 refuses it unless this is set.
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def callbacks(cfg) -> list:
    """[the MLflow callback] when the search tracks, else []."""
    if not cfg.tracking:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise PrunefuseError("--tracking mlflow needs mlflow: pip install 'prunefuse[deploy]' "
                             "(or mlflow-skinny)") from None

    artifacts = artifact_location(cfg)

    class PolicyLogger(MLflowLoggerCallback):
        """Ray's callback, plus the trial's policy as an artifact when the trial ends."""

        def setup(self, *args, **kwargs):
            # The default store's experiment is created here with its artifacts beside the
            # database (MLflow would put them in ./mlruns of whatever folder the driver runs in).
            if artifacts is not None:
                from mlflow import MlflowClient

                client = MlflowClient(tracking_uri=self.tracking_uri)
                if client.get_experiment_by_name(self.experiment_name) is None:
                    client.create_experiment(self.experiment_name, artifact_location=artifacts)
            super().setup(*args, **kwargs)

        def log_trial_end(self, trial, failed: bool = False):
            run_id = self._trial_runs.get(trial)
            policy = (trial.config or {}).get("policy")
            if run_id is not None and policy is not None:
                from spaces import Policy

                text = Policy.from_dict(policy, source="trial config").to_yaml()
                self.mlflow_util._mlflow.MlflowClient(tracking_uri=self.tracking_uri).log_text(run_id, text, "policy.yaml")
            super().log_trial_end(trial, failed=failed)

    uri = tracking_uri(cfg)
    allow_file_store(uri)
    return [PolicyLogger(tracking_uri=uri, experiment_name=cfg.name,
                         tags={"prunefuse.experiment": cfg.path, "prunefuse.suite": cfg.suite["name"]})]
