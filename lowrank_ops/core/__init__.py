"""Shared machinery: backend choice, input checks, the optional CUDA extension."""
