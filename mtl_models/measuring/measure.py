"""What a compressed model costs and how well it does: size, MACs, latency, Δm.

Latency is always measured on the device the model runs on, never derived from
sparsity: unstructured zeros cost the same time as any other weight on dense kernels.
It is the latency of the model's *inference form* (`inference_form`): what a deployment
runs, with BatchNorm folded into the layer before it and image activations channels-last.
Dense and pruned models are timed in that same form, so ratios compare like with like;
size and MACs are counted on the model as trained and stored.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch


def _tensors(model):
    """(name, tensor, is_parameter) for every weight the model would store, once each.

    With live pruning masks (`torch.nn.utils.prune`), a layer holds `weight_orig` (dense) and
    `weight_mask`; what it stores once the masks are folded in is `weight = orig * mask`, so
    that is what is counted, and the mask itself is not.
    """
    seen = set()
    for prefix, module in model.named_modules():
        masked = {n[:-len("_mask")] for n, _ in module.named_buffers(recurse=False) if n.endswith("_mask")}
        for name, p in module.named_parameters(recurse=False):
            base = name[:-len("_orig")] if name.endswith("_orig") and name[:-len("_orig")] in masked else None
            t = getattr(module, base) if base else p
            if id(p) not in seen:
                seen.add(id(p))
                yield f"{prefix}.{base or name}".lstrip("."), t.detach(), True
        for name, b in module.named_buffers(recurse=False):
            if name.endswith("_mask") and name[:-len("_mask")] in masked:
                continue
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                yield f"{prefix}.{name}".lstrip("."), b.detach(), False


def stored_params(model) -> int:
    """Parameters the model stores (zeros included): its dense size."""
    return sum(t.numel() for _, t, is_param in _tensors(model) if is_param)


def nonzero_params(model) -> int:
    """Parameters that are not exactly zero (masked-out weights count as zero)."""
    return sum(int(torch.count_nonzero(t)) for _, t, is_param in _tensors(model) if is_param)


def storage_bytes(model) -> int:
    """Bytes to store the weights and buffers, each tensor dense or, where smaller, in CSR
    (the non-zero values, an int32 column index each, and int32 row pointers; a 1-D tensor is
    one row). Live pruning masks are folded in, not stored. This is what a sparse export
    would take; a dense `model.pt` of an unstructured-pruned model is as big as the dense one."""
    total = 0
    for _, t, _ in _tensors(model):
        n, size = t.numel(), t.element_size()
        rows = t.shape[0] if t.dim() >= 2 else 1
        nnz = int(torch.count_nonzero(t))
        total += min(n * size, nnz * (size + 4) + 4 * (rows + 1))
    return total


def count_macs(model, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of one sample (dense kernels: zeros in
    unstructured-pruned weights are multiplied like any other weight): torch-pruning's count
    of the layers, plus the heads' matmuls of attention modules written as Linears
    (`attention.head_matmul_macs`), which it does not see."""
    import torch_pruning as tp

    from mtl_models.pruning import without_masks
    from mtl_models.pruning.attention import head_matmul_macs

    # torch-pruning counts on its own deep copy; the sample goes to the model's device, so the
    # model is neither moved nor changed.
    stored = without_masks(model)
    device = next((t.device for t in [*stored.parameters(), *stored.buffers()]), torch.device("cpu"))
    sample = example_inputs[:1].to(device)
    macs, _ = tp.utils.count_ops_and_params(stored, sample)
    return int(macs) + head_matmul_macs(stored, sample)


def inference_form(model):
    """An eval-mode copy of `model` as it would be deployed, computing the same function.

    Every BatchNorm that the traced graph shows directly after a conv or linear layer (whose
    output feeds nothing else) is folded into that layer's weights and bias, wherever it sits
    in the module tree (`mtl_models.deployment.folding`); one after an add, a concat or a pool stays, as
    does every one of a model torch.fx cannot trace, except pairs adjacent in an
    `nn.Sequential`. Models with 2-D convolutions are put in channels-last memory format,
    which oneDNN's CPU convolutions and pooling run without reordering; `latency_ms` feeds
    them channels-last inputs. Live pruning masks are folded in first. The trained model is
    untouched."""
    import copy

    from mtl_models.deployment.folding import fold_batchnorms
    from mtl_models.pruning import without_masks
    from mtl_models.pruning.attention import to_native

    form = copy.deepcopy(without_masks(model)).eval()
    # torch's own MultiheadAttention wherever the shapes allow it: nn.TransformerEncoder's
    # fused fast path runs in eval mode without grad on it (not on a head-pruned one).
    to_native(form)
    fold_batchnorms(form)
    if _has_conv2d(form):
        form = form.to(memory_format=torch.channels_last)
    return form


def _has_conv2d(model) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def _inference_inputs(model, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4 and _has_conv2d(model):
        return x.contiguous(memory_format=torch.channels_last)
    return x


@contextlib.contextmanager
def pinned_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def latency_ms(model, example_inputs: torch.Tensor, *, threads: int = 1, warmup: int = 5,
               runs: int = 30, device: str = "cpu", as_trained: bool = False,
               dtype: torch.dtype | None = None) -> float:
    """Median wall time of one forward pass in ms, after `warmup` untimed passes, of the
    model's `inference_form` (or, with `as_trained`, of the model itself in eval mode, NCHW).

    The batch is on `device` (and in the timed layout) before any clock starts. On CUDA,
    kernels run asynchronously: the GPU is synchronised before and after every timed pass,
    and at least 3 warm-up passes (CUDA context, cuDNN's algorithm choice) are never timed.
    `dtype` (e.g. torch.float16) times a copy cast to it, inputs too."""
    with _timed_forms({"model": model}, example_inputs, device, as_trained, dtype) as forms:
        timed, x = forms["model"]
        return _median_forward_ms(timed, x, threads=threads, warmup=warmup, runs=runs, device=device)


@torch.no_grad()
def interleaved_latency_ms(models: dict, example_inputs: torch.Tensor, *, rounds: int = 7, threads: int = 1,
                           warmup: int = 3, runs: int = 10, device: str = "cpu", as_trained: bool = False) -> dict:
    """name -> median over `rounds` of `latency_ms`, the models timed in turn within each
    round (starting one further along each round, so none is always first or last), so that
    machine-wide slow phases hit every model alike: timings on a shared CPU swing by tens of
    percent between rounds, a ratio of interleaved medians much less."""
    names = list(models)
    samples = {name: [] for name in names}
    with _timed_forms(models, example_inputs, device, as_trained) as forms:  # built once, timed every round
        for r in range(rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                samples[name].append(_median_forward_ms(*forms[name], threads=threads, warmup=warmup, runs=runs,
                                                        device=device))
    return {name: statistics.median(samples[name]) for name in names}


@contextlib.contextmanager
def _timed_forms(models: dict, example_inputs: torch.Tensor, device: str, as_trained: bool,
                 dtype: torch.dtype | None = None):
    """name -> (module to time, its input): each model's inference form with channels-last
    inputs where it has 2-D convolutions, or (as_trained) the model itself in eval mode, whose
    training mode is given back afterwards. With `dtype`, copies cast to it."""
    x = example_inputs.to(device)
    if dtype is not None:
        import copy

        x = x.to(dtype) if x.is_floating_point() else x
        if as_trained:
            models = {name: copy.deepcopy(m) for name, m in models.items()}  # the cast must not reach the caller's
    if not as_trained:
        forms = {name: inference_form(m).to(device, dtype) for name, m in models.items()}
        yield {name: (form, _inference_inputs(form, x)) for name, form in forms.items()}
        return
    modes = {name: m.training for name, m in models.items()}
    try:
        yield {name: (m.to(device, dtype).eval(), x) for name, m in models.items()}
    finally:
        for name, m in models.items():
            m.train(modes[name])


def _median_forward_ms(timed, x: torch.Tensor, *, threads: int, warmup: int, runs: int, device: str) -> float:
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    with pinned_threads(threads):
        for _ in range(max(warmup, 3) if cuda else warmup):
            timed(x)
        for _ in range(runs):
            sync()  # nothing queued before the clock starts
            start = time.perf_counter()
            timed(x)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def delta_m(metrics: dict[str, float], reference: dict[str, float], higher_is_better: dict[str, bool]) -> float:
    """Δm% = (1/T) Σ_t (−1)^{l_t} (M_t − M_t^ref) / M_t^ref × 100, l_t = 1 where lower is better.

    (Maninis et al. 2019; Vandenhende et al. 2021.) Positive is better than the reference.
    """
    from spaces.scores import mean_score

    return mean_score(metrics, reference, {t: "max" if h else "min" for t, h in higher_is_better.items()})
