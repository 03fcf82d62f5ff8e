"""TrainEngine: the one training API for every layout (TP x PP x DP, ZeRO 0-3), on top of a DeepSpeed engine.

pp = 1: TransformerLSLM under deepspeed.initialize(mpu=...), micro-batches driven here (forward, backward, step per
micro-batch; DeepSpeed accumulates and steps at the boundary); the memory lives here, per stream and micro-batch.
pp > 1: TransformerLSPipe under DeepSpeed's PipelineEngine (train_batch / eval_batch); each stage keeps its own
layers' memory (model/pipeline.py).

Micro-batch i of a step always holds rows [i*mb, (i+1)*mb) of this DP rank's lanes, so its memory is the memory of
those same lanes at the previous step. Training and evaluation keep separate memory ("train" / "eval" streams).
A step whose loss is not finite resets the train memory of every lane (see train_step).
"""

from __future__ import annotations

import math
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from megatron_ls.errors import ParallelConfigError
from megatron_ls.model.config import TransformerLSConfig
from megatron_ls.model.head import mean_loss
from megatron_ls.model.lm import TransformerLSLM, pad_to_chunks
from megatron_ls.model.long_short_attention import set_selective_recompute
from megatron_ls.model.memory import LaneMemory
from megatron_ls.parallel import mpu
from megatron_ls.parallel.layout import ParallelLayout
from megatron_ls.parallel.random import model_parallel_seed, sequence_parallel_seed
from megatron_ls.parallel.recompute import configure_activation_checkpointing
from megatron_ls.parallel.sequence import local_tokens, sp_rank
from megatron_ls.training.checkpointing import agree_on_checkpoint
from megatron_ls.training.distributed import Layout
from megatron_ls.training.finetune import copy_weights
from megatron_ls.training.schedules import start_at_first_update

TRAIN, EVAL = "train", "eval"


def check_ds_config(ds_config: dict[str, Any], layout: Layout) -> tuple[int, int]:
    """Layout rules DeepSpeed would enforce later (or not at all); returns (micro batch, accumulation steps)."""
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    ParallelLayout(layout.world_size, layout.tp, layout.pp, stage)  # the layout's own rules, with this stage
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    if not isinstance(micro, int) or micro < 1:
        raise ParallelConfigError("the DeepSpeed config must set train_micro_batch_size_per_gpu (a positive integer)")
    gas = ds_config.get("gradient_accumulation_steps")
    total = ds_config.get("train_batch_size")
    if gas is None:
        if not isinstance(total, int) or total % (micro * layout.dp):
            raise ParallelConfigError(f"train_batch_size ({total}) must be a multiple of micro batch ({micro}) x "
                                      f"data-parallel size ({layout.dp})")
        gas = total // (micro * layout.dp)
    if total is not None and total != micro * gas * layout.dp:
        raise ParallelConfigError(f"train_batch_size ({total}) != micro batch ({micro}) x gradient accumulation "
                                  f"({gas}) x data-parallel size ({layout.dp})")
    return micro, int(gas)


def _param_groups(module: torch.nn.Module) -> list[dict[str, Any]]:
    """Megatron's rule: no weight decay on biases and norm weights (every 1-D parameter)."""
    decay, no_decay, seen = [], [], set()
    for p in module.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 partitioned parameter holds an empty tensor
        (no_decay if len(shape) < 2 else decay).append(p)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class TrainEngine:
    """Training and evaluation steps with per-lane memory, checkpoints, for any layout."""

    def __init__(self, ds_engine: Any, config: TransformerLSConfig, layout: Layout, micro_batch_size: int,
                 grad_accum_steps: int) -> None:
        self.engine = ds_engine
        self.config = config
        self.layout = layout
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.pipelined = layout.pp > 1
        # One store for the lanes' memory: with pp > 1 the stage module's (its layers read and write it).
        self.lanes: LaneMemory = self.module.lanes if self.pipelined else LaneMemory()
        self._grad_norm: float | None = None
        self._lr: float | None = None
        self._update_skipped = False
        self._act_shape: tuple[int, ...] | None = None
        self._pre_step_hooks: list = []
        self._loss_weights: torch.Tensor | None = None
        self._wrap_model_step()

    def set_loss_weights(self, weights: torch.Tensor | None) -> None:
        """Scale each target token's training loss by weights[token] (--loss-weight); None: the plain mean."""
        self._loss_weights = None if weights is None else weights.to(self.layout.device)
        if self.pipelined:
            self.module.pipe_loss.weights = self._loss_weights

    # ---- properties the loop logs ---------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def grad_norm(self) -> float | None:
        """Global gradient 2-norm of the last step (before clipping), identical on every rank."""
        return self._grad_norm

    @property
    def lr(self) -> float | None:
        """Learning rate the last step applied."""
        return self._lr

    @property
    def update_skipped(self) -> bool:
        """Whether the last train_step left the weights unchanged: DeepSpeed's overflow path (non-finite gradients,
        or the fp16 loss scaler lowering its scale) or ours for the optimizers that lack one. Same on every rank."""
        return self._update_skipped

    @property
    def dynamic_loss_scaling(self) -> bool:
        """fp16 with a dynamic loss scale: a skipped update with a finite loss is the scaler at work, not a fault."""
        return bool(self.engine.fp16_enabled() and self.engine.dynamic_loss_scale())

    @property
    def loss_scale(self) -> float | None:
        """fp16's current loss scale (held by DeepSpeed's optimizer wrapper); None without fp16."""
        if not self.engine.fp16_enabled():
            return None
        scale = getattr(self.engine.optimizer, "loss_scale", None)
        return None if scale is None else float(scale)

    @property
    def global_steps(self) -> int:
        return self.engine.global_steps

    # ---- the step -------------------------------------------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step on this DP rank's lanes (G/dp, N); returns the global mean loss in nats per token
        (weighted as set_loss_weights says).

        update_skipped then tells whether the optimizer step was skipped (non-finite gradients).
        """
        self._check_batch(inputs, targets, self.micro_batch_size * self.grad_accum_steps, "train_step")
        # Every SP rank of a lane set gets the lanes' whole segment and keeps its own slice of the tokens.
        inputs, targets = local_tokens(inputs.to(self.layout.device)), local_tokens(targets.to(self.layout.device))
        self._lr = float(self.engine.get_lr()[0])
        self._grad_norm = None
        skipped_before = self.engine.skipped_steps
        if self.pipelined:
            self._set_activation_shape(inputs.shape[1:], self.micro_batch_size)
            self.module.set_stream(TRAIN)
            loss = self.engine.train_batch(self._micro_batches(inputs, targets, self.micro_batch_size))
            loss = float(loss)
        else:
            loss = self._train_step_local(inputs, targets)
        self._update_skipped = self.engine.skipped_steps != skipped_before
        if self._grad_norm is None:
            norm = self.engine.get_global_grad_norm()
            self._grad_norm = None if norm is None else float(norm)
        if not math.isfinite(loss):
            # A non-finite loss means a non-finite forward: the memory this step stored (its layer inputs) may
            # hold NaN/inf and would poison every later step of these lanes. The loss is reduced over every
            # rank, so all ranks forget the train memory together; the lanes go on from their next segment
            # with an empty memory, as at the start of a stream. (Keeping the previous memory instead would
            # pair the new segment with a context one segment too old.) A skipped update with a finite loss (NaN/inf
            # gradients only, or fp16 loss scaling) keeps the memory: that forward was finite and is the right context.
            self.reset_memory(TRAIN)
        return loss

    def _train_step_local(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        self.engine.train()
        total = torch.zeros((), dtype=torch.float64, device=self.layout.device)
        mb = self.micro_batch_size
        sp = self.layout.parallel.sp
        divisor = self._sp_loss_divisor()
        for i in range(self.grad_accum_steps):
            rows = slice(i * mb, (i + 1) * mb)
            nats, new_memory = self.engine(inputs[rows], memory=self._lane_memory(TRAIN, i, mb), labels=targets[rows])
            self.lanes.put_layers(TRAIN, i, new_memory)
            loss = mean_loss(nats, targets[rows], self._loss_weights)
            self.engine.backward(loss / divisor if divisor > 1 else loss)  # DeepSpeed divides by the accumulation
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            total += loss.detach().double()
        total /= self.grad_accum_steps
        replicas = self.layout.dp * sp
        if replicas > 1:
            dist.all_reduce(total, group=mpu.get_sequence_data_parallel_group())
            total /= replicas
        return float(total)

    def _sp_loss_divisor(self) -> int:
        """What this rank's mean loss is divided by so that DeepSpeed's reduction over DP x SP yields the gradient of
        the mean over every token. Each SP rank holds 1/sp of a segment's tokens. DeepSpeed 0.19.8 sums gradients over
        the SP ranks (averaging over DP only) in its all-reduce paths (ZeRO 0-2, ZeRO 3 without reduce-scatter), but
        its ZeRO-3 reduce-scatter averages over DP x SP: there the local mean is already right."""
        sp = self.layout.parallel.sp
        if sp == 1 or (self.engine.zero_optimization_stage() == 3 and self.engine.zero_reduce_scatter()):
            return 1
        return sp

    def _lane_memory(self, stream: str, lane_set: int, rows: int) -> list[torch.Tensor] | None:
        memory = self.lanes.layers(stream, lane_set, self.config.num_layers)
        if memory and memory[0].shape[0] != rows:
            raise ValueError(f"the memory holds {memory[0].shape[0]} lanes per micro-batch, the batch {rows}; "
                             "reset_memory() when the lane layout changes")
        return memory

    # ---- evaluation -----------------------------------------------------------------------------------------------
    def eval_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        """Forward only, with the evaluation memory: (sum of nats, token count) over all DP ranks' lanes.

        A segment whose length is not a multiple of the chunk size (the short tail of a lane) is padded to whole
        chunks and only its real targets are counted; it ends the evaluation stream (the memory is reset after it).
        """
        if inputs.dim() != 2 or inputs.shape != targets.shape:
            raise ValueError(f"eval_step: inputs and targets must both be (lanes, N), got {tuple(inputs.shape)} "
                             f"and {tuple(targets.shape)}")
        n = inputs.shape[1]
        sp = self.layout.parallel.sp
        chunk = self.config.chunk_size * sp  # whole chunks on every SP rank
        if self.layout.parallel.sequence_parallel:  # and whole slices on every TP rank
            chunk = math.lcm(chunk, self.layout.tp)
        inputs = local_tokens(pad_to_chunks(inputs.to(self.layout.device), chunk))
        targets = local_tokens(pad_to_chunks(targets.to(self.layout.device), chunk))
        n_local = min(max(n - sp_rank() * inputs.shape[1], 0), inputs.shape[1])  # this rank's real targets
        lanes = inputs.shape[0]
        mb = self.micro_batch_size if lanes % self.micro_batch_size == 0 else lanes
        if self.pipelined:
            sums = self._eval_step_pipelined(inputs, targets, mb, n_local)
        else:
            sums = self._eval_step_local(inputs, targets, mb, n_local)
        if n % chunk:
            self.reset_memory(EVAL)  # it holds the padding: no segment can follow this one
        if self.layout.dp * sp > 1:
            dist.all_reduce(sums, group=mpu.get_sequence_data_parallel_group())
        return float(sums[0]), int(sums[1])

    def _eval_step_local(self, inputs: torch.Tensor, targets: torch.Tensor, mb: int, n: int) -> torch.Tensor:
        sums = torch.zeros(2, dtype=torch.float64, device=self.layout.device)
        self.engine.eval()
        try:
            with torch.no_grad():
                for i in range(inputs.shape[0] // mb):
                    rows = slice(i * mb, (i + 1) * mb)
                    nats, new_memory = self.engine(inputs[rows], memory=self._lane_memory(EVAL, i, mb),
                                                   labels=targets[rows])
                    self.lanes.put_layers(EVAL, i, new_memory)
                    nats = nats[:, :n]  # the real targets, not the padding's
                    sums[0] += nats.double().sum()
                    sums[1] += nats.numel()
        finally:
            self.engine.train()
        return sums

    def _eval_step_pipelined(self, inputs: torch.Tensor, targets: torch.Tensor, mb: int, n: int) -> torch.Tensor:
        module, loss_fn = self.module, self.module.pipe_loss
        self._set_activation_shape(inputs.shape[1:], mb)
        module.set_stream(EVAL)
        loss_fn.accumulate, loss_fn.valid_length, loss_fn.sum_nats, loss_fn.tokens = True, n, 0.0, 0
        try:
            self.engine.eval_batch(self._micro_batches(inputs, targets, mb), num_micro_batches=inputs.shape[0] // mb)
        finally:
            loss_fn.accumulate, loss_fn.valid_length = False, None
            module.set_stream(TRAIN)
        sums = torch.tensor([loss_fn.sum_nats, float(loss_fn.tokens)], dtype=torch.float64, device=self.layout.device)
        dist.broadcast(sums, src=mpu.get_pipeline_model_parallel_last_rank(),
                       group=mpu.get_pipeline_model_parallel_group())
        return sums

    # ---- memory ---------------------------------------------------------------------------------------------------
    def reset_memory(self, stream: str | None = None) -> None:
        """Forget the memory of one stream ("train" / "eval") or of both: the lanes restart."""
        self.lanes.reset(stream)

    def memory_state_dict(self) -> dict[str, Any]:
        """This rank's memory cache (CPU tensors): part of the state an exact resume needs."""
        return {"pipeline": self.pipelined, "memory": self.lanes.state_dict()}

    def load_memory_state_dict(self, state: dict[str, Any]) -> None:
        """ValueError when the state does not fit this engine's layout (nothing is loaded then)."""
        if bool(state.get("pipeline")) != self.pipelined:
            raise ValueError("the memory state was saved with a different pipeline layout; resume with the same "
                             "--pipeline-model-parallel-size or reset the memory")
        self._check_train_memory(state["memory"].get(TRAIN, {}))
        layers = {layer.index for layer in self.module.memory_layers()} if self.pipelined else None
        self.lanes.load_state_dict(state["memory"], self.layout.device, layers)

    def _check_train_memory(self, store: dict[int, Any]) -> None:
        """The train memory must be one entry per micro-batch of micro_batch_size lanes, as this engine steps."""
        for key, mem in store.items():
            tensors = list(mem.values()) if isinstance(mem, dict) else list(mem)  # {layer: t} with pp > 1
            lanes = {int(t.shape[0]) for t in tensors}
            if not 0 <= int(key) < self.grad_accum_steps or lanes - {self.micro_batch_size}:
                raise ValueError(f"the train memory holds micro-batch {key} of {sorted(lanes)} lanes, this run steps "
                                 f"{self.grad_accum_steps} micro-batches of {self.micro_batch_size} lanes; resume "
                                 "with the same --micro-batch-size")

    # ---- checkpoints (DeepSpeed's format) ---------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any] | None = None,
                        save_latest: bool = True) -> None:
        """save_latest=False leaves `latest` alone (the caller writes it once the checkpoint is complete)."""
        self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest)

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_optimizer_states: bool = True,
                        load_module_only: bool = False,
                        universal: bool = False) -> tuple[str | None, dict[str, Any] | None]:
        """(path loaded or None, client_state); module only = weights only (the paper's phase change). ``universal``:
        the folder is DeepSpeed's universal checkpoint, from which ZeRO cuts this group's partitions."""
        config = self.engine._config  # DeepSpeed reads the switch at load time; saves keep the normal format
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = universal
        # Two slips of DeepSpeed 0.19.8's ZeRO-3 universal load, undone below: it gives every parameter group group
        # 0's settings (the norms and biases would decay), and one `step` tensor to all of them (AdamW adds 1 to it
        # in place once per group and step, so the bias corrections run ahead).
        decay = [g.get("weight_decay") for g in self.engine.optimizer.param_groups] if universal else []
        try:
            result = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                                                 load_lr_scheduler_states=not load_module_only,
                                                 load_module_only=load_module_only)
        finally:
            config.load_universal_checkpoint = before
        for group, wd in zip(self.engine.optimizer.param_groups, decay):
            group["weight_decay"] = wd
        if universal:
            inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # ZeRO's torch optimizer
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        return result

    def refresh_lr(self) -> None:
        """Set the optimizer's rate from the scheduler's own iteration: after a resume that overrides the schedule,
        the loaded optimizer state still holds the rate the checkpoint's schedule gave the next update."""
        sched = getattr(self.engine, "lr_scheduler", None)
        if sched is not None and getattr(sched, "last_batch_iteration", None) is not None:
            sched.step(sched.last_batch_iteration)

    # ---- helpers --------------------------------------------------------------------------------------------------
    def add_pre_step_hook(self, hook) -> None:
        """hook() runs on every rank just before the optimizer step, gradients reduced (tests read them here)."""
        self._pre_step_hooks.append(hook)

    def _wrap_model_step(self) -> None:
        # Runs where the reduced gradients still exist: just before the step (DeepSpeedEngine.step and the pipeline's
        # optimizer step both call _take_model_step). ZeRO 0 without fp16 loss scaling: we measure and clip
        # ourselves, because DeepSpeed 0.19.8 gets the norm wrong there: in fp32 it reports none, and its
        # clip_grad_norm_ counts replicated parameters on the first pipeline stage only (it takes the rank in the
        # pipe x tensor group for the tensor-parallel rank); in bf16 with pp = 1 its unfused wrapper looks for the
        # tensor-parallel mark on the gradients instead of the parameters, dropping TP ranks > 0. The pipeline's
        # BF16_Optimizer and the ZeRO optimizers count correctly and keep their own clipping.
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        engine = self.engine
        self._own_clipping = (engine.zero_optimization_stage() == 0 and not engine.fp16_enabled()
                              and not isinstance(engine.optimizer, BF16_Optimizer))
        self._clip = float(engine.gradient_clipping() or 0.0)
        if self._own_clipping:
            engine._config.gradient_clipping = 0.0
            if hasattr(engine.optimizer, "clip_grad"):  # the bf16 unfused wrapper clips inside its step
                engine.optimizer.clip_grad = 0.0
        take_step = engine._take_model_step

        def wrapped(*args, **kwargs):
            for hook in self._pre_step_hooks:
                hook()
            if self._own_clipping:
                self._grad_norm = self._local_grad_norm()
                if not math.isfinite(self._grad_norm):
                    # The ZeRO and BF16 optimizers skip a non-finite step themselves (optimizer.overflow); the
                    # optimizers of this branch do not: take DeepSpeed's overflow path for them too.
                    return self._skip_step(take_step, *args, **kwargs)
                if self._clip > 0:
                    coef = self._clip / (self._grad_norm + 1e-6)  # DeepSpeed's formula
                    if coef < 1.0:
                        for p in self.module.parameters():
                            if p.grad is not None:
                                p.grad.mul_(coef)
            return take_step(*args, **kwargs)

        engine._take_model_step = wrapped

    def _skip_step(self, take_step, *args, **kwargs):
        """No update: DeepSpeed then zeroes the gradients, skips the scheduler step and counts a skipped step."""
        optimizer = self.engine.optimizer
        optimizer.step = lambda *a, **k: None  # an instance attribute shadows the real step for this call
        optimizer.overflow = True
        try:
            return take_step(*args, **kwargs)
        finally:
            del optimizer.step
            optimizer.overflow = False

    def _local_grad_norm(self) -> float:
        """2-norm of the (DP-reduced) gradients over the model: TP-replicated and pipeline-tied copies once."""
        tp_rank = mpu.get_tensor_model_parallel_rank()
        total = torch.zeros((), dtype=torch.float64, device=self.layout.device)
        for p in self.module.parameters():
            if p.grad is None or getattr(p, "ds_pipe_replicated", False):
                continue
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                total += p.grad.detach().double().pow(2).sum()
        for size, group in ((self.layout.tp, mpu.get_tensor_model_parallel_group()),
                            (self.layout.pp, mpu.get_pipeline_model_parallel_group())):
            if size > 1:
                dist.all_reduce(total, group=group)
        return math.sqrt(float(total))

    def _micro_batches(self, inputs: torch.Tensor, targets: torch.Tensor, mb: int):
        for i in range(inputs.shape[0] // mb):
            rows = slice(i * mb, (i + 1) * mb)
            index = torch.tensor([i], dtype=torch.long, device=inputs.device)
            yield (inputs[rows], index), targets[rows]

    def _set_activation_shape(self, segment_shape: torch.Size, mb: int) -> None:
        # The pipeline engine caches its receive buffers by shape: tell it when the shape changes.
        shape = (mb, *segment_shape)
        if self._act_shape is not None and shape != self._act_shape:
            self.engine.reset_activation_shape()
        self._act_shape = shape

    def _check_batch(self, inputs: torch.Tensor, targets: torch.Tensor, lanes: int, where: str) -> None:
        if inputs.dim() != 2 or inputs.shape != targets.shape or inputs.shape[0] != lanes:
            raise ValueError(f"{where}: inputs and targets must both be ({lanes}, N) = micro batch "
                             f"{self.micro_batch_size} x accumulation {self.grad_accum_steps} lanes of this DP rank; "
                             f"got {tuple(inputs.shape)} and {tuple(targets.shape)}")


def build_engine(config: TransformerLSConfig, ds_config: dict[str, Any], layout: Layout, seed: int,
                 checkpoint_activations: bool = False, recompute_attention: bool = False,
                 initial_weights: dict[str, torch.Tensor] | None = None) -> TrainEngine:
    """Seed, build the model for the layout (TransformerLSLM, or its PipelineModule with pp > 1), start DeepSpeed.

    `initial_weights` (TP=1 TransformerLSLM names, from training/finetune.py) replace the random initialisation.
    `recompute_attention`: selective recomputation of each long-short core (model/long_short_attention.py).
    """
    micro, gas = check_ds_config(ds_config, layout)
    ds_config = dict(ds_config)
    ds_config.setdefault("gradient_accumulation_steps", gas)

    model_parallel_seed(seed)
    if checkpoint_activations:
        configure_activation_checkpointing(num_layers=config.num_layers)
    if layout.pp > 1:
        from megatron_ls.model.pipeline import TransformerLSPipe, build_topology

        # The grid's data axis is DP x SP (the ranks with the same weights; ours orders SP inside DP, as the grid
        # does), so DeepSpeed counts every SP rank as a data-parallel one: its batch bookkeeping follows.
        model = TransformerLSPipe(config, build_topology(layout.pp, layout.tp, layout.dp * layout.parallel.sp),
                                  checkpoint_activations=checkpoint_activations)
        mpu_arg = None  # DeepSpeed takes the PipelineModule's grid (same rank order as our mpu)
        if layout.parallel.sp > 1:
            ds_config["train_batch_size"] = micro * gas * layout.dp * layout.parallel.sp
    else:
        model = TransformerLSLM(config)
        model.checkpoint_activations = checkpoint_activations
        mpu_arg = mpu
    sequence_parallel_seed(seed)  # the weights are built: each SP rank's own dropout stream from here
    set_selective_recompute(model, recompute_attention)
    if initial_weights is not None:  # --finetune: before DeepSpeed partitions (ZeRO-3) or copies (fp32 masters) them
        agree_on_checkpoint(lambda: copy_weights(model, initial_weights, config, layout.tp, layout.tp_rank,
                                                 layout.pp > 1), "copying the --finetune weights")
    model.to(layout.device)
    if layout.parallel.sp > 1 and int((ds_config.get("zero_optimization") or {}).get("stage", 0)) == 3:
        # DeepSpeed would partition the parameters over the DP group it asks mpu for; with SP they are shared by
        # DP x SP ranks, over which its reduce-scatter must run: partition them there first (as DeepSpeed-Ulysses'
        # users do with zero.Init(data_parallel_group=...)).
        deepspeed.zero.Init(module=model, data_parallel_group=mpu.get_sequence_data_parallel_group(),
                            config_dict_or_path=ds_config, mpu=mpu)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=_param_groups(model), config=ds_config,
                                              mpu=mpu_arg)
    start_at_first_update(ds_engine.lr_scheduler)
    return TrainEngine(ds_engine, config, layout, micro, gas)
