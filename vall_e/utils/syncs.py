"""Count the operations that make the host wait for an accelerator ("host syncs").

On CUDA the host only queues kernels; it runs ahead while the GPU works. An operation whose result
the host has to *read* (a Python number, a shape that depends on the data, a blocking copy) makes
it wait until the GPU has finished everything queued before it. The GPU then idles while the host
prepares the next kernels: in a training step or a token loop each such wait costs the launch
latency of everything after it. The hot paths here aim at none.

:class:`SyncCounter` counts such operations as they are dispatched. By default it counts them on
every device, so a test on CPU sees what the same code would do on CUDA::

    with SyncCounter() as c:
        model(text, proms, resps).loss.backward()
    c.total, c.counts          # 0, Counter()

What is counted, under these keys of ``counts``:

- ``aten::_local_scalar_dense``: ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``if t:``.
  One value is copied to the host, which waits for it. (Under ``torch.inference_mode`` these
  arrive undecomposed as ``aten::item`` / ``aten::is_nonzero``; they are counted under this name.)
- ``Tensor.tolist``: every value is copied to the host. On a CPU tensor this dispatches no ATen op,
  so it is caught at the Python level (a ``TorchFunctionMode``).
- ``aten::nonzero`` (also ``nonzero_numpy``, ``argwhere``), ``aten::masked_select``,
  ``aten::_unique``, ``aten::_unique2``, ``aten::unique_dim``, ``aten::unique_consecutive``,
  ``aten::unique_dim_consecutive``, ``aten::bincount``: the size of the output depends on the
  data, so the host reads it back before it can allocate the output.
- ``aten::index.Tensor (boolean mask)``, ``aten::index_put_ (boolean mask)``: ``h[mask]`` and
  ``h[mask] = values`` run ``nonzero`` inside. ``h[mask] = scalar`` is not counted: ATen turns
  it into ``masked_fill_``.
- ``aten::repeat_interleave.Tensor`` (``.self_Tensor`` under inference mode) without
  ``output_size``: the output length is ``repeats.sum()``, read back.
- ``aten::multinomial``: validates the probabilities with two host reads (and draws with an
  exponential race, which needs neither).
- ``aten::equal``, ``aten::allclose``: they return a Python bool.
- ``aten::lift_fresh``, ``aten::lift_fresh_copy``: ``torch.tensor(data)`` / ``torch.as_tensor(data)``
  of host data. With ``device="cuda"`` that is a copy from pageable memory that the host waits
  for. Counted when the new tensor has a dimension or lives off the CPU: a 0-dim CPU tensor is how
  PyTorch wraps a Python scalar for an op (``x[i:j] = 0``), and kernels read those on the host.
- ``aten::_to_copy (blocking transfer)``, ``aten::copy_ (blocking transfer)``: a copy between the
  CPU and another device without ``non_blocking=True`` (``.cpu()``, ``.to("cuda")``): PyTorch
  waits for the stream after it.

What it cannot see: waits inside one kernel's C++ code (an op that syncs internally under a name
not listed above) and explicit ``torch.cuda.synchronize()``. On a GPU,
``torch.cuda.set_sync_debug_mode("error")`` is the ground truth; this counter is the portable
proxy that CPU tests can hold.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Union

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_aten = torch.ops.aten

# ops whose output size depends on the data (the host reads it to allocate the output), plus ops
# that return a host value
_ALWAYS = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.nonzero_numpy.default,
    _aten.argwhere.default,
    _aten.masked_select.default,
    _aten._unique.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.unique_dim_consecutive.default,
    _aten.bincount.default,
    _aten.multinomial.default,
    _aten.equal.default,
    _aten.allclose.default,
}
# under inference mode composite ops reach the counter undecomposed: ``item()`` is ``aten::item``,
# ``bool()`` is ``aten::is_nonzero``. Both are one host read: counted under one name either way.
_HOST_READS = {_aten.item.default, _aten.is_nonzero.default}
_LIFTS = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}
_INDEX = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default}
_COPIES = {_aten._to_copy.default, _aten.copy_.default}


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _sync_reason(func: Any, args: tuple, kwargs: dict, out: Any) -> Optional[str]:
    """The ``counts`` key under which this dispatched call forces a host sync, or None."""
    if func in _ALWAYS:
        return func.name()
    if func in _HOST_READS:
        return "aten::_local_scalar_dense"
    if func in _LIFTS:
        return func.name() if out.dim() > 0 or out.device.type != "cpu" else None
    if func in (_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor):
        return None if kwargs.get("output_size") is not None else func.name()
    if func in _INDEX:
        if not any(_is_mask(i) for i in args[1]):
            return None
        value = args[2] if len(args) > 2 else None
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu":
            return None  # h[mask] = scalar: ATen makes it a masked_fill_
        return f"{func.name()} (boolean mask)"
    if func in _COPIES:
        if func is _aten._to_copy.default:
            src, dst = args[0].device, out.device
        else:
            dst, src = args[0].device, args[1].device
        blocking = not (kwargs.get("non_blocking", False) or (len(args) > 2 and args[2]))
        if blocking and src != dst and "cpu" in (src.type, dst.type):
            return f"{func.name()} (blocking transfer)"
    return None


class _ToListCounter(TorchFunctionMode):
    """Counts ``Tensor.tolist`` for a :class:`SyncCounter`: on a CPU tensor it dispatches no op."""

    def __init__(self, owner: "SyncCounter"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.Tensor.tolist:
            return func(*args, **kwargs)
        self.owner._count("Tensor.tolist", [args[0]])
        self.owner._quiet += 1  # on CUDA its device-to-host copy is the same sync: count it once
        try:
            return func(*args, **kwargs)
        finally:
            self.owner._quiet -= 1


class SyncCounter(TorchDispatchMode):
    """Counts, per reason, the dispatched operations that force a host sync on an accelerator.

    Args:
        device: None (default) counts them whatever device their tensors are on: on CPU that is
            what the same code would do on CUDA. ``"cuda"`` counts only operations that touch a
            CUDA tensor (on a GPU run, reading a CPU tensor costs nothing).

    Attributes:
        counts: ``{reason: number of calls}``; the reasons are listed in the module docstring.
        total: the sum of ``counts``.
    """

    def __init__(self, device: Union[str, torch.device, None] = None):
        super().__init__()
        self.device_type = None if device is None else torch.device(device).type
        self.counts: Counter[str] = Counter()
        self._quiet = 0
        self._tolist = _ToListCounter(self)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> "SyncCounter":
        self._tolist.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._tolist.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._tolist.__exit__(*exc)

    def _count(self, reason: str, tensors: list) -> None:
        if self.device_type is not None:
            if not any(isinstance(t, torch.Tensor) and t.device.type == self.device_type for t in tensors):
                return
        self.counts[reason] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._quiet:
            reason = _sync_reason(func, args, kwargs, out)
            if reason is not None:
                self._count(reason, tree_leaves((args, kwargs, out)))
        return out
