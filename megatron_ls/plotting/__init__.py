"""Figures of training runs and benchmarks (matplotlib, optional: pip install 'megatron-ls[plot]')."""
