"""Zoo sweep: the common architectures of timm, torchvision and transformers as the trunk of a
two-task model, through the real pipeline, one row per architecture.

Each architecture is built by name (`--trunk timm:NAME` / `torchvision:NAME` / `hf:TYPE`,
random weights, a small config), then:

  1. base and two task experts trained (`artifacts.prepare`, a few hundred rows, short);
  2. coupled groups found (`coupled_groups`: residual streams, depthwise convs, attention heads);
  3. one uniform sparsity over every group, bisected so that ~half of the MACs go (heads too);
  4. `pipeline.apply_policy`: the two experts merged (TIES), pruned, fine-tuned, measured;
  5. saved and reloaded (`checkpoint.save` / `load`: rebuilt from the policy, weights_only);
  6. exported to ONNX, parity with PyTorch checked (`deploy.check_parity`);
  7. latency of the dense and the pruned model, interleaved rounds, one thread.

A row passes when every step ran and at most MACS_PASS of the dense MACs are left; otherwise
it names the step that failed and why, in one line. `kept whole` counts the coupled groups
torch-pruning cannot prune in that model (`pruning.left_unpruned`) and the attention modules
of no layout prunefuse prunes by heads: left unpruned, each named after the table with why.

Images: multidigits' left and right digits, upsampled to 32×32 (1 channel); token ids: the
`sequences` suite (16 tokens, motif and position).

    .venv/bin/python benchmarks/zoo.py                 # every architecture (~30-60 min on 2 shared cores)
    .venv/bin/python benchmarks/zoo.py --quick         # a smoke run: three architectures, one per library
    .venv/bin/python benchmarks/zoo.py --only timm:    # the architectures whose name contains a string
    .venv/bin/python benchmarks/zoo.py --shard 0/2     # every other architecture (a second process: --shard 1/2)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import markdown_table, setup_threads  # noqa: E402
from mtl_models import artifacts, suites  # noqa: E402
from mtl_models.deployment import deploy  # noqa: E402
from mtl_models.measuring import measure  # noqa: E402
from mtl_models.models import checkpoint  # noqa: E402
from mtl_models.pipeline import MeasureSpec, apply_policy  # noqa: E402
from mtl_models.pruning import attention, coupled_groups, left_unpruned, probe, prune  # noqa: E402
from mtl_models.suites.base import Split, TaskSuite  # noqa: E402
from spaces import Policy  # noqa: E402
from spaces.policy import Pruning  # noqa: E402
from spaces.vocabulary import POLICY_SCHEMA  # noqa: E402

MAC_TARGET = 0.5   # the fraction of the dense MACs the uniform sparsity aims to remove
MACS_PASS = 0.6    # a row passes with at most this fraction of the dense MACs left
SIDE = 32

VIT = dict(depth=2, embed_dim=64, num_heads=4, patch_size=4, img_size=SIDE)
HF_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
HF_VISION = dict(HF_TEXT, patch_size=4)

# name -> model options (`--model-option`s), small configs of each family.
ARCHITECTURES = {
    # timm
    "timm:vit_tiny_patch16_224": VIT,
    "timm:deit_tiny_patch16_224": VIT,
    "timm:vit_small_patch16_224": dict(VIT, embed_dim=96, num_heads=6, depth=1),
    "timm:swin_tiny_patch4_window7_224": dict(img_size=SIDE, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2),
                                              window_size=2),
    "timm:convnext_atto": {},
    "timm:convnextv2_atto": {},
    "timm:efficientnet_b0": {},
    "timm:mobilenetv3_small_050": {},
    "timm:mobilenetv2_050": {},
    "timm:resnet18": {},
    "timm:regnetx_002": {},
    "timm:regnety_002": {},
    "timm:lcnet_050": {},
    "timm:ghostnet_050": {},
    "timm:rexnet_100": {},
    "timm:mnasnet_050": {},
    "timm:repvgg_a0": {},
    "timm:resnet10t": {},
    "timm:mobilenetv4_conv_small": {},
    "timm:tinynet_e": {},
    "timm:resnet26d": {},
    "timm:efficientnet_lite0": {},
    "timm:mixnet_s": {},
    "timm:fbnetc_100": {},
    "timm:semnasnet_050": {},
    "timm:densenet121": {},
    "timm:deit_small_patch16_224": dict(VIT, embed_dim=96, num_heads=6, depth=1),
    "timm:resnext26ts": {},
    # torchvision
    "torchvision:resnet18": {},
    "torchvision:mobilenet_v2": dict(width_mult=0.5),
    "torchvision:mobilenet_v3_small": {},
    "torchvision:mobilenet_v3_large": {},
    "torchvision:efficientnet_b0": {},
    "torchvision:mnasnet0_5": {},
    "torchvision:efficientnet_v2_s": {},
    "torchvision:convnext_tiny": {},
    "torchvision:VisionTransformer": dict(image_size=SIDE, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64,
                                          mlp_dim=128),
    "torchvision:SwinTransformer": dict(patch_size=(4, 4), embed_dim=32, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2),
                                        window_size=(2, 2)),
    "torchvision:shufflenet_v2_x0_5": {},
    "torchvision:DenseNet": dict(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16),
    "torchvision:regnet_y_400mf": {},
    "torchvision:regnet_x_400mf": {},
    "torchvision:googlenet": dict(aux_logits=False, init_weights=True),
    # transformers
    "hf:bert": HF_TEXT,
    "hf:distilbert": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128),
    "hf:roberta": HF_TEXT,
    "hf:electra": dict(HF_TEXT, embedding_size=64),
    "hf:albert": dict(HF_TEXT, embedding_size=32),
    "hf:llama": dict(HF_TEXT, num_key_value_heads=4),
    "hf:vit": HF_VISION,
    "hf:deit": HF_VISION,
    "hf:xlm-roberta": HF_TEXT,
    "hf:ernie": HF_TEXT,
    "hf:data2vec-text": HF_TEXT,
    "hf:megatron-bert": HF_TEXT,
}
QUICK = ("timm:vit_tiny_patch16_224", "torchvision:resnet18", "hf:bert")
NOTICES: dict[str, list[str]] = {}  # architecture -> the lines naming what was left unpruned and why


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --- the two suites ---

def image_suite(n_train: int, n_eval: int) -> TaskSuite:
    """multidigits' left and right digits on 32×32 canvases (bilinear upsampling of 10×10)."""
    base = suites.get("multidigits", train_pairs=n_train, val_pairs=n_eval, test_pairs=n_eval)

    def up(split):
        x = torch.nn.functional.interpolate(split.x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
        return Split(x.contiguous(), {t: split.y[t] for t in ("left", "right")})

    tasks = tuple(t for t in base.tasks if t.name in ("left", "right"))
    return TaskSuite("multidigits", {"zoo": f"left+right at {SIDE}x{SIDE}"}, tasks, up(base.train), up(base.val),
                     up(base.test), input_shape=(1, SIDE, SIDE))


def text_suite(n_train: int, n_eval: int) -> TaskSuite:
    return suites.get("sequences", train_samples=n_train, val_samples=n_eval, test_samples=n_eval)


def suite_for(name: str, options: dict, suites_by_kind: dict) -> TaskSuite:
    vision = not name.startswith("hf:") or name in ("hf:vit", "hf:deit", "hf:swin", "hf:convnext", "hf:resnet") \
        or "patch_size" in options
    return suites_by_kind["images" if vision else "tokens"]


# --- one architecture ---

class Failed(Exception):
    """A step of the sweep failed: `step` names it."""

    def __init__(self, step: str, why: str):
        super().__init__(f"{step}: {why}")


def step(name: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the row's one-line reason
        if isinstance(exc, Failed):
            raise
        log(traceback.format_exc(limit=-3))
        raise Failed(name, f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}") from None


def policy_for(suite, spec: dict, train: artifacts.TrainSpec, sparsity: dict, ft: float) -> Policy:
    return Policy.from_dict({"schema": POLICY_SCHEMA, "suite": suite.spec, "model": spec,
                             "base": dataclasses.asdict(train), "weighting": {"method": "equal"},
                             "fusion": {"method": "ties", "params": {"density": 0.5},
                                        "coefficients": {t: 1.0 for t in suite.task_names}},
                             "pruning": {"sparsity": sparsity, "importance": "l2"},
                             "finetune": {"epochs": ft, "lr": 1e-3, "batch_size": 64}}, source="zoo benchmark")


def macs_left(model, suite, groups, s: float) -> float:
    import copy

    trial = copy.deepcopy(model)
    dense = measure.count_macs(trial, suite.example_inputs(1))
    prune(trial, Pruning(sparsity={g: s for g in groups}), example_inputs=suite.example_inputs(2))
    return measure.count_macs(trial, suite.example_inputs(1)) / dense


def sparsity_for(model, suite, groups, iters: int) -> float:
    """The uniform sparsity whose pruned model keeps closest to 1 − MAC_TARGET of the MACs."""
    lo, hi, best = 0.0, 0.9, (1.0, 0.9)
    for _ in range(iters):
        mid = (lo + hi) / 2
        left = macs_left(model, suite, groups, mid)
        best = min(best, (abs(left - (1 - MAC_TARGET)), mid))
        lo, hi = (mid, hi) if left > 1 - MAC_TARGET else (lo, mid)
    return best[1]


def run_one(name: str, options: dict, suite, args, cache: Path) -> dict:
    spec = {"trunk": name, **options}
    row = {"arch": name}
    started = time.perf_counter()
    model = step("build", suite.build_model, **spec).eval()
    row["dense params"] = sum(p.numel() for p in model.parameters())
    train = artifacts.TrainSpec(epochs=args.epochs, expert_epochs=args.epochs / 2, batch_size=64, lr=1e-3)
    art = step("train base + experts", artifacts.prepare, suite, spec, train, cache_dir=cache, experts=True,
               log=lambda *a: None)
    model.load_state_dict(art.base)
    x = suite.example_inputs(2)
    groups = step("coupled groups", coupled_groups, model, x)
    row["groups"] = len(groups)
    row["heads"] = len(attention.sites(model))
    left = left_unpruned(model, x)  # groups torch-pruning cannot prune here: kept whole, the rest pruned
    row["kept whole"] = len(left) + len(attention.unsupported(model))
    for notice in (attention.describe_unsupported(model), probe.describe(left)):
        if notice:
            log(f"{name}: {notice}")
            NOTICES.setdefault(name, []).append(notice)
    s = step("sparsity for ~50% MACs", sparsity_for, model, suite, groups, args.bisect)
    row["sparsity"] = s
    policy = policy_for(suite, spec, train, {g: s for g in groups}, args.finetune)
    mspec = MeasureSpec(latency_batch=args.batch, runs=3, warmup=1)
    pruned, metrics = step("fuse + prune + fine-tune", apply_policy, suite, policy, art, measure_spec=mspec)
    pruned.eval()
    dense_model = suite.build_model(**spec)
    dense_model.load_state_dict(art.base)
    dense_model.eval()
    row["params"] = metrics["params"] / measure.stored_params(dense_model)
    row["macs"] = metrics["macs"] / measure.count_macs(dense_model, suite.example_inputs(1))
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        step("save", checkpoint.save, pruned, policy, metrics, Path(tmp) / "model")
        reloaded, _ = step("reload", checkpoint.load, Path(tmp) / "model", suite=suite)
    with torch.no_grad():
        want, got = pruned(suite.val.x[:8]), reloaded(suite.val.x[:8])
    if any(not torch.allclose(want[t], got[t], atol=1e-5, rtol=1e-4) for t in want):
        raise Failed("reload", "the reloaded model's outputs differ from the saved model's")
    graph = step("ONNX export", deploy.export_onnx, pruned, x)
    row["onnx diff"] = step("ONNX parity", deploy.check_parity, pruned, graph, suite.val.x[:32])
    timing = step("latency", measure.interleaved_latency_ms, {"dense": dense_model, "pruned": pruned},
                  suite.example_inputs(args.batch), rounds=args.rounds, runs=5)
    row["latency"] = timing["pruned"] / timing["dense"]
    row["dense ms"] = timing["dense"]
    row["score"] = metrics["score"]
    row["seconds"] = time.perf_counter() - started
    if row["macs"] > MACS_PASS:
        raise Failed("MACs", f"only {1 - row['macs']:.0%} of the MACs removed at sparsity {s:.2f} "
                             f"(pass: at least {1 - MACS_PASS:.0%})")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three architectures, one per library, short training")
    ap.add_argument("--only", action="append", help="run the architectures whose name contains this (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32, help="latency batch")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--bisect", type=int, default=6, help="bisection steps of the uniform sparsity")
    ap.add_argument("--epochs", type=float, default=1.0, help="base training epochs (experts: half)")
    ap.add_argument("--finetune", type=float, default=0.5, help="fine-tune epochs after pruning")
    ap.add_argument("--shard", help="K/N: run every N-th architecture of the list from the K-th (0-based), so that "
                                    "N processes share the sweep")
    ap.add_argument("--out", help="write the markdown table here too")
    args = ap.parse_args(argv)
    setup_threads(args.threads)
    warnings.filterwarnings("ignore")
    names = list(QUICK if args.quick else ARCHITECTURES)
    if args.only:
        names = [n for n in ARCHITECTURES if any(o in n for o in args.only)]
    if args.shard:
        k, _, n = args.shard.partition("/")
        if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
            ap.error(f"--shard {args.shard!r}: expected K/N with 0 <= K < N, e.g. 0/2")
        names = names[int(k)::int(n)]
    n_train, n_eval = (128, 32) if args.quick else (512, 128)
    if args.quick:
        args.bisect, args.rounds, args.epochs, args.finetune = 3, 2, 0.5, 0.25
    kinds = {"images": image_suite(n_train, n_eval), "tokens": text_suite(n_train, n_eval)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo-cache-") as cache:
        for name in names:
            options = ARCHITECTURES[name]
            log(f"--- {name} {options}")
            try:
                row = {**run_one(name, options, suite_for(name, options, kinds), args, Path(cache)), "result": "passed"}
            except Failed as exc:
                row = {"arch": name, "result": f"failed: {exc}"}
            log(f"    {row}")
            rows.append(row)
    table = render(rows)
    print(table)
    for name, lines in NOTICES.items():  # what each architecture left unpruned, and why
        for line in lines:
            print(f"- {name}: {line}")
    passed = sum(r["result"] == "passed" for r in rows)
    print(f"\n{passed} of {len(rows)} architectures passed ({passed / max(1, len(rows)):.0%}); "
          f"machine: {torch.get_num_threads()} thread(s), shared")
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0 if passed == len(rows) or not args.quick else 1


def render(rows: list[dict]) -> str:
    def f(row, key, fmt):
        return fmt.format(row[key]) if key in row else "—"

    header = ["architecture", "result", "dense params", "groups", "heads", "kept whole", "sparsity", "params ×",
              "MACs ×", "latency ×", "ONNX max diff", "s"]
    body = [[r["arch"], r["result"], f(r, "dense params", "{:,}"), f(r, "groups", "{}"), f(r, "heads", "{}"),
             f(r, "kept whole", "{}"), f(r, "sparsity", "{:.2f}"), f(r, "params", "{:.2f}"), f(r, "macs", "{:.2f}"), f(r, "latency", "{:.2f}"),
             f(r, "onnx diff", "{:.1e}"), f(r, "seconds", "{:.0f}")] for r in rows]
    return markdown_table(header, body)


if __name__ == "__main__":
    sys.exit(main())
