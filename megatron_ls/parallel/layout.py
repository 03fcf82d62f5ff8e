"""The parallel layout of a run, one frozen object validated once (torchtitan's ParallelDims is the model).

Degrees TP x PP x DP = world, the ZeRO stage that shards over DP, and the rank order of Megatron and DeepSpeed's
PipeModelDataParallelTopology, axes (pipe, data, model): the tensor-parallel rank varies fastest, so TP groups
are contiguous ranks (they share a node), then data-parallel, then pipeline stage:

    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

Every rule is checked in ``ParallelLayout.build`` from the arguments alone (no communication), so a bad layout
is the same ParallelConfigError on every rank. mpu builds its groups from it, start-up and the memory estimate
read its degrees, checkpoints record ``to_dict()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ls.errors import ParallelConfigError


@dataclass(frozen=True)
class RankCoordinates:
    pp_rank: int
    dp_rank: int
    tp_rank: int


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    dp: int = field(init=False)

    def __post_init__(self) -> None:
        tp, pp = self.tp, self.pp
        if tp < 1 or pp < 1:
            raise ParallelConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        if self.world_size % (tp * pp) != 0:
            raise ParallelConfigError(f"world size {self.world_size} is not divisible by --tensor-model-parallel-size "
                                      f"({tp}) x --pipeline-model-parallel-size ({pp})")
        if pp > 1 and self.zero_stage > 1:
            raise ParallelConfigError(f"--zero-stage {self.zero_stage} cannot be used with pipeline parallelism "
                                      "(DeepSpeed's pipeline engine supports ZeRO stage 0 or 1)")
        object.__setattr__(self, "dp", self.world_size // (tp * pp))

    @classmethod
    def build(cls, world_size: int, tp: int = 1, pp: int = 1, zero_stage: int = 0, *,
              num_attention_heads: int | None = None, ffn_hidden_size: int | None = None,
              num_layers: int | None = None) -> ParallelLayout:
        """The layout, with the model's rules checked too when its sizes are given."""
        layout = cls(world_size, tp, pp, zero_stage)
        if num_attention_heads is not None and num_attention_heads % tp:
            raise ParallelConfigError(f"--tensor-model-parallel-size ({tp}) must divide --num-attention-heads "
                                      f"({num_attention_heads}): tensor parallelism splits heads")
        if ffn_hidden_size is not None and ffn_hidden_size % tp:
            raise ParallelConfigError(f"--tensor-model-parallel-size ({tp}) must divide --ffn-hidden-size "
                                      f"({ffn_hidden_size})")
        if num_layers is not None and pp > num_layers:
            raise ParallelConfigError(f"--pipeline-model-parallel-size ({pp}) exceeds --num-layers ({num_layers}): "
                                      "every pipeline stage needs at least one transformer layer")
        return layout

    # ---- ranks ------------------------------------------------------------------------------------------
    def coordinates(self, rank: int) -> RankCoordinates:
        return RankCoordinates(rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp)

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    # ---- records ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        """What checkpoints record (the names of the flags)."""
        return {"tensor_model_parallel_size": self.tp, "pipeline_model_parallel_size": self.pp,
                "data_parallel_size": self.dp}

    def describe(self) -> str:
        return f"world {self.world_size} = TP {self.tp} x PP {self.pp} x DP {self.dp}"
