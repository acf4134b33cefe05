"""Launching a Triton kernel without Triton's per-call Python: :func:`launch`.

An eager decode step launches every compressed layer's kernels once per token, and at batch 1 a
kernel runs for a few microseconds, so the host time of a launch counts. Triton's own path
(``kernel[grid](...)``) rebuilds, on every call, the autotuner's key from every argument (a dtype
string per tensor), then the JIT's bound arguments, specialization and cache key, and checks
its global variables: 55 µs for the 49-argument autotuned GEAR split kernel, 25 µs through this
module (9 µs either way for the 12-argument combine kernel, which is not autotuned; measured on
a CPU with launches stubbed, ``bench/host_overhead.py``).

``launch(kernel, grid, *args, **kwargs)`` does what ``kernel[grid](*args, **kwargs)`` does. The
first call for a *launch key* goes through Triton, which compiles, autotunes and launches, and
keeps the compiled kernel it launched and the config the autotuner chose; later calls with the
same key launch that compiled kernel directly, with the arguments in Triton's order, the
launch-metadata hooks Triton would pass, the current device's stream and the grid evaluated
with the config's meta-parameters.

The launch key is at least as fine as everything Triton compiles, autotunes or launches on:
the current device; every argument's specialization computed by Triton's own function (a
tensor's dtype and 16-byte alignment, an int's width, whether it is 1 and whether 16 divides
it); the value of every argument that is not a tensor, int or float (constexprs, flags, None);
and the value of every argument the autotuner keys on. So two calls with one key would have
run the same compiled kernel with the same config through Triton too. Ints other than
autotune keys enter by their specialization only, so a decode step's growing sequence length
does not make a new key. Under the interpreter (CPU tests) :func:`launch` is
``kernel[grid](...)``, and so it is with a Triton that launches by another convention than the
one copied here or lacks its specialization function, and with ``LOWRANK_OPS_LAUNCH_CACHE=0``
(:data:`FAST_PATH`).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import triton
from triton.backends.compiler import BaseBackend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

try:  # Triton's own specialization of one argument (C++, what its binder calls) and its launch hooks
    from triton import knobs
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # pragma: no cover - an older Triton: every launch takes Triton's path
    knobs = native_specialize_impl = None


def _triton_launches_like_this() -> bool:
    """The installed Triton's ``JITFunction.run`` passes every bound argument (constexprs
    included) and the knobs' launch hooks to ``CompiledKernel.run``, the convention the fast path
    copies (Triton 3.3 on; before, it passed the non-constexpr values and other hooks), and its
    specialization function takes the arguments given here."""
    try:
        source = inspect.getsource(JITFunction.run)
        probe = native_specialize_impl(BaseBackend, 16, False, True, True)
    except Exception:  # pragma: no cover - another Triton: its own path only
        return False
    return ("knobs.runtime.launch_enter_hook" in source and "*bound_args.values())" in source
            and isinstance(probe, tuple))


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton kernels run on CPU tensors, interpreted
ENV_VAR = "LOWRANK_OPS_LAUNCH_CACHE"  # "0": every launch through Triton's own path
FAST_PATH = (not INTERPRET and os.environ.get(ENV_VAR, "1").strip() != "0" and native_specialize_impl is not None
             and _triton_launches_like_this())
MAX_ENTRIES = 256  # launch keys per kernel (specializations x autotune keys); past it, the cache restarts
Grid = Union[tuple, Callable[[dict], tuple]]
_SPECIALIZED = (torch.Tensor, int, float)  # argument types Triton specializes (others enter a key by value)


@dataclass(frozen=True)
class _Entry:
    """What a launch key runs: the compiled kernel, the autotuner's config (None for a plain JIT
    kernel) and its kwargs (meta-parameters and options), and the parameter names after the
    positional arguments, in signature order."""

    compiled: Any
    config: Optional[triton.Config]
    config_kwargs: dict
    tail_names: tuple


class _KernelState:
    """One kernel's launch cache and what its keys need: its parameter names, which parameters
    enter a key by value (constexprs and the autotuner's key arguments) and its backend per device."""

    def __init__(self, kernel: Union[Autotuner, JITFunction]):
        self.jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
        self.names = tuple(self.jit.arg_names)
        tuned = set(kernel.keys) if isinstance(kernel, Autotuner) else set()
        self.by_value = tuple(p.is_constexpr or p.name in tuned for p in self.jit.params)
        self.by_value_names = {name for name, v in zip(self.names, self.by_value) if v}
        # runtime arguments the autotuner keys on by value: a tensor there would make every call a
        # new key (and keep its tensor alive), so such a call is not cached
        self.tuned_runtime = tuple(i for i, p in enumerate(self.jit.params) if p.name in tuned and not p.is_constexpr)
        self.backends: dict[int, BaseBackend] = {}
        self.entries: dict[tuple, _Entry] = {}

    def backend(self, device: int) -> Optional[BaseBackend]:
        """The backend Triton specializes with on ``device`` (None before its first compile there)."""
        found = self.backends.get(device)
        if found is None:
            cache = self.jit.device_caches.get(device, ()) if hasattr(self.jit, "device_caches") else ()
            found = next((x for x in cache if isinstance(x, BaseBackend)), None)
            if found is not None:
                self.backends[device] = found
        return found


_STATES: dict[int, _KernelState] = {}  # id(kernel) -> state; kernels are module-level objects, never freed


def launch(kernel: Union[Autotuner, JITFunction], grid: Grid, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` (see the module docstring): Triton's path the first
    time a launch key is seen, the compiled kernel directly after that."""
    if not FAST_PATH:
        kernel[grid](*args, **kwargs)
        return
    state = _STATES.get(id(kernel))
    if state is None:
        state = _STATES[id(kernel)] = _KernelState(kernel)
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    key = _launch_key(state, device, args, kwargs)
    try:
        entry = state.entries.get(key) if key is not None else None
    except TypeError:  # an argument value that cannot be hashed: no key
        key = entry = None
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if key is not None:
            _remember(state, kernel, key, compiled, args, kwargs)
        return
    if entry.config is not None:
        kernel.best_config = entry.config  # as the autotuner leaves it: the config of the last launch
    params = {**kwargs, **entry.config_kwargs}
    values = args + tuple(params[name] for name in entry.tail_names)
    if callable(grid):
        try:  # grids read meta-parameters: the keyword arguments and the config's are enough
            grid = grid(params)
        except KeyError:  # one that reads a positional argument gets them all, as from Triton
            grid = grid(dict(zip(state.names, values)))
    grid = tuple(grid) + (1,) * (3 - len(grid))
    stream = driver.get_current_stream(device)
    compiled = entry.compiled
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *values), knobs.runtime.launch_enter_hook,
                 knobs.runtime.launch_exit_hook, *values)


def _launch_key(state: _KernelState, device: int, args: tuple, kwargs: dict) -> Optional[tuple]:
    """The launch key of one call (module docstring), or None before the kernel's first compile on
    ``device`` or for a tensor the autotuner keys on."""
    backend = state.backend(device)
    if backend is None or any(i < len(args) and isinstance(args[i], torch.Tensor) for i in state.tuned_runtime):
        return None
    spec, specialized = native_specialize_impl, _SPECIALIZED
    key = [arg if by_value or not isinstance(arg, specialized) else spec(backend, arg, False, True, True)
           for arg, by_value in zip(args, state.by_value)]
    if state.by_value_names.issuperset(kwargs):  # the usual case: keyword arguments are constexprs
        key.append(tuple(kwargs.items()))
    else:
        key.extend((name, arg if name in state.by_value_names or not isinstance(arg, specialized)
                    else spec(backend, arg, False, True, True)) for name, arg in kwargs.items())
    key.append(device)
    return tuple(key)  # hashed once, by the caller's lookup (a tuple does not keep its hash)


def _remember(state: _KernelState, kernel: Union[Autotuner, JITFunction], key: tuple, compiled: Any,
              args: tuple, kwargs: dict) -> None:
    """Keep what Triton just launched for ``key``, if every parameter after the positional ones
    was given (no default applied) and the compiled kernel has its handles."""
    chosen, config = None, {}
    if isinstance(kernel, Autotuner):
        chosen = getattr(kernel, "best_config", None)
        if chosen is None or chosen.pre_hook is not None:  # a config hook runs on Triton's path only
            return
        config = chosen.all_kwargs()
    tail_names = state.names[len(args):]
    given = {**kwargs, **config}
    if not all(name in given for name in tail_names) or getattr(compiled, "function", None) is None:
        return
    if len(state.entries) >= MAX_ENTRIES:
        state.entries.clear()
    state.entries[key] = _Entry(compiled, chosen, config, tail_names)


def forget(kernel: Union[Autotuner, JITFunction]) -> None:
    """Drop ``kernel``'s launch cache (after its autotuner's configs or choices were replaced)."""
    _STATES.pop(id(kernel), None)
