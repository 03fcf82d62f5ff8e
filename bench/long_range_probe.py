"""Where a long-short model's attention goes at the recall queries beyond its window (bench/long_range.py).

    python bench/long_range_probe.py runs/long_range/runs/long-short runs/long_range/data/recall \
        --output bench/results/long_range-probe.json

For every layer and head, averaged over the test queries at distances >= 2w (a window of them):
- ``landmark_mass``: attention probability on all landmarks (the rest is on the window);
- ``record_mass`` and ``uniform_share``: on the landmarks of the chunks that hold the record, and what an even
  spread over everything visible would give them;
- ``record_percentile``: the share of visible landmarks that score below the record's best landmark;
- ``window_minus_record``: logsumexp of the window scores minus the record landmark's score (in nats: how far
  the record is from taking the attention), and the mean window / landmark position terms behind it;
- ``dproj_on_value`` / ``dproj_on_key``: the dynamic projection's softmax weight (over the c positions of a
  chunk) on value bytes and key bytes of the record's chunks.

The attention inputs are captured from the model's own forward (the layer's call of ``long_short_attention`` and
``compress_landmarks_joint``) and the scores rebuilt by the reference formula (DESIGN.md §2), so nothing here
re-implements the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.data.recall_corpus import KEY_ALPHABET, VALUE_ALPHABET, RecallSpec, find_queries  # noqa: E402


@contextlib.contextmanager
def captured_attention():
    """Record the inputs of every long-short attention core call and, for each, the dynamic projection's softmax
    over the chunks of [memory ; segment] that call's landmarks were compressed from."""
    import megatron_ls.model.long_short_attention as layer

    calls: list[dict] = []
    projections: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []  # one per part (memory, segment) of the layer being run
    core, compress = layer.long_short_attention, layer.compress_landmarks_joint

    def core_spy(*args, **kwargs):
        out = core(*args, **kwargs)
        calls.append(dict(zip(("q", "k_win", "v_win", "k_lm", "v_lm", "u", "v", "r_win", "r_lm"), args), **kwargs,
                          out=out))
        projections.append(torch.cat(pending, dim=1))
        pending.clear()
        return out

    def compress_spy(x, proj_weight, proj_bias, *args, **kwargs):
        c = kwargs["chunk"]
        logits = F.linear(x, proj_weight, proj_bias)
        pending.append(F.softmax(logits.view(x.shape[0], x.shape[1] // c, c, -1).float(), dim=2))
        return compress(x, proj_weight, proj_bias, *args, **kwargs)

    layer.long_short_attention, layer.compress_landmarks_joint = core_spy, compress_spy
    try:
        yield calls, projections
    finally:
        layer.long_short_attention, layer.compress_landmarks_joint = core, compress


def scores(call: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(landmark scores, landmark position terms, window scores, window position terms) by the reference formula,
    -inf / nan where not visible. Shapes (B, H, N, n_lm) and (B, H, N, P+N)."""
    q, k_win, k_lm, r_win, r_lm = call["q"], call["k_win"], call["k_lm"], call["r_win"], call["r_lm"]
    B, H, N, dh = q.shape
    w, c, r, M = call["window"], call["chunk"], call["chunk_rank"], call["mem_len"]
    P = k_win.shape[2] - N
    qs = q * dh ** -0.5
    d_win = P + torch.arange(N)[:, None] - torch.arange(P + N)[None, :]
    pos_win = torch.matmul(qs + call["v"][None, :, None], r_win.transpose(-1, -2))
    pos_win = pos_win.gather(-1, d_win.clamp(0, w - 1).expand(B, H, N, P + N))
    s_win = torch.matmul(qs + call["u"][None, :, None], k_win.transpose(-1, -2)) + pos_win
    s_win = s_win.masked_fill(~((d_win >= 0) & (d_win < w)), float("-inf"))
    d_lm = (M + torch.arange(N)[:, None]) // c - 1 - torch.arange(k_lm.shape[2])[None, :] // r
    pos_lm = torch.matmul(qs, r_lm.transpose(-1, -2)).gather(-1, d_lm.clamp(0, r_lm.shape[1] - 1).expand(
        B, H, N, k_lm.shape[2]))
    s_lm = (torch.matmul(qs, k_lm.transpose(-1, -2)) + pos_lm).masked_fill(d_lm < 0, float("nan"))
    return s_lm, pos_lm, s_win, pos_win


@torch.no_grad()
def probe(run: str, prefix: str, max_tokens: int = 12_000, min_distance_windows: int = 2,
          spec: RecallSpec | None = None) -> dict:
    from megatron_ls.data.lanes import load_split
    from megatron_ls.inference.model_source import load_model

    model, _ = load_model(run)
    cfg = model.config
    if cfg.attention_type != "long-short":
        raise ValueError(f"{run} is a {cfg.attention_type} model: only long-short has landmarks to probe")
    w, c, N = cfg.window_size, cfg.chunk_size, cfg.seq_length or 128
    tokens = np.asarray(load_split(prefix, "test")[0][:max_tokens], dtype=np.int64)
    spec = spec or RecallSpec()
    queries = [q for q in find_queries(tokens, spec.key_length) if q.distance >= min_distance_windows * w]
    stats: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    memory = None
    with captured_attention() as (calls, projections):
        for start in range(0, len(tokens) - N, N):
            calls.clear()
            projections.clear()
            _, memory = model(torch.from_numpy(tokens[start: start + N])[None], memory)
            for layer, (call, proj) in enumerate(zip(calls, projections)):
                _collect(stats[layer], call, proj, tokens, queries, start, c, spec)
    return {"run": run, "queries": len(queries), "min_distance": min_distance_windows * w,
            "layers": [{k: np.mean(v, axis=0).round(3).tolist() for k, v in stats[layer].items()}
                       for layer in sorted(stats)]}


def _collect(st: dict, call: dict, proj: torch.Tensor, tokens: np.ndarray, queries: list, start: int,
             c: int, spec: RecallSpec) -> None:
    s_lm, pos_lm, s_win, pos_win = scores(call)
    N, n_lm, M = call["q"].shape[2], s_lm.shape[-1], call["mem_len"]
    base = start - M  # token index of stream position 0 (memory included)
    probs = torch.softmax(torch.cat([s_lm.nan_to_num(float("-inf")), s_win], -1), -1)
    # The rebuilt scores are the model's: their probabilities reproduce the core's output.
    rebuilt = torch.matmul(probs.to(call["v_lm"].dtype), torch.cat([call["v_lm"], call["v_win"]], 2))
    if not torch.allclose(rebuilt, call["out"], atol=1e-4, rtol=1e-3):
        raise RuntimeError(f"the rebuilt scores do not reproduce the core's output "
                           f"(max diff {float((rebuilt - call['out']).abs().max()):.2e})")
    probs = probs[0]
    for q in queries:
        i = q.position - 1 - start  # the row that predicts the value byte
        end = q.position - q.distance + 1  # just past the record's last value byte (the distance counts from it)
        record = end - spec.repeats * (spec.key_length + 1) - 1  # the record's '#'
        chunks = [j for j in range((record - base) // c, (end - 1 - base) // c + 1) if 0 <= j < n_lm]
        if not 0 <= i < N or not chunks:
            continue
        visible = ~torch.isnan(s_lm[0, 0, i])
        best = s_lm[0, :, i, chunks].max(-1).values
        st["landmark_mass"].append(probs[:, i, :n_lm].sum(-1).numpy())
        st["record_mass"].append(probs[:, i, chunks].sum(-1).numpy())
        st["uniform_share"].append(len(chunks) / float(visible.sum() + torch.isfinite(s_win[0, 0, i]).sum()))
        st["record_percentile"].append((s_lm[0, :, i][:, visible] < best[:, None]).float().mean(-1).numpy())
        st["window_minus_record"].append((torch.logsumexp(s_win[0, :, i], -1) - best).numpy())
        st["window_position_term"].append(pos_win[0, :, i][:, torch.isfinite(s_win[0, 0, i])].mean(-1).numpy())
        st["landmark_position_term"].append(pos_lm[0, :, i][:, visible].mean(-1).numpy())
        for j in chunks:
            chunk = tokens[base + j * c: base + (j + 1) * c]
            if len(chunk) == c:
                weights = proj[0, j]  # (c, heads * rank)
                st["dproj_on_value"].append(weights[np.isin(chunk, list(VALUE_ALPHABET))].sum(0).numpy())
                st["dproj_on_key"].append(weights[np.isin(chunk, list(KEY_ALPHABET))].sum(0).numpy())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a long-short training checkpoint folder (or consolidated)")
    p.add_argument("data_path", help="the recall shards' prefix")
    p.add_argument("--max-tokens", type=int, default=12_000)
    p.add_argument("--output", help="write the JSON here (default: print it)")
    a = p.parse_args(argv)
    text = json.dumps(probe(a.run, a.data_path, a.max_tokens), indent=1)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text + "\n")
        print(f"wrote {a.output}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
