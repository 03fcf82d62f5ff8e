"""TransformerLSConfig: every hyper-parameter of the model, validated at construction.

Presets are the paper's models (Zhu et al. 2021, official launch scripts): width 512, 8 heads,
FFN 2048, window 512, chunk 16, one landmark per chunk, memory = segment length.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

ATTENTION_TYPES = ("long-short", "full", "window")
ATTENTION_IMPLS = ("reference", "blocked", "fused", "auto")

_PAPER = dict(hidden_size=512, num_attention_heads=8, ffn_hidden_size=2048,
              window_size=512, chunk_size=16, chunk_rank=1)
PRESETS: dict[str, dict[str, Any]] = {
    # phase-1 segment length; later phases override seq_length / mem_length.
    "enwik8-12l": dict(_PAPER, vocab_size=256, num_layers=12, dropout=0.2, seq_length=2048, mem_length=2048),
    "enwik8-30l": dict(_PAPER, vocab_size=256, num_layers=30, dropout=0.4, seq_length=2048, mem_length=2048),
    "text8-12l": dict(_PAPER, vocab_size=27, num_layers=12, dropout=0.2, seq_length=2048, mem_length=2048),
}


@dataclass
class TransformerLSConfig:
    vocab_size: int = 256
    num_layers: int = 12
    hidden_size: int = 512
    num_attention_heads: int = 8
    ffn_hidden_size: int = 2048
    window_size: int = 512
    chunk_size: int = 16
    chunk_rank: int = 1
    mem_length: int = 0
    dropout: float = 0.2
    attention_dropout: float = 0.0  # on the joint attention probabilities (the paper uses 0)
    attention_type: str = "long-short"  # "full": causal attention over memory + segment (RoPE, SDPA)
    attention_impl: str = "auto"  # core of "long-short" and "window"; "auto": fused on CUDA sm_80+, else blocked
    seq_length: int | None = None  # segment length N; None = checked per call instead
    max_landmark_distance: int | None = None  # clamp of the landmark distance d (chunks); None = none
    init_method_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "window_size", "chunk_size", "chunk_rank"):
            positive(name)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must divide "
                             f"hidden_size ({self.hidden_size})")
        if (self.hidden_size // self.num_attention_heads) % 2 != 0 and self.attention_type == "full":
            raise ValueError("hidden_size / num_attention_heads must be even for rotary positions "
                             "(attention_type='full')")
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {self.attention_type!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.window_size < self.chunk_size:
            raise ValueError(f"window_size ({self.window_size}) must be >= chunk_size ({self.chunk_size}): "
                             "a query's own chunk is covered by the window only")
        if self.seq_length is not None:  # before mem_length, which often follows it
            positive("seq_length")
            if self.seq_length % self.chunk_size != 0:
                raise ValueError(f"seq_length ({self.seq_length}) must be a multiple of "
                                 f"chunk_size ({self.chunk_size})")
        if not isinstance(self.mem_length, int) or self.mem_length < 0:
            raise ValueError(f"mem_length must be a non-negative integer, got {self.mem_length!r}")
        if self.mem_length % self.chunk_size != 0:
            raise ValueError(f"mem_length ({self.mem_length}) must be a multiple of chunk_size ({self.chunk_size})")
        if self.max_landmark_distance is not None and (
                not isinstance(self.max_landmark_distance, int) or self.max_landmark_distance < 0):
            raise ValueError(f"max_landmark_distance must be None or >= 0, got {self.max_landmark_distance!r}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.init_method_std <= 0:
            raise ValueError(f"init_method_std must be > 0, got {self.init_method_std!r}")
        if self.layernorm_epsilon <= 0:
            raise ValueError(f"layernorm_epsilon must be > 0, got {self.layernorm_epsilon!r}")

    def check_segment(self, seq_len: int, mem_len: int = 0) -> None:
        """Raise if a segment of `seq_len` tokens with `mem_len` of memory cannot be chunked."""
        if seq_len % self.chunk_size != 0:
            raise ValueError(f"segment length N={seq_len} must be a multiple of chunk_size ({self.chunk_size})")
        if mem_len % self.chunk_size != 0:
            raise ValueError(f"memory length M={mem_len} must be a multiple of chunk_size ({self.chunk_size})")

    # ---- derived sizes ----------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary rounded up to a multiple of the tensor-parallel size (padding rows are masked)."""
        return int(math.ceil(self.vocab_size / tp) * tp)

    # ---- construction / serialisation -------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TransformerLSConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerLSConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TransformerLSConfig fields: {sorted(unknown)}")
        return cls(**d)
