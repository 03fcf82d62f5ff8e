"""A small consolidated model folder (what convert_checkpoint.py writes) for the inference and tool tests."""

from __future__ import annotations

import torch

from megatron_ls.checkpoint.consolidated import save_consolidated
from megatron_ls.data.tokenizers import ByteTokenizer, Text8Tokenizer
from megatron_ls.model import TransformerLSConfig, TransformerLSLM


def make_model_dir(path: str, vocab: int = 256, tokenizer=None) -> str:
    config = TransformerLSConfig(vocab_size=vocab, num_layers=2, hidden_size=32, num_attention_heads=2,
                                 ffn_hidden_size=64, window_size=32, chunk_size=8, mem_length=32, seq_length=64,
                                 dropout=0.0, attention_impl="blocked")
    torch.manual_seed(0)
    model = TransformerLSLM(config)
    tok = tokenizer or (ByteTokenizer() if vocab == 256 else Text8Tokenizer())
    save_consolidated(path, model.state_dict(), config, tok.describe())
    return path
