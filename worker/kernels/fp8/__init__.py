"""Block-scaled FP8 (e4m3) ops: the number format (quant.py) and the linear layer's GEMM (reference.py).

The torch references here are the source of truth; the Triton kernels that will replace them on the
GPU take the same parameters in the same order. The FP8 variant of the fused MoE lives with the MoE
op, in worker/kernels/moe/fp8_reference.py.
"""
