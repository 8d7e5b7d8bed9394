"""One request's position in its grammar, and masking a batch's logits with the grammars' bitmasks."""

from __future__ import annotations

import torch


class RequestGrammar:
    """Tracks one sample's output through its compiled grammar (xgrammar's GrammarMatcher).

    The sampler asks for the allowed tokens (`fill`), the scheduler reports the sampled one
    (`accept`); once the grammar has accepted a stop token it is `terminated`.
    """

    def __init__(self, compiled) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into bitmask[row]; False when every token is allowed."""
        return self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar forbids it (it cannot, if masked)."""
        if self._matcher.is_terminated():
            return False
        return self._matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return self._matcher.is_terminated()


def attach_grammars(samples, compiled) -> None:
    """Give each sample (an engine Request) its own RequestGrammar of `compiled`, advanced past the
    output tokens it starts with (a resumed request). Raises ValueError when they break the grammar."""
    for sample in samples:
        grammar = RequestGrammar(compiled)
        if not all(grammar.accept(token_id) for token_id in sample.output_token_ids):
            raise ValueError("the resumed output tokens do not follow the request's structured-output grammar")
        sample.grammar = grammar


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """-inf on logits[r, t] for each r in rows and each token t the bitmask forbids (in place, float32).

    The C++ op (layers/kernels/token_bitmask.cpp) writes -inf straight from the bitmask's words, 0.1-0.3
    ms against 6.5 for xgrammar's CPU apply (16 rows of a 152k vocabulary); xgrammar's is the fallback where it cannot
    be built."""
    from scalellm.engine.layers.kernels import load_token_bitmask

    op = load_token_bitmask()
    if op is not None:
        op(logits, bitmask, torch.tensor(rows, dtype=torch.int64))
        return
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, bitmask, indices=rows)


class GrammarMasker:
    """Applies the grammars of a batch's rows to its logits, reusing one bitmask buffer."""

    def __init__(self) -> None:
        self._bitmask: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor, grammars: list[RequestGrammar | None], in_place: bool) -> torch.Tensor:
        """Float32 logits [B, V] where each row with a grammar has -inf on the tokens it forbids.

        Returns `logits` itself when no row has a grammar; otherwise masks `logits` in place when
        `in_place` (and it is float32), else a float32 copy (the raw logits then stay intact for
        logprobs, which describe the model, not the constraint).
        """
        rows = [i for i, grammar in enumerate(grammars) if grammar is not None]
        if not rows:
            return logits
        bitmask = self._buffer(len(grammars), logits.shape[1])  # [B, ceil(V / 32)] int32
        apply = [i for i in rows if grammars[i].fill(bitmask, i)]
        if not apply:
            return logits
        masked = logits if in_place and logits.dtype == torch.float32 else logits.to(torch.float32, copy=True)
        apply_bitmask(masked, bitmask, apply)
        return masked

    def _buffer(self, num_rows: int, vocab_size: int) -> torch.Tensor:
        import xgrammar

        width = (vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < num_rows or self._bitmask.shape[1] != width:
            self._bitmask = xgrammar.allocate_token_bitmask(max(num_rows, 16), vocab_size)
        return self._bitmask
