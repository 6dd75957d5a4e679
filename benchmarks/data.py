"""Data at scale: image-file suites of 4,000, 16,000 and 64,000 RGB 64×64 PNGs, as a table.

Per size, each measured in a fresh Python process:
  search      the same short search (`--suite images`, 56×56 random crops and flips, a small
              CNN, 2 trials) run by `search.tuner.run_search` on an embedded Ray, the same number of training steps
              (30 for the base, 10 a trial) at every size; a thread
              polls the peak resident memory (VmHWM) of the driver and of every Ray worker
              process under it, so the table shows the driver's peak and the largest worker's;
  decode      building the suite with an empty decoded-image cache (the once-per-machine cost);
  first step  seconds from `suites.get` (cache warm) to the end of the first training step, and
              for the plain loop from building its Dataset to the end of its first step;
  images/s    training throughput of `mtl_models.training.train.train` against a plain PyTorch
              loop over the same files (a Dataset that opens each PNG with Pillow,
              torchvision.transforms.v2 RandomCrop / RandomHorizontalFlip / Normalize, a
              DataLoader with the same batch size and workers), the same model, loss and Adam;
              the first step is left out of both.
The PNGs are written once under `--cache` and reused by later runs. The machine is shared:
throughput ratios are taken in one process, back to back.

Run: `.venv/bin/python benchmarks/data.py [--sizes 4000,16000,64000] [--workers 0] [--quick]`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIDE, CROP = 64, 56
TASKS = ["shape:classification:shape", "area:regression:area"]
# A small CNN (one conv block, 0.75 M MACs an image): the data path, not the model, is measured.
MODEL = {"trunk": "cnn", "channels": [4], "fc": 16}
BATCH = 128


def space(train_rows: int, steps: int) -> dict:
    """The trials' space; their fine-tune runs `steps` batches whatever the data's size."""
    return {"fusion": {"method": "none"}, "pruning": {"importance": "l2", "sparsity": {"low": 0.0, "high": 0.6}},
            "finetune": {"epochs": steps * BATCH / train_rows, "batch_size": BATCH}}


# --- the image files -------------------------------------------------------------------

def _draw(i: int):
    """Image i: a disc, square or triangle of random size and colour on a noisy background."""
    import numpy as np

    rng = np.random.default_rng(i)
    img = (rng.random((SIDE, SIDE, 3)) * 60 + rng.integers(0, 120, 3)).astype(np.uint8)
    shape, r = i % 3, int(rng.integers(8, 24))
    cy, cx = rng.integers(r, SIDE - r, 2)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    mask = [(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, (abs(yy - cy) <= r * 0.8) & (abs(xx - cx) <= r * 0.8),
            (yy - cy <= r * 0.8) & (yy - cy >= -r) & (abs(xx - cx) <= (yy - cy + r) / 2)][shape]
    img[mask] = rng.integers(120, 256, 3)
    return img, "abc"[shape], float(mask.mean())


def _write_range(args):
    folder, start, stop = args
    from PIL import Image

    rows = []
    for i in range(start, stop):
        img, shape, area = _draw(i)
        rel = f"img/{i // 1000:03d}/{i:06d}.png"
        Image.fromarray(img).save(Path(folder) / rel)
        rows.append(f"{rel},{shape},{area:.5f}")
    return rows


def image_table(cache: Path, n: int) -> Path:
    """cache/images-n/labels.csv with its n PNGs, written once (in parallel) and reused."""
    import multiprocessing

    folder = cache / f"images-{n}"
    table = folder / "labels.csv"
    if table.exists():
        return table
    for k in range(0, n, 1000):
        (folder / f"img/{k // 1000:03d}").mkdir(parents=True, exist_ok=True)
    ranges = [(str(folder), s, min(s + 1000, n)) for s in range(0, n, 1000)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        rows = [r for part in pool.map(_write_range, ranges) for r in part]
    tmp = folder / "labels.csv.tmp"
    tmp.write_text("path,shape,area\n" + "\n".join(rows) + "\n")
    os.replace(tmp, table)
    return table


def suite_spec(table: Path) -> dict:
    return {"name": "images", "path": str(table), "tasks": TASKS, "size": SIDE, "crop": CROP, "flip": True}


# --- peak memory of the driver and its Ray workers -----------------------------------------

def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def _descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc's parent ids."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _is_ray_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
    except OSError:
        return False
    return b"default_worker.py" in cmd or cmd.startswith(b"ray::")


class PeakMemory(threading.Thread):
    """Polls VmHWM (peak resident set) of this process and of every Ray worker below it."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.workers, self.stop = every, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            for pid in _descendants(os.getpid()):
                if _is_ray_worker(pid):
                    self.workers[pid] = max(self.workers.get(pid, 0), _hwm_kb(pid))
            self.stop.wait(self.every)

    def result(self) -> dict:
        self.stop.set()
        self.join()
        return {"driver_mb": _hwm_kb(os.getpid()) / 1024,
                "worker_mb": max(self.workers.values(), default=0) / 1024, "workers_seen": len(self.workers)}


def run_one_search(table: Path, storage: str, args) -> dict:
    from search.config import SearchConfig
    from search.tuner import run_search

    rows = int(0.7 * (sum(1 for _ in open(table)) - 1))  # the training split's rows
    cfg = SearchConfig(name=f"data-{int(time.time() * 1000)}", storage=storage, suite=suite_spec(table), model=MODEL,
                       space=space(rows, args.trial_steps), trials=args.trials, sampler="random", seed=0,
                       cpus_per_trial=1.0, train={"epochs": args.base_steps * BATCH / rows, "batch_size": BATCH,
                                                  "expert_epochs": 0.0})
    peaks = PeakMemory()
    peaks.start()
    t0 = time.perf_counter()
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        path = run_search(cfg, log=lambda m: print(f"  {m}", file=sys.stderr))
    out = {"search_s": time.perf_counter() - t0, **peaks.result()}
    finished = [json.loads(p.read_text()) for p in Path(path).glob("trial_*/final.json")]
    out["trials_finished"] = len(finished)
    return out


# --- throughput: prunefuse's reading against a plain DataLoader loop ---------------------------

def _transforms_v2():
    """torchvision.transforms.v2, imported beside the CPU torch through prunefuse's one shim."""
    from mtl_models.models import imports

    imports.torchvision("the plain DataLoader loop")
    from torchvision.transforms import v2

    return v2


class PlainFiles:
    """What a user writes without prunefuse: open each PNG, transform it, collate."""

    def __init__(self, table: Path, rows, mean, std):
        import pandas as pd
        import torch

        v2 = _transforms_v2()
        df = pd.read_csv(table)
        self.paths = [str(table.parent / p) for p in df["path"].iloc[rows]]
        self.shape = torch.tensor(df["shape"].map({"a": 0, "b": 1, "c": 2}).iloc[rows].to_numpy())
        self.transform = v2.Compose([v2.ToImage(), v2.RandomCrop(CROP), v2.RandomHorizontalFlip(),
                                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), self.shape[i]


def _timed_steps(batches, step, steps: int) -> tuple[float, float]:
    """(seconds to the end of the first step, images/s over the steps after it)."""
    t0 = time.perf_counter()
    first, seen, start = None, 0, None
    for i, (x, y) in enumerate(batches):
        step(x, y)
        if i == 0:
            first, start = time.perf_counter() - t0, time.perf_counter()
        else:
            seen += len(x)
        if i >= steps:
            break
    return first, seen / (time.perf_counter() - start)


def throughput(table: Path, args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from mtl_models import suites
    from mtl_models.suites.reading import WORKERS_ENV, read, shuffled

    import mtl_models.suites.images  # noqa: F401 - imports are not the data's cost: done before the clocks
    import pandas  # noqa: F401

    _transforms_v2()
    torch.set_num_threads(1)
    os.environ[WORKERS_ENV] = str(args.workers)
    t0 = time.perf_counter()
    suite = suites.from_spec(suite_spec(table))
    torch.manual_seed(0)
    model = suite.build_model(**MODEL)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x, y):
        out = model(x)
        loss = F.cross_entropy(out["shape"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    ours = read(suite.train, shuffled(suite.train, batch_size=BATCH, steps=args.steps + 1, generator=gen))
    first, ours_ips = _timed_steps(((x, y["shape"]) for _, x, y in ours), step, args.steps)
    t0 = time.perf_counter()
    plain = PlainFiles(table, suite.train.positions, suite.train.view.mean, suite.train.view.std)
    loader = DataLoader(plain, batch_size=BATCH, shuffle=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(0))
    plain_build_s = time.perf_counter() - t0
    plain_first, plain_ips = _timed_steps(iter(loader), step, args.steps)
    return {"first_step_s": build_s + first, "images_s": ours_ips, "plain_images_s": plain_ips,
            "plain_first_step_s": plain_build_s + plain_first}


def decode_cold(table: Path) -> dict:
    """Seconds to build the suite with an empty decoded-image cache, and the cache's size."""
    from mtl_models import suites
    from mtl_models.suites.image_cache import CACHE_ENV

    with tempfile.TemporaryDirectory(prefix="prunefuse-cold-") as cold:
        os.environ[CACHE_ENV] = cold
        t0 = time.perf_counter()
        suite = suites.from_spec(suite_spec(table))
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(suite.train.store.folder).iterdir())
    return {"decode_s": seconds, "cache_mb": size / 2**20}


# --- the driver: one fresh process per measurement -----------------------------------------------

def in_fresh_process(what: str, table: Path, args, env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", what, "--table", str(table),
           "--trials", str(args.trials), "--base-steps", str(args.base_steps), "--trial-steps", str(args.trial_steps),
           "--steps", str(args.steps),
           "--workers", str(args.workers), "--cache", str(args.cache)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **env}, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{what} on {table} failed (exit {proc.returncode})")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def measure(args) -> None:
    table = Path(args.table)
    if args.measure == "search":
        with tempfile.TemporaryDirectory(prefix="prunefuse-data-") as storage:
            result = run_one_search(table, storage, args)
    elif args.measure == "throughput":
        result = throughput(table, args)
    else:
        result = decode_cold(table)
    print("RESULT " + json.dumps(result))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4000,16000,64000")
    p.add_argument("--quick", action="store_true", help="sizes 200,800, 1 trial, few steps: a smoke run")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "prunefuse" / "bench-data"))
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--base-steps", type=int, default=30, help="the dense base's training steps in the search")
    p.add_argument("--trial-steps", type=int, default=10, help="each trial's fine-tune steps")
    p.add_argument("--steps", type=int, default=40, help="training steps timed for images/s")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers, both loops")
    p.add_argument("--measure", choices=["search", "throughput", "decode"], help=argparse.SUPPRESS)
    p.add_argument("--table", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        return measure(args)
    if args.quick:
        args.sizes, args.trials, args.steps, args.base_steps, args.trial_steps = "200,800", 1, 4, 4, 2
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    env = {"PRUNEFUSE_DATA_CACHE": str(cache / "decoded")}
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        table = image_table(cache, n)
        print(f"{n} images ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        row = {"n": n, **in_fresh_process("decode", table, args, env)}
        row.update(in_fresh_process("search", table, args, env))  # the decoded cache is warm from here on
        row.update(in_fresh_process("throughput", table, args, env))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print_table(rows, args)


def print_table(rows: list[dict], args) -> None:
    base = rows[0]
    print(f"\nimage-file suites, RGB {SIDE}x{SIDE} PNGs, {CROP}x{CROP} random crops + flips; {args.trials} trial(s), "
          f"loader workers {args.workers}; shared 2-core machine\n")
    print("| images | decode once (s) | cache (MB) | search (s) | driver peak RSS (MB) | worker peak RSS (MB) "
          "| ×4k driver / worker | first step (s) | plain first step (s) | images/s | plain images/s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['decode_s']:.1f} | {r['cache_mb']:.0f} | {r['search_s']:.0f} | {r['driver_mb']:.0f} "
              f"| {r['worker_mb']:.0f} | {r['driver_mb'] / base['driver_mb']:.2f} / "
              f"{r['worker_mb'] / max(base['worker_mb'], 1):.2f} | {r['first_step_s']:.2f} "
              f"| {r['plain_first_step_s']:.2f} | {r['images_s']:.0f} | {r['plain_images_s']:.0f} "
              f"| {r['images_s'] / r['plain_images_s']:.2f} |")


if __name__ == "__main__":
    main()
