"""Fused Triton kernels for the grokking training step (installed as grokfast.kernels).

Tensors in, tensors out: nothing here knows of training loops, files or the command line.
"""
