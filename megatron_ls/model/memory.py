"""The per-layer memory of a stream: the layer's inputs for the previous tokens, detached."""

from __future__ import annotations

import torch


def update_memory(memory: torch.Tensor | None, hidden: torch.Tensor, mem_length: int) -> torch.Tensor:
    """The last `mem_length` positions of [memory ; hidden], detached, as a fresh tensor (B, m, D).

    Shorter than mem_length while the stream is; always a multiple of the chunk size when the
    segment and the previous memory are.
    """
    hidden = hidden.detach()
    B, N, D = hidden.shape
    if mem_length == 0:
        return hidden.new_zeros(B, 0, D)
    if memory is None or memory.shape[1] == 0 or N >= mem_length:
        return hidden[:, N - min(N, mem_length):].clone()
    keep = min(memory.shape[1], mem_length - N)
    return torch.cat([memory[:, memory.shape[1] - keep:].detach(), hidden], dim=1)



class LaneMemory:
    """The memory of every lane set, one store for both forms of the model.

    ``{stream: {lane set: {layer index: (B, m, D)}}}``: a stream is "train" or "eval", a lane set the micro-batch
    index (micro-batch i of a step always holds the same lanes). A one-process model's engine keeps one for all
    its layers; a pipeline stage keeps one for its own layers (memory never crosses a stage boundary).
    """

    def __init__(self) -> None:
        self.store: dict[str, dict[int, dict[int, torch.Tensor]]] = {}
        self.stream = "train"  # the stream a pipeline stage's layers read and write now

    def get(self, lane_set: int, layer: int, stream: str | None = None) -> torch.Tensor | None:
        return self.store.get(stream or self.stream, {}).get(lane_set, {}).get(layer)

    def put(self, lane_set: int, layer: int, tensor: torch.Tensor, stream: str | None = None) -> None:
        self.store.setdefault(stream or self.stream, {}).setdefault(lane_set, {})[layer] = tensor

    def layers(self, stream: str, lane_set: int, num_layers: int) -> list[torch.Tensor] | None:
        """The per-layer list a one-process model takes (None at the start of a stream)."""
        by_layer = self.store.get(stream, {}).get(lane_set)
        return [by_layer[i] for i in range(num_layers)] if by_layer else None

    def put_layers(self, stream: str, lane_set: int, tensors: list[torch.Tensor]) -> None:
        self.store.setdefault(stream, {})[lane_set] = dict(enumerate(tensors))

    def reset(self, stream: str | None = None) -> None:
        """Forget one stream ("train" / "eval") or both: the lanes restart."""
        if stream is None:
            self.store.clear()
        else:
            self.store.pop(stream, None)

    def state_dict(self) -> dict[str, dict[int, dict[int, torch.Tensor]]]:
        """CPU copies, {stream: {lane set: {global layer index: tensor}}}."""
        return {s: {k: {i: t.detach().cpu().clone() for i, t in by_layer.items()} for k, by_layer in by_key.items()}
                for s, by_key in self.store.items()}

    def load_state_dict(self, state: dict, device: torch.device, layers: set[int] | None = None) -> None:
        """ValueError (nothing loaded) when a lane set holds other layers than ``layers``. Also takes the per-layer
        lists that one-process checkpoints held before this class existed."""
        loaded: dict[str, dict[int, dict[int, torch.Tensor]]] = {}
        for stream, by_key in state.items():
            for key, by_layer in by_key.items():
                by_layer = dict(enumerate(by_layer)) if isinstance(by_layer, (list, tuple)) else by_layer
                if layers is not None and set(by_layer) != layers:
                    raise ValueError(f"memory state holds layers {sorted(by_layer)}, this stage has {sorted(layers)}: "
                                     "resume with the pipeline layout it was saved with")
                loaded.setdefault(stream, {})[int(key)] = {int(i): t.to(device) for i, t in by_layer.items()}
        self.store = loaded
