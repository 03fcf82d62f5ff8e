"""Data: Megatron's indexed .bin/.idx shards, tokenizers, corpora, and the stream (lane) dataset."""

from megatron_ls.errors import DataError

from .corpora import CORPORA, SPLIT_NAMES, CorpusSpec, split_bounds
from .default_corpus import default_corpus_text, write_default_corpus
from .indexed_dataset import IndexedDatasetError, MMapIndexedDataset, MMapIndexedDatasetBuilder, best_dtype
from .lanes import LaneDataset, load_split, split_micro_batches
from .shards import meta_path, read_meta, split_prefix
from .tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Text8Tokenizer,
    build_tokenizer,
    tokenizer_mismatch,
    train_sentencepiece,
)

__all__ = [
    "CORPORA",
    "SPLIT_NAMES",
    "ByteTokenizer",
    "CorpusSpec",
    "DataError",
    "IndexedDatasetError",
    "LaneDataset",
    "MMapIndexedDataset",
    "MMapIndexedDatasetBuilder",
    "SentencePieceTokenizer",
    "Text8Tokenizer",
    "best_dtype",
    "build_tokenizer",
    "default_corpus_text",
    "load_split",
    "meta_path",
    "read_meta",
    "split_bounds",
    "split_micro_batches",
    "split_prefix",
    "tokenizer_mismatch",
    "train_sentencepiece",
    "write_default_corpus",
]
