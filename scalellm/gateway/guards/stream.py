"""Reply guarding with a bounded hold-back window, the same for streamed and non-streamed replies.

The gateway wraps a replica's stream of delta `RequestOutput`s in `GuardedStream`. Per sample it keeps
the reply text not yet released; each new delta is appended and the whole window is scanned again, so
a match spanning chunks is seen once its last chunk arrives. What is released is the window minus its
last `holdback_chars` (minus any match crossing that boundary), masked; on the sample's last delta
the whole rest is released. A blocking match releases the text before it and ends the sample with
finish_reason "content_filter"; once every sample ended, the stream ends and the caller's `aclose()`
aborts the request in the replica.

Token ids and usage counts pass through unchanged (held-back text is only delayed, never dropped,
unless a block ends the sample).
"""

from __future__ import annotations

from typing import AsyncIterator, Callable

from scalellm.gateway.guards.base import Guard, Span
from scalellm.protocol.types import CompletionOutput, RequestOutput

FINISH_CONTENT_FILTER = "content_filter"


class _Sample:
    __slots__ = ("pending", "done")

    def __init__(self) -> None:
        self.pending = ""
        self.done = False


class ReplyFilter:
    """The window logic over delta outputs, without I/O (GuardedStream feeds it)."""

    def __init__(self, guards: list[Guard], num_samples: int, count: Callable[[str, str], None]) -> None:
        """`count(guard name, action)` is called for every mask and block."""
        self.guards = [guard for guard in guards if guard.scans_output]
        self.holdback_chars = max((guard.max_match_chars for guard in self.guards), default=0)
        self._count = count
        self._samples = {index: _Sample() for index in range(num_samples)}

    @property
    def all_done(self) -> bool:
        return all(sample.done for sample in self._samples.values())

    def filter(self, output: RequestOutput) -> RequestOutput:
        """`output` with each sample's text released through the guards (samples already ended dropped)."""
        kept = []
        for sample in output.outputs:
            state = self._samples.setdefault(sample.index, _Sample())
            if state.done:
                continue
            self._release(sample, state)
            kept.append(sample)
        output.outputs = kept
        if self.all_done:
            output.finished = True
        return output

    def _release(self, sample: CompletionOutput, state: _Sample) -> None:
        window = state.pending + sample.text
        final = sample.finish_reason is not None
        boundary = len(window) if final else max(0, len(window) - self.holdback_chars)
        masks: list[tuple[Span, str]] = []
        block: tuple[int, str] | None = None
        for guard in self.guards:
            scan = guard.scan_output(window)
            masks += [(span, guard.name) for span in scan.masks]
            if scan.block_at is not None and (block is None or scan.block_at < block[0]):
                block = (scan.block_at, guard.name)
        if block is not None:
            boundary = block[0]
        masks = _without_overlaps(masks)
        for span, _ in masks:
            if span.start < boundary < span.end:
                boundary = span.start
        released = [(span, name) for span, name in masks if span.end <= boundary]
        for _, name in released:
            self._count(name, "masked_output")
        sample.text = _apply(window[:boundary], [span for span, _ in released])
        state.pending = window[boundary:]
        if block is not None:
            self._count(block[1], "blocked_output")
            sample.finish_reason, sample.stop_reason = FINISH_CONTENT_FILTER, None
        state.done = sample.finish_reason is not None


def _without_overlaps(masks: list[tuple[Span, str]]) -> list[tuple[Span, str]]:
    kept: list[tuple[Span, str]] = []
    for span, name in sorted(masks, key=lambda item: (item[0].start, -item[0].end)):
        if not kept or span.start >= kept[-1][0].end:
            kept.append((span, name))
    return kept


def _apply(text: str, spans: list[Span]) -> str:
    parts, last = [], 0
    for span in spans:
        parts += [text[last:span.start], span.replacement]
        last = span.end
    return "".join(parts) + text[last:]


class GuardedStream:
    """A replica stream seen through a ReplyFilter: async-iterable and closable like the stream itself."""

    def __init__(self, upstream, reply_filter: ReplyFilter) -> None:
        self._upstream = upstream
        self._filter = reply_filter

    def first(self, output: RequestOutput) -> RequestOutput:
        """The already-received first output, filtered."""
        return self._filter.filter(output)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self):
        if self._filter.all_done:
            return
        async for output in self._upstream:
            yield self._filter.filter(output)
            if self._filter.all_done:
                return

    async def aclose(self) -> None:
        await self._upstream.aclose()
