"""Host syncs: the counter itself, and the count held at zero in training and per decoded token.

On CUDA every operation whose result the host must read (``.item()``, a data-dependent shape, a
blocking copy) makes it wait for the GPU. :class:`~vall_e.utils.syncs.SyncCounter` counts them on
any device, so these CPU tests hold the count the same code has on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from vall_e.models import get_model
from vall_e.utils.syncs import SyncCounter

# uneven lengths: padding, masks and spans all take their general path
LENS = [(7, 20, 15), (12, 9, 30), (3, 14, 4), (9, 0, 11)]
SPANS = [(2, 5), None, (0, 2), (8, 40)]  # the last runs past its response: clipped like a slice


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = [torch.randint(1, 256, (t,), generator=g).to(device) for t, _, _ in LENS]
    proms = [torch.randint(0, 1024, (p, 8), generator=g).to(device) for _, p, _ in LENS]
    resps = [torch.randint(0, 1024, (r, 8), generator=g).to(device) for _, _, r in LENS]
    return text, proms, resps


def never_stopping_ar(device: str = "cpu"):
    """ar-tiny that never picks the stop token: every generation runs its full number of steps."""
    torch.manual_seed(0)
    model = get_model("ar-tiny").to(device).eval()
    with torch.no_grad():
        model.classifier.bias[model.stop_token] = -100.0
    return model


# ---------------------------------------------------------------------------------------------
# the counter


def test_counter_sees_each_kind_of_sync():
    x = torch.arange(10.0)
    cases = {
        "aten::_local_scalar_dense": [lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: int(x[1])],
        "Tensor.tolist": [lambda: x.tolist()],
        "aten::lift_fresh": [lambda: torch.tensor([1, 2, 3]), lambda: torch.as_tensor([1.0])],
        "aten::index.Tensor (boolean mask)": [lambda: x[x > 3]],
        "aten::index_put_ (boolean mask)": [lambda: x.clone().__setitem__(x > 3, torch.zeros(6))],
        "aten::nonzero": [lambda: x.nonzero()],
        "aten::masked_select": [lambda: x.masked_select(x > 3)],
        "aten::_unique2": [lambda: x.unique()],
        "aten::repeat_interleave.Tensor": [lambda: x[:3].repeat_interleave(torch.arange(3))],
        "aten::multinomial": [lambda: torch.multinomial(x.softmax(-1), 1)],
        "aten::equal": [lambda: torch.equal(x, x)],
    }
    for reason, calls in cases.items():
        for call in calls:
            with SyncCounter() as c:
                call()
            assert dict(c.counts) == {reason: 1}, (reason, dict(c.counts))
    # under inference mode item() and bool() arrive undecomposed: same name
    with torch.inference_mode(), SyncCounter() as c:
        y = torch.ones(3)
        y.sum().item(), bool(y.all())
        y[:2].repeat_interleave(torch.arange(2))
    assert dict(c.counts) == {"aten::_local_scalar_dense": 2, "aten::repeat_interleave.self_Tensor": 1}


def test_counter_ignores_sync_free_alternatives():
    x = torch.arange(10.0)
    with SyncCounter() as c:
        x.clone()[x > 3] = 0.0  # a masked_fill
        x.clone()[2:4] = -1  # a Python scalar is wrapped in a 0-dim host tensor: no transfer
        x[:3].repeat_interleave(torch.arange(3), output_size=3)
        x.index_select(0, torch.arange(3))
        torch.empty(4).exponential_().argmax()
        x.to("cpu")
    assert c.total == 0, dict(c.counts)
    # device="cuda" ignores host-side work on CPU tensors (free on a GPU run)
    with SyncCounter("cuda") as c:
        x.sum().item(), x.tolist(), torch.tensor([1, 2])
    assert c.total == 0


# ---------------------------------------------------------------------------------------------
# training: forward + backward


def test_ar_training_step_is_sync_free():
    torch.manual_seed(0)
    model = get_model("ar-tiny").train()
    text, proms, resps = make_batch()
    with SyncCounter() as c:
        model(text, proms, resps).loss.backward()
    assert dict(c.counts) == {}  # was 5: three torch.tensor(list), a boolean gather and its backward


def test_nar_training_step_is_sync_free():
    torch.manual_seed(0)
    model = get_model("nar-tiny").train()
    text, proms, resps = make_batch()
    with SyncCounter() as c:
        out = model(text, proms, resps, prompt_spans=SPANS)  # levels drawn on the device
        out.loss.backward()
    assert dict(c.counts) == {}  # was 9
    # the stats stay device tensors: the trainer reads them once per logged step
    assert all(isinstance(v, torch.Tensor) for v in out.stats.values())
    # levels a caller gives on the host are checked there: one read of a CPU tensor, free on a GPU
    levels = torch.tensor([1, 3, 5, 7])
    with SyncCounter() as c:
        model(text, proms, resps, quant_levels=levels).loss.backward()
    assert dict(c.counts) == {"aten::_local_scalar_dense": 1}


# ---------------------------------------------------------------------------------------------
# decoding


def _count_generate(model, steps: int, **kw) -> SyncCounter:
    text, proms, resps = make_batch(str(model.device), seed=1)
    if kw.pop("prefix", False):
        kw["prefix_list"] = [r[:n, 0] for r, n in zip(resps, (3, 0, 12, 5))]
    with SyncCounter() as c:
        out = model.generate(text, proms, max_steps=steps, generator=torch.Generator().manual_seed(0), **kw)
    assert [len(o) for o in out] == [steps] * len(LENS)  # every step ran
    return c


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=1.0, top_k=20, top_p=0.9, prefix=True),
        dict(temperature=1.0, top_p=0.9, ras=True, prefix=True),  # two draws per token
        dict(temperature=0.0, max_lens=[40, 40, 40, 40]),
        dict(temperature=0.0, use_cache=False),
    ],
    ids=["sample", "top-k-p", "ras", "greedy-guard", "recompute"],
)
def test_decoding_syncs_only_for_the_stop_check(kw):
    """Per token, the only host read is "have all samples stopped?": every step on CPU, every 16th
    on a GPU. Apart from it a generation reads the device once, for the output lengths."""
    model = never_stopping_ar()
    check_every = 1 if model.device.type == "cpu" else 16
    short, long = 8, 40
    a, b = _count_generate(model, short, **kw), _count_generate(model, long, **kw)
    checks = lambda steps: -(-steps // check_every)  # steps 0, k, 2k, ... ask  # noqa: E731
    assert dict(a.counts) == {"aten::_local_scalar_dense": checks(short), "Tensor.tolist": 1}
    assert dict(b.counts) == {"aten::_local_scalar_dense": checks(long), "Tensor.tolist": 1}
    # with ignore_stop nothing asks: no host read per token at all
    c = _count_generate(model, long, ignore_stop=True, **{k: v for k, v in kw.items() if k != "max_lens"})
    assert dict(c.counts) == {"Tensor.tolist": 1}


def test_nar_generation_is_sync_free():
    torch.manual_seed(0)
    model = get_model("nar-tiny").eval()
    text, proms, resps = make_batch(seed=2)
    for temperature in (0.0, 0.5):
        with SyncCounter() as c:
            model.generate(text, proms, [r[:, 0] for r in resps], temperature=temperature, generator=torch.Generator())
        assert dict(c.counts) == {}  # was 42 for the 7 levels


# ---------------------------------------------------------------------------------------------
# on a GPU: the ground truth is CUDA's own sync detector


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_syncs_on_cuda():
    """Training steps and sampling under ``set_sync_debug_mode("error")``, which raises on any
    synchronizing CUDA call, including ones inside kernels that the counter cannot see."""
    from vall_e.base import sample_logits

    text, proms, resps = make_batch("cuda")
    torch.manual_seed(0)
    ar, nar = get_model("ar-tiny").cuda().train(), get_model("nar-tiny").cuda().train()
    logits = torch.randn(4, 1025, device="cuda")
    history = torch.randint(0, 1025, (4, 10), device="cuda")
    g = torch.Generator("cuda").manual_seed(0)
    levels = torch.tensor([1, 3, 5, 7], device="cuda")

    def work():
        ar(text, proms, resps).loss.backward()
        nar(text, proms, resps, prompt_spans=SPANS).loss.backward()
        nar(text, proms, resps, quant_levels=levels).loss.backward()
        sample_logits(logits, 1.0, top_k=50, top_p=0.9, generator=g, keep_token=1024, history=history)

    work()  # warm-up: first-use allocations and library handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with SyncCounter("cuda") as c:
            work()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert c.total == 0, dict(c.counts)
    # decoding: the stop check every 16 steps and one final read of the lengths
    model = never_stopping_ar("cuda")
    steps = 48
    c = _count_generate(model, steps, temperature=1.0, top_p=0.9, ras=True, prefix=True)
    assert dict(c.counts) == {"aten::_local_scalar_dense": -(-steps // 16), "Tensor.tolist": 1}


_TRAINER_STEP = """
import json, torch
from vall_e.config import Config
from vall_e.models import get_model
from vall_e.utils import distributed, engines
from vall_e.utils.trainer import Trainer, TrainState
from vall_e.utils.syncs import SyncCounter

distributed.init_distributed("cpu")
torch.manual_seed(0)
out = {}
for clip in (0.0, 100.0):
    cfg = Config.parse(["device=cpu", "model=ar-tiny", "batch_size=2", f"gradient_clipping={clip}",
                        "gradient_accumulation_steps=2"])
    engine = engines.build_engine(cfg, get_model("ar-tiny"))
    g = torch.Generator().manual_seed(0)
    def batch():
        return {"text": [torch.randint(1, 50, (n,), generator=g) for n in (7, 9)],
                "proms": [torch.randint(0, 1024, (n, 8), generator=g) for n in (11, 5)],
                "resps": [torch.randint(0, 1024, (n, 8), generator=g) for n in (13, 17)]}
    t = Trainer(cfg, engine, make_loader=lambda n: iter([]), evaluate=lambda s: None, state=TrainState())
    batches = iter([batch() for _ in range(6)])
    t._step(batches, log=True)  # warm-up: the optimizer state exists from here on
    with SyncCounter() as step:
        t._step(batches, log=False)
    with SyncCounter() as logged:
        t._step(batches, log=True)
    out[str(clip)] = {"step": dict(step.counts), "logged": dict(logged.counts)}
print(json.dumps(out))
"""


def test_a_training_step_of_the_trainer_reads_nothing_back():
    """Trainer._step through a real DeepSpeed engine (2 micro-batches, the non-finite guard, fused AdamW):
    no host sync at all between logged steps; one transfer each way at a logged step."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", _TRAINER_STEP], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["0.0"]["step"] == {}
    # the host-side counts go up in one (non-blocking) copy, every stat comes back in one read
    assert got["0.0"]["logged"] == {"aten::lift_fresh": 1, "Tensor.tolist": 1}
    # fp32 with gradient_clipping: DeepSpeed's own clip_grad_norm_ builds two small tensors from host
    # floats per step (bf16/fp16 clip inside DeepSpeed's optimizers instead); held here so a change shows
    assert got["100.0"]["step"] == {"aten::lift_fresh": 2}
