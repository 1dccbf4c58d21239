"""A second device for CPU-only torch, strict the way CUDA is: the stand-in that keeps CUDA bugs fixed.

CI has no GPU, and on a CPU every tensor is on the same device, so code that forgets the model's
device works there and crashes on a student's GPU. Inside :func:`fake_accelerator`, a model moved
with :func:`to_fake` (or ``model.to(FAKE)``) lives on a pretend accelerator, ``FAKE``
(``cpu:1``): its tensors are really on the CPU, but

* they report ``.device == FAKE``, so code that asks the model for its device gets the pretend one;
* tensors made with ``device=FAKE``, moved with ``.to(FAKE)``, or computed from FAKE tensors are
  FAKE too; ``.cpu()`` / ``.to("cpu")`` make plain CPU tensors (a copy, as a transfer would);
* an operation that mixes a FAKE tensor with a CPU tensor of one element or more raises CUDA's
  error ("Expected all tensors to be on the same device"); zero-dimensional CPU tensors and CPU
  index tensors are allowed, as CUDA allows them;
* ``.numpy()`` on a FAKE tensor raises CUDA's error ("can't convert ... to numpy").

So a test that runs a function with its model on FAKE fails exactly where the function would fail
on CUDA because of device placement. (It does not emulate CUDA's numerics, streams or memory.)
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

FAKE = torch.device("cpu", 1)
CPU = torch.device("cpu")
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.index_select}
_COPIES = {torch.Tensor.copy_}  # copy_ moves data across devices on CUDA too


class OnFake(torch.Tensor):
    """A CPU tensor that stands for one on the accelerator."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # the mode below does the work

    @property
    def device(self):
        return FAKE

    def numpy(self, *args, **kwargs):
        raise TypeError(
            "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
            "tensor to host memory first. (fake accelerator)"
        )

    def __array__(self, *args, **kwargs):
        return self.numpy()

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            with torch._C.DisableTorchFunction():
                new = torch.Tensor._make_subclass(OnFake, self.detach().clone(), self.requires_grad)
            if getattr(self, "_is_param", False):
                new._is_param = True
            memo[id(self)] = new
        return memo[id(self)]


def _is_fake_device(d) -> bool:
    if isinstance(d, OnFake):
        return True
    if isinstance(d, torch.Tensor):
        return False
    try:
        return d is not None and torch.device(d) == FAKE
    except (TypeError, RuntimeError):
        return False


def _is_cpu_device(d) -> bool:
    if isinstance(d, torch.Tensor):
        return not isinstance(d, OnFake)
    try:
        return d is not None and torch.device(d) == CPU
    except (TypeError, RuntimeError):
        return False


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_map(x, fn) for x in obj)
    if isinstance(obj, list):
        return [_map(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, OnFake) else t


def _fake(t):
    return t if isinstance(t, OnFake) else t.as_subclass(OnFake)


def _target(func, args, kwargs):
    """Where a transfer or factory call puts its result: 'fake', 'cpu' or None (unchanged)."""
    if func in (torch.Tensor.cpu,):
        return "cpu"
    if func is torch.Tensor.cuda:
        return "fake"
    if func is torch.Tensor.to:
        candidates = list(args[1:]) + [kwargs.get("device"), kwargs.get("other")]
        for c in candidates:
            if isinstance(c, (torch.device, str, OnFake, torch.Tensor)) and not isinstance(c, torch.dtype):
                if _is_fake_device(c):
                    return "fake"
                if _is_cpu_device(c):
                    return "cpu"
        return None
    if "device" in kwargs and kwargs["device"] is not None:
        return (
            "fake"
            if _is_fake_device(kwargs["device"])
            else "cpu"
            if _is_cpu_device(kwargs["device"])
            else None
        )
    return None


class _Strict(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        target = _target(func, args, kwargs)
        if "device" in kwargs and _is_fake_device(kwargs["device"]):
            kwargs["device"] = CPU
        if func is torch.Tensor.to:
            args = tuple(CPU if (not isinstance(a, torch.Tensor) and _is_fake_device(a)) else a for a in args)
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        any_fake = any(isinstance(t, OnFake) for t in inputs)
        if any_fake and target is None and func not in _COPIES:
            checked = inputs
            if func in _INDEXING or func is torch.Tensor.__setitem__:
                checked = [args[0]] + (
                    [args[2]] if func is torch.Tensor.__setitem__ and len(args) > 2 else []
                )
                checked = [t for t in checked if isinstance(t, torch.Tensor)]
            cpu = [t for t in checked if not isinstance(t, OnFake) and t.dim() > 0]
            if cpu:
                raise RuntimeError(
                    "Expected all tensors to be on the same device, but found at least two devices, "
                    "cuda:0 and cpu! "
                    f"(fake accelerator: {getattr(func, '__name__', func)} got a CPU tensor of shape "
                    f"{tuple(cpu[0].shape)} beside the model's tensors)"
                )
        # OnFake disables its own __torch_function__, so the call runs as on plain CPU tensors
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and target == "cpu"):
            return (
                _plain(out).clone() if isinstance(out, OnFake) or out is args[0] else out
            )  # a copy, as a transfer
        wrap = target == "fake" or (any_fake and target != "cpu")
        if not wrap:
            return out
        if args and out is args[0] and isinstance(out, OnFake):
            return out  # an in-place method returns its own tensor
        return _map(out, _fake)


def to_fake(model):
    """Move ``model``'s parameters and buffers onto the fake accelerator (tied weights stay tied)."""
    memo = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in memo:
                    if isinstance(t, torch.nn.Parameter):
                        p = torch.Tensor._make_subclass(OnFake, t.detach(), t.requires_grad)
                        p._is_param = True  # isinstance(p, nn.Parameter) holds, as for a moved parameter
                        memo[id(t)] = p
                    else:
                        memo[id(t)] = _fake(t)
                store[name] = memo[id(t)]
    return model


@contextlib.contextmanager
def fake_accelerator():
    """Within this block, ``FAKE`` behaves as a second, strict device (see the module docstring)."""
    original_to = torch.nn.Module.to

    def module_to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device == FAKE:
            if dtype is not None:
                original_to(self, dtype)
            return to_fake(self)
        return original_to(self, *args, **kwargs)

    torch.nn.Module.to = module_to
    try:
        with _Strict():
            yield FAKE
    finally:
        torch.nn.Module.to = original_to
