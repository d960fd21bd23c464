"""The one share allocator of every split (`rewrite.base.sizes`): largest remainder, at least one unit per part
unless parts may stay idle."""

from __future__ import annotations

import pytest

from edgesplit.rewrite.base import SplitError, sizes


def test_sizes_follow_the_weights_by_largest_remainder() -> None:
    assert sizes(6, [2, 1, 1, 1], "x") == [3, 1, 1, 1]
    assert sizes(12, [1] * 5, "x") == [3, 3, 2, 2, 2]
    assert sizes(3, [10, 1, 1], "x") == [1, 1, 1]  # every part at least one unit


def test_more_parts_than_units_raise_unless_idle_parts_are_allowed() -> None:
    with pytest.raises(SplitError, match=r"layer 'a': 4 parts asked but it has only 3; .*part would be empty$"):
        sizes(3, [1, 1, 1, 1], "layer 'a'")
    with pytest.raises(SplitError, match=r"part would be empty\. Use allow_idle=True"):
        sizes(3, [1, 1, 1, 1], "layer 'a'", remedy="Use allow_idle=True")
    assert sizes(2, [1, 1, 1], "x", allow_idle=True) == [1, 1, 0]
    assert sizes(2, [1, 1, 3], "x", allow_idle=True) == [1, 0, 1]  # due 0.4, 0.4, 1.2


def test_weights_must_be_positive_and_present() -> None:
    with pytest.raises(SplitError, match="positive device weights"):
        sizes(4, [1, 0], "x")
    with pytest.raises(SplitError, match="at least one device"):
        sizes(4, [], "x")
