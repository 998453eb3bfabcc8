"""Which compiled variant each Triton launch would need on a GPU, computed on the CPU.

Triton compiles one binary per specialization key: the constexpr values, the argument dtypes,
and classes of the runtime values (an int equal to 1 or divisible by 16, a pointer aligned to
16 bytes) for every argument the kernel does not exempt with `do_not_specialize`. Under the
interpreter nothing compiles, so tests record each launch's arguments through the kernel's
pre-run hook and ask Triton's own binder, built for an sm_90 target, for the key a GPU launch
with the same arguments would look up. Counting distinct keys counts compiled variants.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)


@functools.cache
def _backend():
    return make_backend(HOPPER)


def _binder(kernel, specialize_all: bool = False):
    """The binder a GPU JIT would build for this (interpreted or compiled) kernel; with
    specialize_all, as if the kernel exempted no argument from specialization."""
    if isinstance(kernel, JITFunction):
        fn, opts = (
            kernel.fn,
            {
                "do_not_specialize": kernel.do_not_specialize,
                "do_not_specialize_on_alignment": kernel.do_not_specialize_on_alignment,
            },
        )
    else:  # InterpretedFunction: the same function and specialization settings
        fn, opts = kernel.fn, {k: kernel.kwargs.get(k) for k in ("do_not_specialize", "do_not_specialize_on_alignment")}
    jit = JITFunction(fn, **({} if specialize_all else opts))
    binder = create_function_from_signature(jit.signature, jit.params, _backend())

    def key(*args, **kwargs) -> str:
        _, specialization, options = binder(*args, **kwargs)
        return compute_cache_key({}, specialization, options)

    return key


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str
    key: str  # the variant a GPU would compile for this launch
    naive_key: str  # the same, had the kernel exempted nothing from specialization


@contextlib.contextmanager
def record_variants(kernels: dict):
    """Yields a list that fills with a `Launch` per launch of the named kernels."""
    seen: list[Launch] = []
    hooks = []
    for name, kernel in kernels.items():
        real, naive = _binder(kernel), _binder(kernel, specialize_all=True)

        def hook(*args, _name=name, _real=real, _naive=naive, **kwargs):
            seen.append(Launch(_name, _real(*args, **kwargs), _naive(*args, **kwargs)))

        kernel.add_pre_run_hook(hook)
        hooks.append((kernel, hook))
    try:
        yield seen
    finally:
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)
