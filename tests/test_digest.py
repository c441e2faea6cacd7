"""``digest.PieceFeed``: the pieces' digests of a stream fed in runs of any size equal each piece's
one-shot digest (a copy hashed from the buffer it passes through gives the digests a file read gives)."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge import digest


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 3000), min_size=1, max_size=12),
       cuts=st.lists(st.integers(0, 40000), max_size=20))
def test_fed_in_any_runs_the_digests_are_the_pieces_one_shot_digests(lengths, cuts):
    data = os.urandom(sum(lengths))
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    feed = digest.PieceFeed(lengths)
    for a, b in itertools.pairwise(bounds):
        feed(memoryview(data)[a:b])
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert feed.digests() == [digest.piece_digest(data[s : s + n]) for s, n in zip(starts, lengths, strict=True)]


def test_a_short_or_long_feed_is_refused():
    feed = digest.PieceFeed([4, 4])
    feed(memoryview(b"12345"))
    with pytest.raises(AssertionError, match="fed 1 of 2 pieces"):
        feed.digests()
    with pytest.raises(AssertionError, match="more bytes than the pieces hold"):
        feed(memoryview(b"6789"))
