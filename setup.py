"""The optional C extension (membound/kernels/cpu_ops.c): fused bf16 CPU ops for the decode path. Built by
`pip install`; where it cannot be built (no compiler), membound runs the same ops in PyTorch."""

import os
import platform

from setuptools import Extension, setup

# Tuned for the machine it is built on (the README's editable install runs where it was built; set
# MEMBOUND_PORTABLE=1 for a build that runs elsewhere); reductions may be vectorized (reassociated),
# which fixes their order at compile time, not per call.
flags = ["-O3", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
if not os.environ.get("MEMBOUND_PORTABLE"):
    flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")

setup(
    ext_modules=[
        Extension("membound.kernels._cpu_ops", ["membound/kernels/cpu_ops.c"], extra_compile_args=flags, optional=True)
    ]
)
