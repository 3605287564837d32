"""Argument checks shared by every module, so each error reads the same way.

Every check raises before any work starts, naming the argument, the value received and the fix:
"`top_k` must be a positive int. Received: top_k=0". `bool` is a subclass of `int` in Python, so
`True` would otherwise pass as `1`; every int check here refuses it. NumPy integers are accepted
and returned as plain `int` (so they serialise to JSON and format as folder names).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """True for a Python or NumPy integer, False for `bool` and everything else."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_number(value: Any) -> bool:
    """True for a Python or NumPy int or float, False for `bool` and everything else."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _int_kind(minimum: int | None) -> str:
    if minimum is None:
        return "an int"
    if minimum == 1:
        return "a positive int"
    return f"an int >= {minimum}"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    allow_none: bool = False,
    hint: str = "",
) -> int | None:
    """Returns `value` as an `int`, or raises `ValueError` naming `name`.

    Args:
        name: The argument's name as the caller knows it, e.g. `"top_k"`.
        value: What was passed.
        minimum: Smallest accepted value, or `None` for no bound.
        allow_none: Accept `None` (returned as it is).
        hint: A sentence appended to the message: what the number means or an example.

    Returns:
        `int(value)`, or `None` when `allow_none` and `value is None`.

    Raises:
        ValueError: When `value` is not an int (a `bool` is not), or is below `minimum`.

    Example:
    >>> check_int("top_k", 3, minimum=1)
    3
    """
    if value is None and allow_none:
        return None
    if not is_int(value) or (minimum is not None and value < minimum):
        kind = ("None or " if allow_none else "") + _int_kind(minimum)
        message = f"`{name}` must be {kind}. Received: {name}={value!r}"
        raise ValueError(message + (f". {hint}" if hint else ""))
    return int(value)


def check_bool(name: str, value: Any, *, hint: str = "") -> bool:
    """Returns `value` if it is `True` or `False`, else raises `ValueError` naming `name`.

    A NumPy `bool_` is accepted and returned as a plain `bool`; `0`, `1` and strings are not.

    Example:
    >>> check_bool("overwrite", False)
    False
    """
    if not isinstance(value, bool | np.bool_):
        message = f"`{name}` must be True or False. Received: {name}={value!r}"
        raise ValueError(message + (f". {hint}" if hint else ""))
    return bool(value)


def image_hw(value: Any, name: str = "image_size") -> tuple[int, int]:
    """An image size given as an int (square) or a `(height, width)` pair, as `(h, w)` ints.

    Args:
        value: A positive int, or a pair of positive ints. Bools and floats are refused.
        name: The argument's name for the error message.

    Returns:
        `(height, width)` as plain ints.

    Raises:
        ValueError: For anything else, naming `name`, the value received and the fix.

    Example:
    >>> image_hw(224)
    (224, 224)
    >>> image_hw((160, 96))
    (160, 96)
    """
    if is_int(value):
        size: tuple = (value, value)
    elif isinstance(value, str | bytes):
        size = ()
    else:
        try:
            size = tuple(value)
        except TypeError:
            size = ()
    if len(size) != 2 or not all(is_int(s) and s > 0 for s in size):
        raise ValueError(
            f"`{name}` must be a positive int or a (height, width) pair of them. "
            f"Received: {name}={value!r}. E.g. {name}=224 or {name}=(224, 160)."
        )
    return int(size[0]), int(size[1])
