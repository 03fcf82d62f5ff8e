"""megatron-ls: Megatron/DeepSpeed-style training of the Long-Short Transformer."""

__version__ = "0.1.0"
