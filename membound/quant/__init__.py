"""Low-precision weights (and, later, KV cache): formats, quantizers, linear layers."""
