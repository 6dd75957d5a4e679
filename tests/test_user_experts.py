"""The merging workflow as people have it, end to end through the `prunefuse` console script.

1. A timm ViT fine-tuned into two experts outside prunefuse (`examples/vit_experts.py`: saved as
   .safetensors and as a torch .pt with timm's key names), searched with --base-checkpoint and
   --experts on an image-file suite.
2. A Hugging Face folder of a `BertModel` backbone, a real `BertForSequenceClassification`
   expert (its own `save_pretrained` folder) and a classifier-style expert (`bert.*` +
   `classifier.*` in a torch .bin) on the token suite `sequences`.

Each: the report shows the experts' own metrics and the two standard recipes; a hand-written
policy merging with coefficient 1 for one task and 0 for the other, no pruning, no
fine-tune, applied, gives back that expert's own metric on its task within 0.5 points.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import run_cli

# Unstructured pruning keeps the test away from pruning timm's attention heads (trunk work of its own).
SPACE = ("fusion: {method: [task_arithmetic, ties]}\n"
         "pruning: {mode: unstructured, importance: l1, sparsity: {low: 0.0, high: 0.5}}\nfinetune: {epochs: 0.5}\n")
RECIPES = ("task arithmetic λ=0.3", "TIES (defaults)")


def check_report(experiment, tasks):
    """dense.json holds each expert's own metric; recipes.json both recipes; the report shows them."""
    dense = json.loads((experiment / "dense.json").read_text())
    assert set(dense["experts"]["val"]) == set(tasks)
    recipes = json.loads((experiment / "recipes.json").read_text())
    assert set(recipes) == set(RECIPES)
    for name, metrics in recipes.items():
        assert all(f"metric/{t}" in metrics for t in tasks) and "delta_m" in metrics, name
    page = (experiment / "report.html").read_text()
    assert "experts (each on its task)" in page and all(name in page for name in RECIPES)
    return dense["experts"]["val"]


def reproduce_expert(experiment, tmp_path, task, tasks, own: dict):
    """Apply a hand-written policy: coefficient 1 for `task`, 0 for the others, nothing pruned or
    fine-tuned; its metric on `task` is the expert's own."""
    from spaces import Policy

    searched = Policy.from_yaml(experiment / "policy.yaml")
    hand = Policy.from_dict({"schema": "prunefuse.policy/1", "suite": searched.suite, "model": searched.model,
                             "base": searched.base.model_dump(mode="json"),
                             "fusion": {"method": "task_arithmetic",
                                        "coefficients": {t: float(t == task) for t in tasks}},
                             "finetune": {"epochs": 0.0}})
    hand.to_yaml(tmp_path / f"hand_{task}.yaml")
    code, out, err = run_cli("apply", tmp_path / f"hand_{task}.yaml", "-o", tmp_path / f"applied_{task}",
                             "--cache", experiment.parent / "_artifacts")
    assert code == 0, err[-3000:]
    assert "fine-tuning" not in out and "came without its head" not in out  # everything reused, nothing trained
    metrics = json.loads((tmp_path / f"applied_{task}" / "metrics.json").read_text())
    assert abs(metrics[f"metric/{task}"] - own[task]) * 100 <= 0.5, (metrics[f"metric/{task}"], own[task])
    return metrics


@pytest.mark.slow
def test_timm_vit_experts_on_image_files(tmp_path):
    from examples import vit_experts as example

    user = tmp_path / "user"
    example.make_images(user, count=240)
    example.make_experts(user, pretrain_epochs=2, expert_epochs=2)
    (tmp_path / "space.yaml").write_text(SPACE)
    storage = tmp_path / "runs"
    code, out, err = run_cli(*example.search_command(user)[1:], "--train-option", "epochs=1", "--trials", "2",
                             "--storage", storage, "--name", "vit", "--space", tmp_path / "space.yaml")
    assert code == 0, err[-3000:]
    assert "fine-tuning the backbone of the base checkpoint" in out   # a trunk alone: heads start fresh
    own = check_report(storage / "vit", list(example.TASKS))
    for task in example.TASKS:
        reproduce_expert(storage / "vit", tmp_path, task, list(example.TASKS), own)


class MeanPooledClassifier(nn.Module):
    """A BertForSequenceClassification-style model (`bert.*`, `classifier.*`) whose classifier
    reads the mean of the last hidden states, as prunefuse's hf trunk hands its heads."""

    def __init__(self, bert, outputs: int):
        super().__init__()
        self.bert, self.classifier = bert, nn.Linear(bert.config.hidden_size, outputs)

    def forward(self, ids):
        return self.classifier(self.bert(input_ids=ids).last_hidden_state.mean(dim=1))


def bert_user_files(folder, suite):
    """backbone/ (a BertModel's save_pretrained), motif/ (a real BertForSequenceClassification,
    save_pretrained) and position.bin (a classifier-style state dict): fine-tuned in plain torch."""
    from mtl_models.models import imports

    tf = imports.transformers("the test")
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=32)
    tf.BertModel(config).save_pretrained(folder / "backbone")       # config.json + model.safetensors
    x, y = suite.train.x, suite.train.y

    def fit(model, loss_of, steps=60):
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for step in range(steps):
            idx = torch.randint(len(x), (64,), generator=torch.Generator().manual_seed(step))
            loss = loss_of(model, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    motif = tf.BertForSequenceClassification.from_pretrained(folder / "backbone", num_labels=4)
    fit(motif, lambda m, idx: m(input_ids=x[idx], labels=y["motif"][idx]).loss)
    motif.save_pretrained(folder / "motif")
    position = MeanPooledClassifier(tf.BertModel.from_pretrained(folder / "backbone", add_pooling_layer=False), 1)
    fit(position, lambda m, idx: nn.functional.mse_loss(m(x[idx]).squeeze(1), y["position"][idx]))
    torch.save(position.state_dict(), folder / "position.bin")


@pytest.mark.slow
def test_hf_bert_folder_and_classifier_experts_on_tokens(tmp_path, monkeypatch):
    from mtl_models import suites

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # everything here is local files
    options = dict(train_samples=1200, val_samples=300, test_samples=300)
    suite = suites.get("sequences", **options)
    user = tmp_path / "user"
    bert_user_files(user, suite)
    (tmp_path / "space.yaml").write_text(SPACE)
    storage = tmp_path / "runs"
    code, out, err = run_cli("search", "--suite", "sequences",
                             *(a for k, v in options.items() for a in ("--suite-option", f"{k}={v}")),
                             "--trunk", "hf:bert", "--base-checkpoint", user / "backbone",
                             "--experts", f"motif={user / 'motif'}", "--experts", f"position={user / 'position.bin'}",
                             "--train-option", "epochs=1", "--trials", "2", "--storage", storage, "--name", "bert",
                             "--space", tmp_path / "space.yaml")
    assert code == 0, err[-3000:]
    # The folder's config.json built the trunk (its hidden size), recorded for apply.
    config = json.loads((storage / "bert" / "prunefuse.json").read_text())["model"]["config"]
    assert config["hidden_size"] == 32 and config["model_type"] == "bert"
    assert "pooler.dense.weight" in out    # BertModel's pooler, which the trunk does not use: left out, said once
    own = check_report(storage / "bert", suite.task_names)
    for task in suite.task_names:
        reproduce_expert(storage / "bert", tmp_path, task, suite.task_names, own)
