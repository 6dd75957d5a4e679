"""Transformer trunks: the built-in `vit` / `transformer` trunks, the `sequences` suite, and
the three attention layouts people write (nn.MultiheadAttention, timm's fused qkv, Hugging
Face's separate query / key / value) through pruning, reload and fusion."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from torch import nn

from conftest import ROOT, run_cli
from mtl_models.models import checkpoint
from mtl_models import fusion, suites
from mtl_models.pruning import attention, coupled_groups, prune, without_masks
from mtl_models.models.resize import resize_to
from mtl_models.training.tasks import task_loss
from mtl_models.training.train import TrainOptions, evaluate, train
from spaces.errors import PrunefuseError
from tests.plugins import attention_suites

LAYOUTS = {"mha": attention_suites.make_mha, "timm": attention_suites.make_timm, "hf": attention_suites.make_hf}


def tiny(layout: str):
    if layout == "hf":
        return LAYOUTS[layout](train_samples=256, val_samples=64, test_samples=64)
    return LAYOUTS[layout](train_pairs=256, val_pairs=64, test_pairs=64)


def test_sequences_suite_is_seeded_and_has_two_kinds_of_task():
    a, b = suites.get("sequences", train_samples=50), suites.get("sequences", train_samples=50)
    c = suites.get("sequences", train_samples=50, seed=1)
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert a.train.x.dtype == torch.int64 and a.input_shape == (16,)
    assert [t.kind for t in a.tasks] == ["classification", "regression"]
    # The motif really is where the position label says.
    x, where = a.train.x, (a.train.y["position"] * a.task("position").unit).round().long()
    motifs = {tuple(x[i, where[i]:where[i] + 3].tolist()) for i in range(len(x))}
    assert len(motifs) == a.task("motif").num_outputs
    with pytest.raises(PrunefuseError, match="length"):
        suites.get("sequences", length=2)


@pytest.mark.parametrize("trunk, suite_name, options", [
    ("vit", "multidigits", dict(train_pairs=200, val_pairs=50, test_pairs=50)),
    ("transformer", "sequences", dict(train_samples=200, val_samples=50, test_samples=50)),
])
def test_builtin_transformer_trunks_train(trunk, suite_name, options):
    suite = suites.get(suite_name, **options)
    torch.manual_seed(0)
    model = suite.build_model(trunk=trunk, dim=16, heads=2, mlp=32)
    before = evaluate(model, suite, "train")
    train(model, suite, TrainOptions(epochs=3, lr=3e-3, batch_size=50))
    after = evaluate(model, suite, "train")
    assert sum(after.values()) > sum(before.values())  # it learns something in a few seconds


def test_builtin_trunks_refuse_what_they_cannot_take():
    digits = suites.get("multidigits", train_pairs=50, val_pairs=20, test_pairs=20)
    with pytest.raises(PrunefuseError, match="divisible"):
        digits.build_model(trunk="vit", dim=30, heads=4)
    with pytest.raises(PrunefuseError, match="token ids"):
        digits.build_model(trunk="transformer")
    with pytest.raises(PrunefuseError, match="image"):
        suites.get("sequences", train_samples=50).build_model(trunk="vit")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plugin_layouts_follow_the_model_contract(layout):
    suite = tiny(layout)
    model = suite.build_model()
    out = model(suite.example_inputs(3))
    assert {k: tuple(v.shape) for k, v in out.items()} == {t.name: (3, t.num_outputs) for t in suite.tasks}


# --- pruning, reload, masks and fusion over the three layouts ---

def calibration(suite, n=16):
    def losses(model):
        out = model(suite.train.x[:n])
        return {t.name: task_loss(t, out[t.name], suite.train.y[t.name][:n]) for t in suite.tasks}
    return losses


def out_layer(layout, site: str) -> str:
    """The Linear that reads the heads' channels, in each test layout."""
    return {"mha": f"{site}.out_proj", "timm": f"{site}.proj",
            "hf": site.replace(".self", ".output.dense")}[layout]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pruning_heads_removes_whole_heads_exactly(layout):
    """Pruning a head computes what the dense model computes with that head's output zeroed."""
    suite = tiny(layout)
    torch.manual_seed(0)
    model = suite.build_model().eval()
    dense = copy.deepcopy(model)
    sites = attention.sites(model)
    assert len(sites) == 2 and {s.kind for s in sites.values()} == {"mha": {"mha"}, "timm": {"fused"}, "hf": {"split"}}[layout]
    x = suite.example_inputs(4)
    prune(model, {name: 0.5 for name in sites}, importance="l2", example_inputs=x)
    modules, dense_modules = dict(model.named_modules()), dict(dense.named_modules())
    for name, site in sites.items():
        assert attention.heads_of(modules[name]) == 2  # 4 heads, half removed, whole
        kept_w, full_w = modules[out_layer(layout, name)].weight, dense_modules[out_layer(layout, name)].weight
        assert kept_w.shape[1] == 2 * site.head_dim
        d = site.head_dim
        kept = [h for h in range(4) if any(torch.equal(full_w[:, h * d:(h + 1) * d], kept_w[:, k * d:(k + 1) * d])
                                           for k in range(2))]
        assert len(kept) == 2
        with torch.no_grad():
            for h in set(range(4)) - set(kept):
                full_w[:, h * d:(h + 1) * d] = 0.0
    with torch.no_grad():
        got, want = model(x), dense(x)
    for task in want:
        torch.testing.assert_close(got[task], want[task], atol=1e-5, rtol=1e-4)


def _flop_counter_macs(model, x) -> int:
    """MACs as torch's own FlopCounterMode sees them: every conv, matmul and attention kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.train()(x)  # train mode: MultiheadAttention's eval fast path is one kernel it does not count
    model.eval()
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_macs_count_the_heads_matmuls_in_every_layout(layout):
    """count_macs counts at least what torch's FlopCounterMode counts (it adds bias, norm and
    softmax terms): the heads' q·kᵀ and weights·v included, dense and with heads pruned, and
    removing half of every block's heads removes their matmuls too."""
    from mtl_models.measuring.measure import count_macs

    suite = tiny(layout)
    torch.manual_seed(0)
    model = suite.build_model().eval()
    x = suite.example_inputs(1)
    dense = count_macs(model, x)
    assert dense >= _flop_counter_macs(model, x)
    prune(model, {name: 0.5 for name in attention.sites(model)}, importance="l2", example_inputs=suite.example_inputs(2))
    assert count_macs(model, x) >= _flop_counter_macs(model, x)
    if layout != "mha":
        assert attention.head_matmul_macs(model, x) > 0
    assert count_macs(model, x) < dense


@pytest.mark.parametrize("trunk, suite_name, options", [
    ("vit", "multidigits", dict(train_pairs=50, val_pairs=20, test_pairs=20)),
    ("transformer", "sequences", dict(train_samples=50, val_samples=20, test_samples=20)),
])
def test_macs_of_builtin_transformers_with_heads_pruned(trunk, suite_name, options):
    """The same check on the built-in trunks, whose pruned attention is PrunedMultiheadAttention
    (its own counter, `attention._count_macs`)."""
    from mtl_models.measuring.measure import count_macs

    suite = suites.get(suite_name, **options)
    torch.manual_seed(0)
    model = suite.build_model(trunk=trunk, dim=16, heads=4, mlp=32).eval()
    x = suite.example_inputs(1)
    dense = count_macs(model, x)
    prune(model, {name: 0.5 for name in attention.sites(model)}, importance="l2", example_inputs=suite.example_inputs(2))
    assert _flop_counter_macs(model, x) <= count_macs(model, x) < dense


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("importance", ["l2", "multitask_taylor"])
def test_structured_pruning_every_decision_forward_and_reload(layout, importance):
    suite = tiny(layout)
    torch.manual_seed(0)
    model = suite.build_model()
    x = suite.example_inputs(2)
    groups = coupled_groups(model, x)
    # Heads of each block, MLP width of each block, and the residual stream: one decision each.
    assert sum(1 for g in groups if g in attention.sites(model)) == 2 and len(groups) == 5
    dense = sum(p.numel() for p in model.parameters())
    prune(model, {g: 0.6 for g in groups}, importance=importance, example_inputs=x, task_losses=calibration(suite))
    assert sum(p.numel() for p in model.parameters()) < 0.4 * dense
    for name, site in attention.sites(model).items():
        module = dict(model.named_modules())[name]
        heads = attention.heads_of(module)
        q = dict(model.named_modules())[site.q[0]] if site.kind != "mha" else None
        width = module.in_proj_weight.shape[0] // 3 if site.kind == "mha" else q.out_features // (3 if site.kind == "fused" else 1)
        assert heads >= 1 and width == heads * site.head_dim
    model.eval()
    with torch.no_grad():
        want = model(suite.example_inputs(5))
    fresh = suite.build_model()
    state = model.state_dict()
    resize_to(fresh, state)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = fresh.eval()(suite.example_inputs(5))
    for task in want:
        torch.testing.assert_close(got[task], want[task])


@pytest.mark.parametrize("layout", ["mha", "timm"])
def test_unstructured_masks_act_inside_attention_during_the_fine_tune(layout):
    suite = tiny(layout)
    torch.manual_seed(0)
    model = suite.build_model()
    x = suite.example_inputs(2)
    groups = coupled_groups(model, x)
    seen = {}

    def fine_tune(step, m):
        train(m, suite, TrainOptions(epochs=1, lr=1e-2, batch_size=64))  # backward through the masks, several steps
        stored = without_masks(m)
        for name in attention.sites(m):
            module = dict(stored.named_modules())[name]
            w = module.in_proj_weight if layout == "mha" else module.qkv.weight
            seen[name] = float((w == 0).float().mean())

    prune(model, {g: 0.5 for g in groups}, mode="unstructured", importance="multitask_taylor", example_inputs=x,
          task_losses=calibration(suite), after_step=fine_tune)
    assert seen and all(abs(v - 0.5) < 0.01 for v in seen.values())  # zeros kept through training
    for name in attention.sites(model):
        module = dict(model.named_modules())[name]
        if layout == "mha":
            assert type(module) is nn.MultiheadAttention  # torch's own again once the masks are folded
            assert abs(float((module.out_proj.weight == 0).float().mean()) - 0.5) < 0.01


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fusion_merges_transformer_trunks_with_every_method(layout):
    suite = tiny(layout)
    torch.manual_seed(0)
    base = suite.build_model()
    trunk = {k: v for k, v in base.state_dict().items() if k.startswith("trunk.")}
    experts = {}
    for i, t in enumerate(suite.task_names):
        torch.manual_seed(i + 1)
        experts[t] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in trunk.items()}
    for method in fusion.METHODS:
        params = {"seed": 0} if method in fusion.METHODS.needing("seed") else {}
        merged = fusion.merge(trunk, experts, method, {t: 0.5 for t in experts}, **params)
        assert merged.keys() == trunk.keys()
        model = suite.build_model()
        model.load_state_dict({**base.state_dict(), **merged})
        out = model.eval()(suite.example_inputs(3))
        assert all(torch.isfinite(v).all() for v in out.values()), method


class PackedAttention(nn.Module):
    """Attention whose q/k/v live in one bare Parameter: none of the layouts prunefuse prunes."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.w = nn.Parameter(torch.randn(3 * dim, dim) * 0.1)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (x @ self.w.t()).chunk(3, dim=-1)
        return self.out(torch.softmax(q @ k.transpose(1, 2), -1) @ v)


class HardcodedTimm(attention_suites.Attention):
    """timm's older reshape back to (B, N, C): the input width, so it cannot lose heads."""

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.proj(((q @ k.transpose(-2, -1)) * self.scale).softmax(-1).__matmul__(v).transpose(1, 2).reshape(B, N, C))


def test_attention_that_cannot_be_head_pruned_is_named_in_one_line():
    suite = tiny("timm")
    model = suite.build_model()
    model.trunk.blocks[0].attn = PackedAttention(32, 4)
    line = attention.describe_unsupported(model)
    assert line and "\n" not in line and "trunk.blocks.0.attn" in line and "PackedAttention" in line
    assert "trunk.blocks.0.attn.out" not in coupled_groups(model, suite.example_inputs(2))
    model.trunk.blocks[1].attn = HardcodedTimm(32, 4)
    found = attention.probe(model, suite.example_inputs(2))
    assert list(found) == ["trunk.blocks.1.attn"] and "one head fewer" in found["trunk.blocks.1.attn"]


# --- the real CLI on the three layouts (slow: a few minutes on 2 busy cores) ---

E2E = ["--suite-option", "val_pairs=100", "--suite-option", "test_pairs=100", "--model-option", "dim=16",
       "--train-option", "epochs=2", "--train-option", "expert_epochs=0.5", "--train-option", "lr=0.003",
       "--measure-option", "latency_batch=16", "--measure-option", "runs=3", "--trials", "6"]


def _e2e_args(layout):
    suite = f"tests.plugins.attention_suites:make_{layout}"
    sizes = ["--suite-option", "train_pairs=400"] + E2E
    if layout == "hf":
        sizes = [a.replace("_pairs", "_samples") for a in sizes]
    return ["--suite", suite, *sizes]


def _search(tmp, layout, name, space):
    from reports import load_experiment

    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(space))
    code, out, err = run_cli("search", *_e2e_args(layout), "--space", tmp / f"{name}.yaml",
                             "--storage", tmp / "runs", "--name", name, cwd=ROOT, timeout=900)
    assert code == 0, err[-3000:]
    df = load_experiment(tmp / "runs" / name)
    return df[df["status"] == "finished"], out


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_searches_finish_and_the_knee_reapplies(layout, tmp_path):
    finished, _ = _search(tmp_path, layout, "default", {"finetune": {"epochs": 0.5}})
    assert len(finished) >= 5
    finished, _ = _search(tmp_path, layout, "structured", {"pruning": {"sparsity": {"low": 0.5, "high": 0.8}},
                                                          "finetune": {"epochs": 0.5}})
    assert len(finished) >= 5
    dense = json.loads((tmp_path / "runs" / "structured" / "dense.json").read_text())
    assert finished["params"].min() <= 0.7 * dense["params"]
    exp = tmp_path / "runs" / "structured"
    code, _, err = run_cli("export", exp, "--knee", "-o", tmp_path / "knee.yaml", cwd=ROOT)
    assert code == 0, err
    measured = yaml.safe_load((tmp_path / "knee.yaml").read_text())["provenance"]["metrics"]
    code, _, err = run_cli("apply", tmp_path / "knee.yaml", "-o", tmp_path / "model", "--cache",
                             tmp_path / "runs" / "_artifacts", cwd=ROOT, timeout=900)
    assert code == 0, err[-3000:]
    applied = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert applied["params"] == measured["params"]
    for key in [k for k in measured if k.startswith(("metric/", "test/"))]:
        assert abs(applied[key] - measured[key]) * 100 <= 0.5, key
    model, _ = checkpoint.load(tmp_path / "model")
    assert sum(p.numel() for p in model.parameters()) == measured["params"]


@pytest.mark.slow
def test_unstructured_search_on_multihead_attention(tmp_path):
    finished, _ = _search(tmp_path, "mha", "unstructured", {"pruning": {"mode": "unstructured"},
                                                           "fusion": {"method": "none"}, "finetune": {"epochs": 0.5}})
    assert len(finished) >= 5
    assert (finished["nonzero_params"] < finished["params"]).all()
    from reports import experiment

    # With the default objectives, size is what masks change.
    assert ("nonzero_params", "min") in experiment.objectives(tmp_path / "runs" / "unstructured")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("call", ["self", "cross", "masked"])
def test_the_prunable_attention_forward_is_torchs(batch_first, call):
    """Before any head is cut, the forward that survives pruning computes nn.MultiheadAttention's
    function: self-attention (one packed q/k/v GEMM), cross-attention (separate key / value
    inputs) and with padding and attention masks."""
    torch.manual_seed(0)
    native = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    prunable = copy.deepcopy(native)
    attention.to_prunable(prunable)
    assert type(prunable) is attention.PrunedMultiheadAttention
    shape = (3, 5, 16) if batch_first else (5, 3, 16)
    q = torch.randn(shape)
    k = v = q if call == "self" else torch.randn(shape)
    if call == "cross":
        v = torch.randn(shape)
    masks = {}
    if call == "masked":
        masks = {"key_padding_mask": torch.tensor([[False] * 4 + [True]] * 3),
                 "attn_mask": torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)}
    with torch.no_grad():
        want, want_w = native(q, k, v, **masks)
        got, got_w = prunable(q, k, v, **masks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-4)
