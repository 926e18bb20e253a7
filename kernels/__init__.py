"""Fused attack-update kernels (Triton on CUDA, fused ATen on CPU) with their plain-torch references."""
