"""The CUDA path: trials, training in half precision, latency, shared GPUs. Skipped without CUDA
(conftest skips every `gpu` test where torch sees none); scripts/gpu_check.sh runs the same
path end to end and prints a table."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, tiny_policy

pytestmark = pytest.mark.gpu


def test_measurement_on_cuda_keeps_the_model_and_names_the_gpu(tiny_suite, tiny_artifacts):
    from mtl_models.pipeline import MeasureSpec, measure_model

    model = tiny_suite.build_model(trunk="mlp", width=64, depth=2)
    model.load_state_dict(tiny_artifacts.base)
    model.cuda().train()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    out = measure_model(model, tiny_suite, tiny_artifacts,
                        MeasureSpec(device="cuda", runs=5, latency_batch=64, precision="fp16"))
    assert all(p.is_cuda for p in model.parameters()) and model.training
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert out["device"] == "cuda" and out["device_name"] == torch.cuda.get_device_name()
    assert out["latency_ms"] > 0 and out["latency_ms_half"] > 0 and out["half_precision"] == "fp16"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_on_cuda_keeps_fp32_weights(tiny_suite, precision):
    from mtl_models.training.train import TrainOptions, train

    torch.manual_seed(0)
    model = tiny_suite.build_model(trunk="mlp", width=32, depth=1)
    history = train(model, tiny_suite, TrainOptions(epochs=1, lr=1e-3, device="cuda", precision=precision))
    assert history and all(v == v for v in history[-1].values())
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())


def test_a_multi_step_cycle_on_cuda(tiny_suite, tiny_artifacts):
    """steps > 1 (what --asha needs) re-traces the model between rounds: it must stay on CUDA."""
    from mtl_models.training.device import peak_memory_mb, reset_peak_memory
    from mtl_models.pipeline import MeasureSpec, apply_policy

    reset_peak_memory("cuda")
    policy = tiny_policy(tiny_suite, pruning={"steps": 2, "sparsity": {"trunk.fc1": 0.5, "trunk.fc2": 0.25}},
                         finetune={"epochs": 0.5, "precision": "bf16"})
    steps = []
    model, metrics = apply_policy(tiny_suite, policy, tiny_artifacts, on_step=lambda s, n, m: steps.append(m),
                                  measure_spec=MeasureSpec(device="cuda", runs=3, latency_batch=64))
    assert len(steps) == 2 and metrics["device"] == "cuda" and metrics["half_precision"] == "bf16"
    assert all(p.is_cuda for p in model.parameters())
    assert peak_memory_mb("cuda") > 0


@pytest.mark.slow
def test_two_trials_share_one_gpu(tmp_path):
    code, out, err = run_cli("search", "--storage", tmp_path, "--name", "g", "--trials", "2",
                             "--gpus-per-trial", "0.5", "--suite-option", "train_pairs=1000",
                             "--train-option", "epochs=1", "--measure-option", "runs=5", "--no-report")
    assert code == 0, err
    finals = [json.loads(p.read_text()) for p in (tmp_path / "g").glob("trial_*/final.json")]
    assert len(finals) == 2
    assert all(f["device"] == "cuda" and f["cuda_peak_mb"] > 0 for f in finals)
    dense = json.loads((tmp_path / "g" / "dense.json").read_text())
    assert dense["device"] == "cuda"  # the reference point is timed where trials are

