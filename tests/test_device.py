"""Where a job runs and in which precision: the rule, real Ray's resources, autocast on the CPU."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from conftest import run_cli, tiny_policy
from mtl_models.training import device
from spaces.errors import PrunefuseError


@pytest.mark.parametrize("gpu_ids, cuda, requested, expected", [
    (None, False, None, "cpu"),        # outside Ray (apply, a notebook): the CPU unless asked
    (None, True, None, "cpu"),
    (None, True, "auto", "cuda"),
    (None, False, "auto", "cpu"),
    (None, True, "cpu", "cpu"),
    ([], True, None, "cpu"),           # a Ray job given no GPU stays off the node's GPU
    ([0], True, None, "cuda"),         # a whole GPU or a share of one
    (["0"], True, "auto", "cuda"),
    ([0], True, "cpu", "cpu"),
])
def test_the_device_rule(gpu_ids, cuda, requested, expected):
    assert device.device_for(gpu_ids, cuda_available=cuda, requested=requested) == expected


@pytest.mark.parametrize("gpu_ids, requested, words", [
    ([0], None, "Ray gave this job GPU"),        # silently training on the CPU would mislead every figure
    (None, "cuda", "sees no CUDA"),
    (None, "tpu", "not one of: auto, cpu, cuda"),
])
def test_a_device_that_is_not_there_is_one_line(gpu_ids, requested, words):
    with pytest.raises(PrunefuseError, match=words):
        device.device_for(gpu_ids, cuda_available=False, requested=requested)


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    """A real embedded Ray that declares one GPU (on a CPU machine it is only a resource)."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_job_device_follows_the_resources_ray_gave(ray_with_a_gpu):
    ray = ray_with_a_gpu
    remote = ray.remote(device.job_device)  # importable on the workers, as the real jobs' code is
    assert ray.get(remote.options(num_cpus=1, num_gpus=0).remote()) == "cpu"
    half_a_gpu = remote.options(num_cpus=1, num_gpus=0.5).remote()
    if torch.cuda.is_available():
        assert ray.get(half_a_gpu) == "cuda"
    else:
        with pytest.raises(PrunefuseError, match=r"Ray gave this job GPU\(s\) \[0\]"):
            ray.get(half_a_gpu)
    assert device.job_device() == "cpu"  # the driver is no Ray job


def test_half_a_gpu_per_trial_runs_two_trials_on_one_gpu(ray_with_a_gpu):
    from search.config import SearchConfig
    from search.tuner import trial_slots

    assert trial_slots(SearchConfig(name="x", cpus_per_trial=1, gpus_per_trial=0.5)) == 2
    assert trial_slots(SearchConfig(name="x", cpus_per_trial=1, gpus_per_trial=1)) == 1


# --- precision ---

def test_fp16_needs_cuda_and_bf16_runs_on_the_cpu():
    with pytest.raises(PrunefuseError, match="fp16 needs a CUDA GPU"):
        device.check_precision("fp16", "cpu")
    device.check_precision("bf16", "cpu")
    device.check_precision("fp16", "cuda")
    with pytest.raises(PrunefuseError, match="not one of: fp32, bf16, fp16"):
        device.check_precision("fp8", "cuda")
    assert device.half_dtype("bf16", "cpu") is None and device.half_dtype("fp16", "cuda") is torch.float16
    assert device.peak_memory_mb("cpu") == 0.0 and device.device_name("cpu") == "cpu"


def test_bf16_training_on_the_cpu_learns_in_fp32_weights(tiny_suite):
    from mtl_models.training.train import TrainOptions, train

    torch.manual_seed(0)
    model = tiny_suite.build_model(trunk="mlp", width=32, depth=1)
    before = copy.deepcopy(model.state_dict())
    history = train(model, tiny_suite, TrainOptions(epochs=1, lr=1e-3, precision="bf16"))
    assert history and all(v == v for v in history[-1].values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fp16_training_on_the_cpu_fails_before_a_step(tiny_suite):
    from mtl_models.training.train import TrainOptions, train

    model = tiny_suite.build_model(trunk="mlp", width=32, depth=1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunefuseError, match="fp16 needs a CUDA GPU"):
        train(model, tiny_suite, TrainOptions(epochs=1, lr=1e-3, precision="fp16"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_precision_is_recorded_in_the_policy_and_checked(tiny_suite):
    from spaces import Policy

    policy = tiny_policy(tiny_suite, finetune={"epochs": 0.5, "precision": "bf16"})
    assert Policy.from_dict(policy.to_dict()).finetune.precision == "bf16"
    assert policy.base.precision == "fp32"
    with pytest.raises(PrunefuseError, match="precision"):
        tiny_policy(tiny_suite, finetune={"precision": "half"})


def test_apply_refuses_fp16_on_the_cpu_before_training(tiny_suite, tmp_path):
    from mtl_models.apply import apply_device

    policy = tiny_policy(tiny_suite, finetune={"epochs": 0.5, "precision": "fp16"})
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PrunefuseError, match="fp16 needs a CUDA GPU"):
        apply_device(policy)
    assert apply_device(tiny_policy(tiny_suite)) == "cpu"
    # A policy measured on CUDA applies on the CPU where there is no GPU (and says it in its metrics).
    measured = tiny_policy(tiny_suite, provenance={"metrics": {"device": "cuda"}})
    assert apply_device(measured) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_search_asking_fp16_without_gpus_is_refused_in_one_line(tmp_path):
    (tmp_path / "space.yaml").write_text("finetune: {precision: [fp32, fp16]}\n")
    code, out, err = run_cli("search", "--space", tmp_path / "space.yaml", "--storage", tmp_path / "runs",
                             "--suite-option", "train_pairs=200", "--trials", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "space finetune.precision fp16 needs a CUDA GPU" in err
    assert not (tmp_path / "runs").exists()


def test_fp32_keeps_the_cache_keys_of_bases_trained_before_precision_existed():
    from mtl_models.artifacts import TrainSpec, cache_key

    spec = TrainSpec()
    old = {k: v for k, v in spec.__dict__.items() if k != "precision"}
    blob = json.dumps({"suite": {"name": "s"}, "model": {"trunk": "mlp"}, "train": old, "kind": "trained"},
                      sort_keys=True, default=str)
    assert cache_key({"name": "s"}, {"trunk": "mlp"}, spec, "trained") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert cache_key({"name": "s"}, {"trunk": "mlp"}, TrainSpec(precision="bf16"), "trained") != \
        cache_key({"name": "s"}, {"trunk": "mlp"}, spec, "trained")


# --- latency ---

def test_latency_in_another_dtype_times_a_copy():
    from mtl_models.measuring import measure

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    before = copy.deepcopy(model.state_dict())
    for as_trained in (False, True):
        ms = measure.latency_ms(model, torch.randn(4, 1, 8, 8), runs=3, warmup=1, dtype=torch.bfloat16,
                                as_trained=as_trained)
        assert ms > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_report_hover_shows_the_gpu_and_its_peak_memory_only_on_cuda():
    from reports.html import _gpu_line

    assert _gpu_line({"cuda_peak_mb": 0.0, "device_name": "cpu"}) == ""
    assert _gpu_line({}) == ""
    line = _gpu_line({"cuda_peak_mb": 812.4, "device_name": "NVIDIA H200", "latency_ms_half": 0.5,
                      "half_precision": "bf16"})
    assert "CUDA peak 812 MiB on NVIDIA H200" in line and "latency in bf16: " in line
