"""The grammar bitmask op writes -inf exactly where xgrammar's own apply does, on the rows asked for."""

from __future__ import annotations

import pytest
import torch

from scalellm.engine.layers.kernels import load_token_bitmask
from scalellm.engine.structured import matcher

xgrammar = pytest.importorskip("xgrammar")


def _reference(logits, bitmask, rows):
    out = logits.clone()
    width = (logits.shape[1] + 31) // 32
    xgrammar.apply_token_bitmask_inplace(out, bitmask[:, :width].contiguous(), indices=rows)
    return out


@pytest.mark.parametrize("kernel", [True, False], ids=["cpp", "xgrammar-fallback"])
@pytest.mark.parametrize("vocab", [31, 32, 33, 49152, 151937])
def test_bitmask_matches_xgrammar(monkeypatch, kernel, vocab):
    if kernel and load_token_bitmask() is None:
        pytest.skip("the C++ kernel cannot be built here")
    if not kernel:
        monkeypatch.setattr("scalellm.engine.layers.kernels.load_token_bitmask", lambda: None)
    generator = torch.Generator().manual_seed(vocab)
    width = (vocab + 31) // 32 + 1  # a wider bitmask than the vocabulary needs is allowed
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, width), dtype=torch.int32, generator=generator)
    bitmask[0] = -1  # every token allowed
    bitmask[1] = 0  # none
    bitmask[2, ::3] = 0
    logits = torch.randn(6, vocab, generator=generator)
    rows = [0, 1, 2, 4]  # row 3 and 5 have no grammar: untouched whatever their bits say
    expected = _reference(logits, bitmask, rows)
    matcher.apply_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)
    assert torch.isinf(logits[1]).all() and not torch.isinf(logits[0]).any()


def test_bad_operands_are_refused():
    op = load_token_bitmask()
    if op is None:
        pytest.skip("the C++ kernel cannot be built here")
    logits = torch.zeros(2, 64)
    with pytest.raises(RuntimeError, match="fewer than"):
        op(logits, torch.zeros(2, 1, dtype=torch.int32), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="outside"):
        op(logits, torch.zeros(2, 2, dtype=torch.int32), torch.tensor([2]))
    with pytest.raises(RuntimeError, match="float32"):
        op(logits.double(), torch.zeros(2, 2, dtype=torch.int32), torch.tensor([0]))
