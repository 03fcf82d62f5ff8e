"""The parallel layout of a run, one frozen object validated once (torchtitan's ParallelDims is the model).

Degrees TP x SP x PP x DP = world, the ZeRO stage that shards over DP x SP, and the rank order of Megatron and
DeepSpeed's PipeModelDataParallelTopology, axes (pipe, data, model), with the sequence axis inside the data axis:
the tensor-parallel rank varies fastest (TP groups are contiguous ranks, they share a node), then the sequence-
parallel rank, then data-parallel, then pipeline stage:

    global_rank = ((pp_rank * dp + dp_rank) * sp + sp_rank) * tp + tp_rank

Sequence parallelism (SP) splits one segment's tokens over sp ranks that hold the same weights: gradients reduce
over the DP x SP ranks of one (pipeline stage, TP rank), which DeepSpeed calls the sequence-data-parallel group.

Every rule is checked in ``ParallelLayout.build`` from the arguments alone (no communication), so a bad layout
is the same ParallelConfigError on every rank. mpu builds its groups from it, start-up and the memory estimate
read its degrees, checkpoints record ``to_dict()``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from megatron_ls.errors import ParallelConfigError


@dataclass(frozen=True)
class RankCoordinates:
    pp_rank: int
    dp_rank: int
    tp_rank: int
    sp_rank: int = 0


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    sp: int = 1
    sequence_parallel: bool = False  # Megatron's: the residual stream split along the sequence within TP
    dp: int = field(init=False)

    def __post_init__(self) -> None:
        tp, pp, sp = self.tp, self.pp, self.sp
        if tp < 1 or pp < 1 or sp < 1:
            raise ParallelConfigError("--tensor-model-parallel-size, --pipeline-model-parallel-size and "
                                      "--sequence-parallel-size must be >= 1")
        if self.world_size % (tp * pp * sp) != 0:
            what = f" x --sequence-parallel-size ({sp})" if sp > 1 else ""
            raise ParallelConfigError(f"world size {self.world_size} is not divisible by --tensor-model-parallel-size "
                                      f"({tp}) x --pipeline-model-parallel-size ({pp}){what}")
        if self.sequence_parallel and (tp == 1 or pp > 1 or sp > 1):
            raise ParallelConfigError("--sequence-parallel splits the tokens within the tensor-parallel group: it "
                                      "needs --tensor-model-parallel-size > 1, and runs without pipeline parallelism "
                                      "and without --sequence-parallel-size")
        if pp > 1 and self.zero_stage > 1:
            raise ParallelConfigError(f"--zero-stage {self.zero_stage} cannot be used with pipeline parallelism "
                                      "(DeepSpeed's pipeline engine supports ZeRO stage 0 or 1)")
        object.__setattr__(self, "dp", self.world_size // (tp * pp * sp))

    @classmethod
    def build(cls, world_size: int, tp: int = 1, pp: int = 1, zero_stage: int = 0, sp: int = 1, *,
              sequence_parallel: bool = False, num_attention_heads: int | None = None,
              ffn_hidden_size: int | None = None, num_layers: int | None = None) -> ParallelLayout:
        """The layout, with the model's rules checked too when its sizes are given."""
        layout = cls(world_size, tp, pp, zero_stage, sp, sequence_parallel)
        if num_attention_heads is not None and num_attention_heads % tp:
            raise ParallelConfigError(f"--tensor-model-parallel-size ({tp}) must divide --num-attention-heads "
                                      f"({num_attention_heads}): tensor parallelism splits heads")
        if num_attention_heads is not None and (num_attention_heads // tp) % sp:
            raise ParallelConfigError(f"--sequence-parallel-size ({sp}) must divide the heads per tensor-parallel "
                                      f"rank ({num_attention_heads // tp}): DeepSpeed-Ulysses moves each rank's "
                                      "share of the heads, for the whole sequence, to one rank")
        if ffn_hidden_size is not None and ffn_hidden_size % tp:
            raise ParallelConfigError(f"--tensor-model-parallel-size ({tp}) must divide --ffn-hidden-size "
                                      f"({ffn_hidden_size})")
        if num_layers is not None and pp > num_layers:
            raise ParallelConfigError(f"--pipeline-model-parallel-size ({pp}) exceeds --num-layers ({num_layers}): "
                                      "every pipeline stage needs at least one transformer layer")
        return layout

    # ---- ranks ------------------------------------------------------------------------------------------
    def coordinates(self, rank: int) -> RankCoordinates:
        tp_rank, rest = rank % self.tp, rank // self.tp
        sp_rank, rest = rest % self.sp, rest // self.sp
        return RankCoordinates(rest // self.dp, rest % self.dp, tp_rank, sp_rank)

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int, sp_rank: int = 0) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.sp + sp_rank) * self.tp + tp_rank

    def _groups(self, varying: str) -> list[list[int]]:
        """The ranks that differ only along the axes in ``varying`` (letters of "pdst"), one list per group."""
        axes = {"p": range(self.pp), "d": range(self.dp), "s": range(self.sp), "t": range(self.tp)}
        fixed = [a for a in "pdst" if a not in varying]
        out = []
        for key in itertools.product(*(axes[a] for a in fixed)):
            where = dict(zip(fixed, key))
            group = []
            for vals in itertools.product(*(axes[a] for a in varying)):
                c = {**where, **dict(zip(varying, vals))}
                group.append(self.rank_of(c["p"], c["d"], c["t"], c["s"]))
            out.append(sorted(group))
        return out

    def tp_groups(self) -> list[list[int]]:
        return self._groups("t")

    def sp_groups(self) -> list[list[int]]:
        return self._groups("s")

    def dp_groups(self) -> list[list[int]]:
        return self._groups("d")

    def sequence_data_groups(self) -> list[list[int]]:
        """DP x SP: the ranks that hold the same weights (gradients reduce, ZeRO shards over them)."""
        return self._groups("ds")

    def pp_groups(self) -> list[list[int]]:
        return self._groups("p")

    # ---- records ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        """What checkpoints record (the names of the flags)."""
        return {"tensor_model_parallel_size": self.tp, "pipeline_model_parallel_size": self.pp,
                "data_parallel_size": self.dp, "sequence_parallel_size": self.sp,
                "sequence_parallel": self.sequence_parallel}

    def describe(self) -> str:
        sp = f" x SP {self.sp}" if self.sp > 1 else ""
        tsp = " (sequence-parallel within TP)" if self.sequence_parallel else ""
        return f"world {self.world_size} = TP {self.tp}{sp} x PP {self.pp} x DP {self.dp}{tsp}"
