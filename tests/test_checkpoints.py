"""A user's own checkpoints: every file format, library key names placed onto trunk and heads,
user experts replacing prunefuse's, and the one-line refusals (pickled objects, a missing
expert, an expert of another shape, a file changed since the policy) that write nothing.

Fast: a tiny multidigits suite and an MLP trunk, or real transformers / timm modules built
from small configs with random weights (never downloaded)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import TINY_SUITE

MODEL = {"trunk": "mlp", "width": 32, "depth": 2}


@pytest.fixture(scope="module")
def suite():
    from mtl_models import suites

    return suites.get("multidigits", **{k: v // 3 for k, v in TINY_SUITE.items()})


def trunk_of(model) -> dict:
    return {k.removeprefix("trunk."): v.clone() for k, v in model.state_dict().items() if k.startswith("trunk.")}


def save_every_format(state: dict, folder, *, config: dict | None = None) -> dict:
    """The same tensors as each format a library writes: name -> path."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for suffix in (".pt", ".pth", ".bin"):
        torch.save(state, folder / f"w{suffix}")
        paths[suffix] = folder / f"w{suffix}"
    torch.save({"state_dict": state, "epoch": 3}, folder / "lightning.ckpt")   # a training script's wrapper
    paths["nested"] = folder / "lightning.ckpt"
    save_file(state, folder / "w.safetensors")
    paths[".safetensors"] = folder / "w.safetensors"
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    sharded = folder / "sharded"
    sharded.mkdir()
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, sharded / file)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    paths["sharded"] = sharded / "model.safetensors.index.json"
    hf = folder / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(config or {"model_type": "custom"}))
    save_file(state, hf / "model.safetensors")
    paths["hf folder"] = hf
    hf_bin = folder / "hf_bin"
    hf_bin.mkdir()
    (hf_bin / "config.json").write_text(json.dumps(config or {"model_type": "custom"}))
    torch.save(state, hf_bin / "pytorch_model.bin")
    paths["hf folder (bin)"] = hf_bin
    return paths


def test_every_format_reads_the_same_tensors(tmp_path):
    from mtl_models.models.weights import checkpoint_sha256, read_weights

    state = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "b.weight": torch.randn(2, 4),
             "b.running": torch.arange(3)}
    paths = save_every_format(state, tmp_path, config={"model_type": "bert", "hidden_size": 4})
    for kind, path in paths.items():
        got = read_weights(path, what="base checkpoint")
        assert sorted(got.state) == sorted(state), kind
        for k in state:
            torch.testing.assert_close(got.state[k], state[k])
        assert (got.config is not None) == kind.startswith("hf"), kind
        assert checkpoint_sha256(path, what="x") == checkpoint_sha256(path, what="x")
    assert read_weights(paths["hf folder"], what="x").config["hidden_size"] == 4
    # The digest covers every file read: a changed shard or config changes it.
    before = checkpoint_sha256(paths["sharded"], what="x")
    shard = paths["sharded"].parent / "model-00002-of-00002.safetensors"
    from safetensors.torch import save_file

    save_file({k: v + 1 if v.is_floating_point() else v for k, v in read_weights(shard, what="x").state.items()}, shard)
    assert checkpoint_sha256(paths["sharded"], what="x") != before
    before = checkpoint_sha256(paths["hf folder"], what="x")
    (paths["hf folder"] / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert checkpoint_sha256(paths["hf folder"], what="x") != before


@pytest.mark.parametrize("make, words", [
    (lambda d: torch.save(nn.Linear(2, 2), d / "m.pt"), ["pickles Python objects", "torch.nn.modules.linear.Linear",
                                                        "refused unread"]),
    (lambda d: (d / "m.pt").write_bytes(b"not a checkpoint"), ["not a torch state dict"]),
    (lambda d: (d / "m.safetensors").write_bytes(b"\x10\x00garbage"), ["not a readable .safetensors"]),
    (lambda d: (d / "m.txt").write_text("x"), ["expected a .safetensors"]),
    (lambda d: torch.save([1, 2], d / "m.pt"), ["holds a list"]),
    (lambda d: (d / "m").mkdir(), ["without config.json"]),
    (lambda d: ((d / "m").mkdir(), (d / "m" / "config.json").write_text("{}")), ["no weights"]),
    (lambda d: (d / "m.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}})),
     ["outside its folder"]),
    (lambda d: (d / "m.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}})),
     ["'gone.safetensors', which is missing"]),
])
def test_unreadable_files_are_one_line(tmp_path, recwarn, make, words):
    from mtl_models.models.weights import read_weights
    from spaces.errors import PrunefuseError

    make(tmp_path)
    path = next(p for p in tmp_path.iterdir())
    with pytest.raises(PrunefuseError) as err:
        read_weights(path, what="base checkpoint")
    line = str(err.value)
    assert "\n" not in line and str(path) in line
    for w in words:
        assert w in line, line
    assert not [w for w in recwarn if "torch" in str(w.filename)]   # no torch warning beside the line


def bert_parts(hidden=16, labels=2):
    """A real transformers BertModel (the trunk) and a BertForSequenceClassification of the same config."""
    from mtl_models.models import imports

    transformers = imports.transformers("the test")  # beside the CPU torch (imports.py)
    BertConfig, BertForSequenceClassification, BertModel = (transformers.BertConfig,
                                                            transformers.BertForSequenceClassification,
                                                            transformers.BertModel)
    config = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=labels)
    return config, BertModel(config), BertForSequenceClassification(config)


class _Multi(nn.Module):
    def __init__(self, trunk, heads):
        super().__init__()
        self.trunk, self.heads = trunk, nn.ModuleDict(heads)


def test_bert_classifier_names_map_onto_trunk_and_head():
    from mtl_models.models import keymap

    config, backbone, expert = bert_parts()
    model = _Multi(backbone, {"a": nn.Linear(16, 2), "b": nn.Linear(16, 3)})
    own = model.state_dict()
    placed = keymap.place(expert.state_dict(), own, tasks=["a", "b"], head_task="a")
    assert placed.prefix == "bert."
    assert keymap.first_trunk_problem(placed, own, expert.state_dict()) is None
    assert placed.heads == ["a"] and not placed.unplaced
    torch.testing.assert_close(placed.state["heads.a.weight"], expert.state_dict()["classifier.weight"])
    torch.testing.assert_close(placed.state["trunk.encoder.layer.0.attention.self.query.weight"],
                               expert.state_dict()["bert.encoder.layer.0.attention.self.query.weight"])
    # The same classifier for task b (3 outputs) is a shape that does not fit: named, not placed.
    placed = keymap.place(expert.state_dict(), own, tasks=["a", "b"], head_task="b")
    assert placed.heads == [] and placed.misfit == ["classifier.weight (2, 16) for heads.b.weight (3, 16)"]
    # The backbone alone (BertModel's own names) fills the trunk; no head.
    placed = keymap.place(backbone.state_dict(), own, tasks=["a", "b"])
    assert placed.prefix == "" and placed.heads == [] and not placed.unplaced
    assert keymap.first_trunk_problem(placed, own, backbone.state_dict()) is None


def test_a_trunk_that_keeps_its_library_module_under_an_attribute():
    """A trunk wrapping the library model (`trunk.model.*`) and a DDP-saved checkpoint (`module.*`)."""
    from mtl_models.models import keymap

    _, backbone, _ = bert_parts()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = backbone

    own = _Multi(Wrapped(), {"a": nn.Linear(16, 2)}).state_dict()
    saved = {"module." + k: v for k, v in backbone.state_dict().items()}
    placed = keymap.place(saved, own, tasks=["a"])
    assert keymap.first_trunk_problem(placed, own, saved) is None and placed.prefix == "module."


def test_backbone_and_experts_of_the_mlp(suite, tmp_path):
    """prunefuse's own names, library-style names (`model.*` + `classifier.*`), a head-less expert,
    an ImageNet-like head left out of the backbone with a notice."""
    from safetensors.torch import save_file

    from mtl_models.models.pretrained import load_user_weights

    model = suite.build_model(**MODEL)
    trunk = trunk_of(model)
    save_file({**trunk, "head.weight": torch.randn(1000, 32), "head.bias": torch.zeros(1000)},
              tmp_path / "base.safetensors")
    left = {"model." + k: v + 0.1 for k, v in trunk.items()}
    left.update({"classifier.weight": torch.randn(10, 32), "classifier.bias": torch.randn(10)})
    torch.save(left, tmp_path / "left.pt")
    save_file({k: v - 0.1 for k, v in trunk.items()}, tmp_path / "right.safetensors")   # no head
    torch.save(model.state_dict(), tmp_path / "sum.pth")                               # prunefuse's names
    lines = []
    user = load_user_weights(model, base=str(tmp_path / "base.safetensors"), log=lines.append,
                             experts={"left": str(tmp_path / "left.pt"), "right": str(tmp_path / "right.safetensors"),
                                      "sum": str(tmp_path / "sum.pth")})
    assert len(lines) == 1 and "head.weight (1000, 32)" in lines[0] and "heads start fresh" in lines[0]
    assert sorted(user.base) == sorted(f"trunk.{k}" for k in trunk)
    torch.testing.assert_close(user.experts["left"]["heads.left.weight"], left["classifier.weight"])
    torch.testing.assert_close(user.experts["left"]["trunk.fc1.weight"], left["model.fc1.weight"])
    assert not any(k.startswith("heads.") for k in user.experts["right"])
    assert sorted(k for k in user.experts["sum"] if k.startswith("heads.")) == ["heads.sum.bias", "heads.sum.weight"]


def test_user_experts_merge_against_the_backbone(suite, tmp_path):
    """Coefficients 1 and 0 give one expert back exactly (its trunk and head), its metric the
    reference; a head-less expert gets a head fitted on its frozen trunk, which stays its own."""
    from mtl_models import artifacts
    from mtl_models.pipeline import start_model
    from mtl_models.training.train import evaluate
    from spaces import Policy

    torch.manual_seed(0)
    backbone = suite.build_model(**MODEL)
    experts = {}
    for k, task in enumerate(suite.task_names):
        e = suite.build_model(**MODEL)
        e.load_state_dict(backbone.state_dict())
        with torch.no_grad():
            for p in e.trunk.parameters():
                p.add_(torch.randn_like(p) * 0.05 * (k + 1))
        state = {f"trunk.{n}": v for n, v in trunk_of(e).items()}
        if task != "right":
            state.update({n: v for n, v in e.state_dict().items() if n.startswith(f"heads.{task}.")})
        experts[task] = state
    base = {f"trunk.{k}": v for k, v in trunk_of(backbone).items()}
    art = artifacts.prepare(suite, MODEL, artifacts.TrainSpec(epochs=1, expert_epochs=1), cache_dir=tmp_path,
                            experts=True, base_state=base, user_experts=experts, log=lambda *_: None)
    torch.testing.assert_close(art.backbone["trunk.fc1.weight"], base["trunk.fc1.weight"])
    # The dense base is the backbone fine-tuned with fresh heads: task vectors are not taken against it.
    assert not torch.equal(art.base["trunk.fc1.weight"], base["trunk.fc1.weight"])
    torch.testing.assert_close(art.experts["right"]["trunk.fc1.weight"], experts["right"]["trunk.fc1.weight"])
    assert art.references == art.expert_metrics and set(art.expert_metrics["val"]) == set(suite.task_names)
    for task in suite.task_names:
        coefficients = {t: float(t == task) for t in suite.task_names}
        policy = Policy(suite=suite.spec, model=MODEL,
                        fusion={"method": "task_arithmetic", "coefficients": coefficients})
        merged = start_model(suite, policy, art, device="cpu")
        assert evaluate(merged, suite, "val")[task] == pytest.approx(art.expert_metrics["val"][task], abs=1e-6)
        torch.testing.assert_close(merged.state_dict()["trunk.fc2.weight"], experts[task]["trunk.fc2.weight"])
    # Task vectors against the backbone: λ = 0.5 each gives backbone + 0.5 Σ (expert − backbone).
    policy = Policy(suite=suite.spec, model=MODEL,
                    fusion={"method": "task_arithmetic", "coefficients": {t: 0.5 for t in suite.task_names}})
    merged = start_model(suite, policy, art, device="cpu").state_dict()["trunk.fc1.weight"]
    expected = base["trunk.fc1.weight"] + 0.5 * sum(experts[t]["trunk.fc1.weight"] - base["trunk.fc1.weight"]
                                                    for t in suite.task_names)
    torch.testing.assert_close(merged, expected)


# --- refusals through the CLI: one line, exit 2, nothing written --------------------------

@pytest.fixture(scope="module")
def user_files(suite, tmp_path_factory):
    """A backbone (library names), one expert per task, and the bad files a user can hand over."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    model = suite.build_model(**MODEL)
    trunk = trunk_of(model)
    save_file(trunk, d / "backbone.safetensors")
    for k, task in enumerate(suite.task_names):
        torch.save({"model." + n: v + 0.01 * (k + 1) for n, v in trunk.items()}, d / f"{task}.pt")
    wide = suite.build_model(**{**MODEL, "width": 48})
    save_file(trunk_of(wide), d / "wide.safetensors")
    torch.save(model, d / "pickled.pt")        # the whole nn.Module: pickled objects
    return d


def search_args(suite, d, storage, *extra):
    return ["search", "--suite", "multidigits", *(a for k, v in suite.spec.items() if k != "name"
                                                  for a in ("--suite-option", f"{k}={v}")),
            "--model-option", "width=32", "--model-option", "depth=2", "--storage", storage, "--name", "x",
            "--trials", "1", *extra]


def experts_args(suite, d, **override):
    paths = {t: d / f"{t}.pt" for t in suite.task_names}
    paths.update(override)
    return [a for t, p in paths.items() for a in ("--experts", f"{t}={p}")]


def test_search_refusals_are_one_line(suite, user_files, tmp_path, capsys):
    from test_byo import assert_one_line_error, cli_main

    d, storage = user_files, tmp_path / "runs"
    base = ["--base-checkpoint", d / "backbone.safetensors"]
    first = suite.task_names[0]
    cases = [
        ([*base, *experts_args(suite, d, **{first: d / "absent.pt"})], ["expert for task", "absent.pt", "not found"]),
        ([*base, *experts_args(suite, d, **{first: d / "wide.safetensors"})],
         ["is not a copy of the backbone", "'fc1.weight' has shape (48, 100)", "needs (32, 100)"]),
        ([*base, *experts_args(suite, d, **{first: d / "pickled.pt"})], ["pickles Python objects", "refused unread"]),
        (["--base-checkpoint", d / "pickled.pt"], ["base checkpoint", "pickles Python objects"]),
        (["--base-checkpoint", d / "wide.safetensors"], ["does not fit the trunk", "(48, 100)"]),
        (experts_args(suite, d), ["--experts needs --base-checkpoint"]),
        ([*base, *experts_args(suite, d)[:-2]], ["no expert for task", suite.task_names[-1]]),
        ([*base, *experts_args(suite, d), "--experts", f"nope={d / 'left.pt'}"], ["no task 'nope'"]),
        ([*base, *experts_args(suite, d), "--references"], ["leave out --references"]),
        ([*base, "--experts", "left"], ["TASK=PATH"]),
    ]
    for args, words in cases:
        code, _, err = cli_main(capsys, *search_args(suite, d, storage, *args))
        assert_one_line_error(code, err, *words)
        assert not storage.exists(), args


def test_apply_refuses_a_changed_file(suite, user_files, tmp_path, capsys):
    """A policy records each file's SHA-256; one changed byte and apply stops before training, writing nothing."""
    import shutil

    from test_byo import assert_one_line_error, cli_main

    from mtl_models.models.weights import checkpoint_sha256
    from spaces import Policy

    d = tmp_path / "files"
    shutil.copytree(user_files, d)
    experts = {t: {"path": str(d / f"{t}.pt"), "sha256": checkpoint_sha256(d / f"{t}.pt", what="x")}
               for t in suite.task_names}
    policy = Policy.from_dict({
        "schema": "prunefuse.policy/1", "suite": suite.spec, "model": MODEL,
        "base": {"epochs": 0.1, "checkpoint": str(d / "backbone.safetensors"),
                 "checkpoint_sha256": checkpoint_sha256(d / "backbone.safetensors", what="x"), "experts": experts},
        "fusion": {"method": "task_arithmetic", "coefficients": {t: 1.0 for t in suite.task_names}},
        "finetune": {"epochs": 0.0}})
    policy.to_yaml(tmp_path / "policy.yaml")
    last = suite.task_names[-1]
    state = torch.load(d / f"{last}.pt", weights_only=True)
    state["model.fc1.bias"][0] += 1.0
    torch.save(state, d / f"{last}.pt")
    for changed in [d / f"{last}.pt", d / "backbone.safetensors"]:
        code, _, err = cli_main(capsys, "apply", tmp_path / "policy.yaml", "-o", tmp_path / "out",
                                "--cache", tmp_path / "cache")
        assert_one_line_error(code, err, str(changed), "has changed since the policy was made", "nothing was applied")
        assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
        (d / "backbone.safetensors").write_bytes((d / "backbone.safetensors").read_bytes() + b" ")
        shutil.copy(user_files / f"{last}.pt", d / f"{last}.pt")


# --- the report: experts' own metrics and the standard recipes ------------------------------

def test_report_shows_experts_and_recipes(tmp_path):
    """dense.json's `experts` and recipes.json become header facts, dotted per-task lines and
    one reference point per recipe in the Pareto charts; without them, nothing of the kind."""
    from report_fixtures import make_experiment

    from reports.html import build_report

    exp = make_experiment(tmp_path, 8)
    plain = build_report(exp)
    assert "experts (each on its task)" not in plain and "TIES (defaults)" not in plain
    dense = json.loads((exp / "dense.json").read_text())
    dense["experts"] = {"val": {"left": 0.9123, "right": 0.8765, "sum": 0.7777}, "test": {}}
    (exp / "dense.json").write_text(json.dumps(dense))
    recipe = {k: v for k, v in dense.items() if k.startswith(("metric/", "test/")) or k in
              ("score", "params", "latency_ms", "nonzero_params", "delta_m")}
    (exp / "recipes.json").write_text(json.dumps({"task arithmetic λ=0.3": {**recipe, "delta_m": -3.25},
                                                  "TIES (defaults)": {**recipe, "delta_m": -7.5}}))
    page = build_report(exp)
    assert "experts (each on its task)" in page and "0.9123" in page and "expert left (0.9123)" in page
    for name, dm in (("task arithmetic λ=0.3", "-3.25"), ("TIES (defaults)", "-7.5")):
        assert f"{name}</dt>" in page and f"delta_m {dm}" in page
        assert f'"name":{json.dumps(name)}' in page    # drawn as a reference point in the charts (JSON-escaped)
