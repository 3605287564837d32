"""Tests for `keras_transfer._validate`: the shared argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from keras_transfer._validate import check_bool, check_int, image_hw, is_int, is_number


def test_is_int_and_is_number_refuse_bools():
    assert [is_int(v) for v in (3, np.int64(3), True, np.bool_(True), 3.0, "3")] == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert [is_number(v) for v in (3, 2.5, np.float32(1), False, None)] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_check_int_returns_plain_ints_and_names_the_argument():
    value = check_int("top_k", np.int64(4), minimum=1)
    assert value == 4 and type(value) is int
    assert check_int("seed", None, allow_none=True) is None
    assert check_int("offset", -7) == -7
    for bad, kind in [(0, "a positive int"), (True, "a positive int"), (2.0, "a positive int")]:
        with pytest.raises(ValueError, match=f"`top_k` must be {kind}. Received: top_k={bad!r}"):
            check_int("top_k", bad, minimum=1)
    with pytest.raises(ValueError, match=r"must be None or an int >= 0\. Received: n=-1\. E\.g"):
        check_int("n", -1, minimum=0, allow_none=True, hint="E.g. n=3.")
    with pytest.raises(ValueError, match="Received: n=None"):
        check_int("n", None)


def test_check_bool():
    assert check_bool("overwrite", np.bool_(True)) is True
    for bad in (0, 1, "yes", None):
        with pytest.raises(ValueError, match=f"`overwrite` must be True or False. .*={bad!r}"):
            check_bool("overwrite", bad)


@pytest.mark.parametrize(
    ("value", "expected"), [(32, (32, 32)), ((20, 24), (20, 24)), ([np.int32(5), 7], (5, 7))]
)
def test_image_hw_accepts_ints_and_pairs(value, expected):
    size = image_hw(value)
    assert size == expected and all(type(s) is int for s in size)


@pytest.mark.parametrize("value", [0, -1, True, 3.5, (32,), (32, 0), (32.0, 32), "ab", None])
def test_image_hw_refuses_everything_else_and_says_how(value):
    with pytest.raises(ValueError, match=r"`size` must be a positive int .* Received: size="):
        image_hw(value, name="size")
