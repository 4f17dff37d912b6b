"""Tiny guest kernels shipped with hvmlab (NASM syntax), found by name."""
