"""Kernels: one contract each, with Triton, C++ and torch implementations behind a dispatch."""
