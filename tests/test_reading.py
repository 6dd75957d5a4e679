"""Every split is read in batches through one path (`mtl_models.suites.reading`), and the
in-memory suites read through it exactly as they were indexed before."""
from __future__ import annotations

import pickle

import numpy as np
import torch


def small_suite():
    from mtl_models import suites

    return suites.get("synthetic", tasks=2, dim=32, train_samples=300, val_samples=50, test_samples=50, seed=3)


def test_in_memory_batches_are_the_rows_direct_indexing_gave():
    from mtl_models.suites.reading import read, shuffled

    s = small_suite()
    steps = 7  # 300 rows at 64: 5 a epoch, so the second epoch's permutation is drawn too
    got = list(read(s.train, shuffled(s.train, batch_size=64, steps=steps, generator=torch.Generator().manual_seed(9))))
    gen, want = torch.Generator().manual_seed(9), []
    while len(want) < steps:  # the loop `train` had before: a permutation an epoch, cut in order
        order = torch.randperm(len(s.train), generator=gen)
        want += [order[i:i + 64] for i in range(0, len(s.train), 64)]
    assert len(got) == steps
    for (rows, x, y), idx in zip(got, want[:steps]):
        assert torch.equal(rows, idx) and torch.equal(x, s.train.x[idx])
        assert all(torch.equal(y[t], s.train.y[t][idx]) for t in s.task_names)


def test_train_gives_the_weights_the_old_loop_gave():
    """The loop before splits were read in batches, restated: same seed, same steps, same weights."""
    from mtl_models.training.tasks import task_loss
    from mtl_models.training.train import TrainOptions, train
    from mtl_models.training.weighting import make_weighter

    s = small_suite()
    torch.manual_seed(0)
    ours = s.build_model("mlp", width=16, depth=2)
    old = s.build_model("mlp", width=16, depth=2)
    old.load_state_dict(ours.state_dict())
    train(ours, s, TrainOptions(epochs=1.5, lr=3e-3, batch_size=64, seed=4))

    weighter, opt = make_weighter({"method": "equal"}, s.task_names), torch.optim.Adam(old.parameters(), lr=3e-3)
    gen, step, data = torch.Generator().manual_seed(4), 0, s.train
    old.train()
    while step < 8:  # round(1.5 × 5 batches an epoch)
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), 64):
            idx = order[start:start + 64]
            out = old(data.x[idx])
            total = weighter.combine({t: task_loss(s.task(t), out[t], data.y[t][idx]) for t in s.task_names},
                                     shared_params=list(old.trunk.parameters()))
            opt.zero_grad()
            total.backward()
            opt.step()
            step += 1
            if step >= 8:
                break
    for key, value in old.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)


def test_a_memory_mapped_array_split_trains_and_evaluates_as_the_tensors_do(tmp_path):
    from mtl_models.suites import TaskSuite
    from mtl_models.suites.arrays import ArraySplit
    from mtl_models.training.train import TrainOptions, evaluate, train

    s = small_suite()
    x = torch.cat([s.train.x, s.val.x, s.test.x]).numpy()
    np.save(tmp_path / "x.npy", x)
    cuts = np.cumsum([0, len(s.train), len(s.val), len(s.test)])
    splits = [ArraySplit(str(tmp_path / "x.npy"), np.arange(a, b), s.split(k).y)
              for k, a, b in zip(("train", "val", "test"), cuts[:-1], cuts[1:])]
    mapped = TaskSuite("mapped", {}, s.tasks, *splits, input_shape=s.input_shape)
    assert len(pickle.dumps(splits[0])) < s.train.x.numpy().nbytes / 4  # a path, positions, labels: no rows

    def trained(suite):
        torch.manual_seed(0)
        model = suite.build_model("mlp", width=16, depth=2)
        history = train(model, suite, TrainOptions(epochs=2, lr=3e-3, batch_size=32, seed=1))
        return history, evaluate(model, suite, "test")

    assert trained(mapped) == trained(s)
    torch.testing.assert_close(mapped.example_inputs(70), s.example_inputs(70))


def test_predict_reads_a_split_in_batches_and_still_takes_a_tensor():
    from mtl_models.training.train import predict

    s = small_suite()
    torch.manual_seed(0)
    model = s.build_model("mlp", width=16, depth=2)
    by_split = predict(model, s.val, batch_size=16)
    by_tensor = predict(model, s.val.x)
    for t in s.task_names:
        torch.testing.assert_close(by_split[t], by_tensor[t])
        assert len(by_split[t]) == len(s.val)
