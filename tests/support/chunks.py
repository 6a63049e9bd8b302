"""Feeding a sans-IO decoder its input in pieces, as the network may deliver it."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from postfix_mtasts.codec import FramingError

Feeder = Callable[[bytes], Sequence[object]]


def run(feed: Feeder, chunks: Sequence[bytes]) -> tuple[list[object], str | None]:
    """Feed chunks in order; return all events and the framing error, if any."""
    events: list[object] = []
    for chunk in chunks:
        try:
            events.extend(feed(chunk))
        except FramingError as error:
            events.extend(error.decoded)
            return events, str(error)
    return events, None


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` cut at the given offsets."""
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def one_byte_chunks(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]
