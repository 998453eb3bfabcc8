"""Triton kernels. They import only torch, triton and each other; the PyTorch code they are tested
against (tests/test_kernels.py) lives outside: membound.layers, membound.attention.torch_paged, and
the *_ref functions of quant_matmul (self-contained PyTorch)."""
