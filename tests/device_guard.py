"""A stand-in accelerator on the CPU, so CI catches device bugs without a GPU.

Why: every test runs on a CPU, where a forgotten `.to(device)` costs nothing, and on a GPU the same line is
`RuntimeError: Expected all tensors to be on the same device` (best-of-N crashed so on the first H200 run,
issue 31). This module registers a device named `fakegpu` (torch's PrivateUse1 backend, renamed) whose
tensors really live apart from the CPU's: `.to("fakegpu")`, `device=x.device` factories and `.cpu()` move
data across, and an op whose tensors mix the two devices raises as CUDA does. The models run on it through
their ordinary `device` setting (`device: fakegpu`), with no change to the code under test.

How: a tensor on the device is a wrapper subclass (`torch.Tensor._make_wrapper_subclass`, the pattern of
PyTorch's test/test_privateuseone_python_backend.py) whose `__torch_dispatch__` unwraps to the CPU tensor
it holds, runs the op there and wraps the result again. Factories with `device="fakegpu"` and no tensor
argument reach the PrivateUse1 dispatch key instead, where the same function is registered as their kernel.
Before running an op it applies CUDA's rules:
- every tensor argument on the same device, except 0-dim CPU tensors (CUDA takes them as scalars), the
  copies (`copy_`, `_to_copy`: how data moves) and CPU indices of `index` / `index_put_`;
- a random op that writes to the device needs a generator of the device, not a CPU one;
- `.numpy()` of a device tensor is an error (`.tolist()` and `.item()` copy, as on CUDA).

Not emulated: streams and asynchrony, memory limits, CUDA-only kernels and dtypes (bf16 runs on the CPU's
kernels), and the hub `kernels` library, which knows only real device types: `guard()` sets
USE_HUB_KERNELS=NO while it is active.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = "fakegpu"
"""The device's name: `torch.device("fakegpu")`, `WorldModelConfig(device="fakegpu")`, `IDMConfig(device=...)`."""

_aten = torch.ops.aten
_COPIES = {_aten.copy_, _aten.copy, _aten._to_copy, _aten._copy_from, _aten._copy_from_and_resize}
"""Ops that move data between devices: any mix is allowed."""
_INDEXING = {_aten.index, _aten.index_put_, _aten.index_put, _aten._index_put_impl_}
"""Ops whose `indices` (argument 1) may be CPU tensors on CUDA; their other tensors may not."""
_FACTORY_SKIP = ("sparse", "quantized", "nested", "from_file", "_make_dep_token", "cudnn", "efficientzerotensor")

_active = False
_installed = False
_libraries: list[torch.library.Library] = []


class DeviceTensor(torch.Tensor):
    """A tensor on the stand-in device: a wrapper (no storage of its own) around the CPU tensor `elem`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> DeviceTensor:
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=torch.device(DEVICE, 0), requires_grad=False)
        r.elem = elem
        return r

    def __repr__(self, **_: Any) -> str:
        return f"{self.elem!r} on {DEVICE}"

    # The traceable-wrapper protocol: with it `nn.Module._apply` (`.to(device, dtype)`) swaps a parameter for its
    # converted copy (`torch.utils.swap_tensors`) instead of assigning `.data`, which would keep the old `elem`.
    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: None, outer_size: Any,
                             outer_stride: Any) -> DeviceTensor:
        return DeviceTensor(inner["elem"])

    @property
    def data(self) -> torch.Tensor:  # type: ignore[override]
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        """`param.data = other` (e.g. fp32 master weights): the held CPU tensor follows the new one."""
        if not isinstance(new, DeviceTensor):
            raise NotImplementedError(f"assigning a cpu tensor to the .data of a {DEVICE} tensor is not emulated")
        torch.Tensor.data.__set__(self, new)
        self.elem = new.elem

    def tolist(self) -> Any:  # CUDA copies to the host for it
        return self.elem.tolist()

    def numpy(self, *, force: bool = False) -> Any:
        raise TypeError(f"can't convert {DEVICE}:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _run(func, args, kwargs or {})


def _on_device(device: Any) -> bool:
    return device is not None and torch.device(device).type == DEVICE


def _run(func: Any, args: tuple, kwargs: dict) -> Any:
    """Check `func`'s arguments as CUDA would, run it on the CPU tensors inside, wrap what lands on the device."""
    flat, _ = tree_flatten((args, kwargs))
    on_device = [t for t in flat if isinstance(t, DeviceTensor)]
    device = kwargs.get("device")
    to_device = _on_device(device) or (device is None and bool(on_device))
    packet = func.overloadpacket
    if on_device and packet not in _COPIES:
        checked = flat
        if packet in _INDEXING:
            checked, _ = tree_flatten(((args[0], *args[2:]), kwargs))
        host = [t for t in checked if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor) and t.dim()]
        if host:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, {DEVICE}:0 and cpu! "
                f"({func} got a cpu tensor of shape {tuple(host[0].shape)}; move it with .to(device))")
    if to_device and any(isinstance(g, torch.Generator) and g.device.type != DEVICE for g in flat):
        raise RuntimeError(f"Expected a '{DEVICE}' device type for generator but found 'cpu' ({func}: draw on the "
                           "CPU and move the result, or use a generator of the device)")
    if _on_device(device):
        kwargs = dict(kwargs, device=torch.device("cpu"))
    owners = {id(t.elem): t for t in on_device}  # in-place and out= ops return their (device) argument

    def unwrap(t: Any) -> Any:
        if not isinstance(t, DeviceTensor):
            return t
        if t.dtype != t.elem.dtype or t.shape != t.elem.shape:  # the stand-in's own consistency, not the code's
            raise AssertionError(f"{DEVICE} tensor {t.dtype}{list(t.shape)} holds {t.elem.dtype}{list(t.elem.shape)}")
        return t.elem

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    if not to_device:
        return out

    def wrap(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or isinstance(t, DeviceTensor):
            return t
        owner = owners.get(id(t))
        if owner is None:
            return DeviceTensor(t)
        if owner.shape != t.shape:  # a wrapper's metadata is fixed at creation: resizing in place is not emulated
            raise NotImplementedError(f"{func} resized a {DEVICE} tensor in place, which this stand-in cannot follow")
        return owner

    return tree_map(wrap, out)


class _Module:
    """`torch.fakegpu`: what torch and libraries ask a device module (available only while a guard is active)."""

    def is_available(self) -> bool:
        return _active

    def is_initialized(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        pass

    def get_rng_state(self, device: Any = None) -> torch.Tensor:  # `torch.random.fork_rng` forks the device's too
        return torch.zeros(0, dtype=torch.uint8)

    def set_rng_state(self, state: torch.Tensor, device: Any = None) -> None:
        pass

    def synchronize(self, device: Any = None) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def is_bf16_supported(self) -> bool:
        return True


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return _active

    def has_primary_context(self, dev_id: int) -> bool:
        return True

    def is_built(self) -> bool:
        return True


def _kernel(op: Any) -> Any:
    return lambda *args, **kwargs: _run(op, args, kwargs)


def install() -> torch.device:
    """Register the device once per process (torch allows one PrivateUse1 backend, named once); idempotent.

    Installed but not active, it leads no other code in the process to it: `torch.fakegpu.is_available()` and
    `torch.accelerator.is_available()` say no (though `current_accelerator()` names it), and no ordinary tensor
    ever reaches its kernels.
    """
    global _installed
    if not _installed:
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(DEVICE, backend_module=_Module(), hook=_Hooks())
        # Kernels for what reaches the PrivateUse1 key itself: factories (no tensor argument) and the copy into
        # a fresh device tensor that `torch.tensor(..., device=)` makes with Python dispatch turned off.
        # (A `Library.fallback` would be the one-line version, but torch 2.14 asserts inside it for the copy.)
        lib = torch.library.Library("aten", "IMPL")
        for name in torch._C._dispatch_get_all_op_names():
            if not name.startswith("aten::") or any(s in name for s in _FACTORY_SKIP):
                continue
            base, _, overload = name[len("aten::"):].partition(".")
            op = getattr(getattr(_aten, base), overload or "default")
            arguments = op._schema.arguments
            factory = any(a.name == "device" for a in arguments) and not any(
                isinstance(a.type, torch.TensorType) for a in arguments if not a.kwarg_only)
            if factory or base in ("copy_", "_copy_from", "_copy_from_and_resize", "_local_scalar_dense", "resize_"):
                lib.impl(name[len("aten::"):], _kernel(op), "PrivateUse1")
        _libraries.append(lib)  # the registrations live as long as the Library object
        _installed = True
    return torch.device(DEVICE, 0)


@contextlib.contextmanager
def guard() -> Iterator[torch.device]:
    """The stand-in device, available for the duration: `with guard() as device: model.to(device) ...`."""
    global _active
    device = install()
    outer, previous = _active, os.environ.get("USE_HUB_KERNELS")
    os.environ["USE_HUB_KERNELS"] = "NO"
    _active = True
    try:
        yield device
    finally:
        _active = outer
        if previous is None:
            os.environ.pop("USE_HUB_KERNELS", None)
        else:
            os.environ["USE_HUB_KERNELS"] = previous
