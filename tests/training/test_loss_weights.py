"""--loss-weight CHARS=W: the flag's syntax, the characters against the data's tokenizer, the weighted mean, and the
pipeline's loss function (weighted in training, never in evaluation). Layout equality: tests/parallel."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from repo_paths import REPO_ROOT

from megatron_ls.errors import ConfigError
from megatron_ls.model.head import mean_loss
from megatron_ls.training.loss_weights import parse_spec, token_loss_weights


def test_spec_syntax_and_ranges():
    assert parse_spec("a-c=2") == ("abc", 2.0)
    assert parse_spec("0-9.=0.5") == ("0123456789.", 0.5)
    assert parse_spec("-x=3") == ("-x", 3.0)  # a '-' that starts no range is itself
    assert parse_spec("==1") == ("=", 1.0)  # the last '=' separates the weight
    for bad in ("a-z", "a-z=", "=2", "a=-1", "a=inf", "a=nan", "a=x"):
        with pytest.raises(ConfigError, match="expected CHARS=W"):
            parse_spec(bad)
    with pytest.raises(ConfigError, match="range z-a is empty"):
        parse_spec("z-a=1")


def test_weights_map_characters_through_the_shards_tokenizer():
    w = token_loss_weights(["a-z=20", "q=0"], {"type": "byte", "vocab_size": 256}, 256)
    assert w.shape == (256,) and w[ord("a")] == 20 and w[ord("q")] == 0 and w[ord("A")] == 1
    t8 = token_loss_weights([" =3"], {"type": "text8", "vocab_size": 27}, 27)
    assert t8[0] == 3 and (t8[1:] == 1).all()  # text8's id 0 is the space
    assert token_loss_weights(None, None, 256) is None
    with pytest.raises(ConfigError, match="'A' is not in the data's vocabulary"):
        token_loss_weights(["A=2"], {"type": "text8", "vocab_size": 27}, 27)
    with pytest.raises(ConfigError, match="not one token"):
        token_loss_weights(["\u00e9=2"], {"type": "byte", "vocab_size": 256}, 256)  # two bytes in UTF-8
    with pytest.raises(ConfigError, match="record no tokenizer"):
        token_loss_weights(["a=2"], None, 256)


def test_mean_loss_scales_each_target_and_divides_by_the_token_count():
    nats = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    targets = torch.tensor([[0, 1], [2, 1]])
    assert mean_loss(nats, targets) == 2.5
    weights = torch.tensor([0.0, 2.0, 1.0])
    assert mean_loss(nats, targets, weights) == (0 + 4 + 3 + 8) / 4


def test_the_pipelines_loss_is_weighted_in_training_only():
    from megatron_ls.model.pipeline import PipeLoss

    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    plain = PipeLoss()
    loss_fn = PipeLoss()
    loss_fn.weights = torch.arange(7).float()
    nats = torch.nn.functional.cross_entropy(logits.view(-1, 7), targets.view(-1), reduction="none").view(2, 5)
    torch.testing.assert_close(loss_fn(logits, targets), (nats * targets).mean())
    torch.testing.assert_close(plain(logits, targets), nats.mean())
    loss_fn.accumulate = plain.accumulate = True  # evaluation: the plain mean and the exact sums
    torch.testing.assert_close(loss_fn(logits, targets), nats.mean())
    assert loss_fn.sum_nats == pytest.approx(float(nats.sum())) and loss_fn.tokens == 10


def test_a_bad_flag_is_one_line_and_a_failed_exit(tmp_path):
    r = subprocess.run([sys.executable, f"{REPO_ROOT}/pretrain_char_lm.py", "--data-path", str(tmp_path / "none"),
                        "--seq-length", "16", "--train-iters", "1", "--loss-weight", "a-z"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr  # a ConfigError, as every bad setting
    assert r.stderr.strip().endswith("expected CHARS=W with W a finite number >= 0, e.g. a-z=20")
    assert r.stderr.count("\n") == 1
