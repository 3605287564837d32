"""BatchNorm-safe freezing and partial unfreezing of a model's backbone, by block, fraction or name.

Two traps are closed here. BatchNormalization layers stay frozen when a backbone is unfrozen: a
frozen Keras 3 BatchNorm runs in inference mode even inside `fit`, so its moving statistics never
move (the `training=False` the builders call the backbone with is overridden by Keras 3 in nested
models; freezing is what holds). And a compiled model is recompiled after its trainable set
changes, because Keras keeps training the variables it compiled with until it is compiled again.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import keras

from keras_transfer.backbones import REGISTRY, unfreeze_points

logger = logging.getLogger(__name__)


def duplicate_name(name: str, occurrence: int) -> str:
    """The name of the `occurrence`-th copy (from 1) of registry backbone `name` in one model."""
    return name if occurrence == 1 else f"{name}_{occurrence}"


def registry_entry(backbone: keras.Model):
    """The registry entry a nested backbone was built from (also for `"<name>_2"`), or None."""
    spec = REGISTRY.get(backbone.name)
    if spec is None:
        match = re.fullmatch(r"(.+)_(\d+)", backbone.name)
        spec = REGISTRY.get(match.group(1)) if match else None
    return spec


def find_backbones(model: keras.Model) -> list[keras.Model]:
    """Returns every backbone nested in `model`: one for `kt.build_classifier`, several for
    `kt.build_fusion_classifier`, in graph order.

    The backbones are the nested Functional models named after a registry entry (a repeated one
    as `"<name>_2"`, ...); failing that, the only nested non-Sequential model.

    Raises:
        ValueError: if `model` holds no nested backbone model.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_fusion_classifier(
    ...     [("mobilenet_v2", {"alpha": 0.35}), "mobilenet_v3_small"], 3,
    ...     image_size=32, weights=None)
    >>> [b.name for b in kt.find_backbones(model)]
    ['mobilenet_v2', 'mobilenet_v3_small']
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: model={model!r}")
    nested = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential)
    ]
    registered = [layer for layer in nested if registry_entry(layer) is not None]
    if registered:
        return registered
    if len(nested) == 1:
        return nested
    raise ValueError(
        f"Could not find the backbone in model {model.name!r}: expected exactly one nested "
        f"backbone model, found {[layer.name for layer in nested]}. Build the model with "
        "kt.build_classifier / kt.build_regressor, or nest your backbone as one Functional model."
    )


def find_backbone(model: keras.Model, backbone: str | None = None) -> keras.Model:
    """Returns the backbone nested in `model` (as built by `kt.build_classifier`).

    The backbone is the nested Functional model named after a registry entry; failing that, the
    only nested non-Sequential model. A fusion model (`kt.build_fusion_classifier`) has several:
    name the one wanted with `backbone=`.

    Args:
        model: A model built by the kt builders.
        backbone: Name of the nested backbone (see `kt.freezing.find_backbones`); needed when
            `model` has several.

    Raises:
        ValueError: if `model` holds no nested backbone model, holds several and `backbone` is
            None, or has none named `backbone`.
    """
    found = find_backbones(model)
    names = [b.name for b in found]
    if backbone is None:
        if len(found) == 1:
            return found[0]
        raise ValueError(
            f"Model {model.name!r} fuses {len(found)} backbones {names}: say which one with "
            f"backbone=, e.g. kt.find_backbone(model, backbone={names[0]!r}) or "
            f"kt.unfreeze(model, blocks=2, backbone={names[0]!r}); in kt.fine_tune or a "
            f"kt.Phase give each backbone its part, unfreeze= / trainable={{{names[0]!r}: 2}}. "
            "kt.find_backbones(model) lists them all."
        )
    for layer in found:
        if layer.name == backbone:
            return layer
    close = difflib.get_close_matches(str(backbone), names, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Model {model.name!r} has no backbone named {backbone!r}.{hint} Its backbones are "
        f"{names}. Received: backbone={backbone!r}"
    )


def _all_layers(layer: keras.layers.Layer):
    yield layer
    for sub in getattr(layer, "layers", ()):
        yield from _all_layers(sub)


def freeze_batchnorm(backbone: keras.layers.Layer) -> None:
    """Freezes every BatchNormalization layer in `backbone`, which keeps it in inference mode."""
    for layer in _all_layers(backbone):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def _recompile(model: keras.Model) -> None:
    """Recompiles a compiled model so that `fit` sees its new trainable variables."""
    if not model.compiled:
        return
    with model.distribute_strategy.scope():
        try:
            model.compile_from_config(model.get_compile_config())
        except Exception as error:  # noqa: BLE001 - any (de)serialization failure, see below
            # A lambda or local-function loss or metric does not survive serialization (and is
            # refused under safe mode): compile again with the live objects `compile` was given,
            # and a fresh optimizer from the old one's config.
            logger.debug("compile_from_config failed (%s); recompiling with live objects", error)
            arguments = dict(model._compile_config.config)
            optimizer = arguments["optimizer"]
            if isinstance(optimizer, keras.optimizers.Optimizer):
                arguments["optimizer"] = optimizer.__class__.from_config(optimizer.get_config())
            model.compile(**arguments)
    logger.info("Recompiled %s so that its new trainable set takes effect.", model.name)


def freeze_backbone(model: keras.Model, backbone: str | None = None) -> keras.Model:
    """Freezes the whole backbone of `model`; the head stays trainable.

    A compiled model is recompiled (same optimizer config, fresh state) so the change takes effect.

    Args:
        model: A model built by `kt.build_classifier`, `kt.build_regressor` or
            `kt.build_fusion_classifier`.
        backbone: For a fusion model, the name of the one backbone to freeze; None freezes every
            backbone.

    Returns:
        `model`, for chaining.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> model = kt.freeze_backbone(model)
    >>> kt.find_backbone(model).trainable
    False
    """
    for nested in find_backbones(model) if backbone is None else [find_backbone(model, backbone)]:
        nested.trainable = False
    _recompile(model)
    return model


def _cut_for_fraction(backbone: keras.Model, points: list[str], fraction: float) -> int:
    """Position of the last frozen operation so that at least `fraction` of weighted layers train.

    Snaps to the nearest unfreeze point at or below the exact count, so the cut stays a
    single-tensor boundary.
    """
    ops = backbone.operations
    weighted = [i for i, op in enumerate(ops) if getattr(op, "weights", None)]
    needed = math.ceil(fraction * len(weighted))
    if needed == 0:
        return len(ops) - 1
    index = {op.name: i for i, op in enumerate(ops)}
    for name in points:  # from the top
        cut = index[name]
        if sum(1 for i in weighted if i > cut) >= needed:
            return cut
    return -1


def plan_unfreeze(
    model: keras.Model,
    blocks: int | None = None,
    *,
    fraction: float | None = None,
    from_layer: str | None = None,
    backbone: str | None = None,
    backbones: Mapping[str, Mapping | None] | None = None,
) -> int:
    """Validates `kt.unfreeze` arguments and returns the position of the cut, changing nothing.

    Returns:
        Index into the backbone's `operations` of the last frozen operation (-1: none frozen).
        With `backbones=`, the smallest of their cuts (what caching compares phases by).
    """
    if backbones is not None:
        cuts = [cut for cut in _plan_each(model, blocks, fraction, from_layer, backbones).values()]
        return min((c for c in cuts if c is not None), default=None)  # None: all stay frozen
    given = {"blocks": blocks, "fraction": fraction, "from_layer": from_layer}
    chosen = [k for k, v in given.items() if v is not None]
    if len(chosen) != 1:
        raise ValueError(
            "Give exactly one of `blocks`, `fraction` or `from_layer` to say how much of the "
            f"backbone trains. Received: {', '.join(f'{k}={v!r}' for k, v in given.items())}. "
            "For example unfreeze(model, blocks=2)."
        )
    backbone = find_backbone(model, backbone)
    ops = backbone.operations
    spec = registry_entry(backbone)
    points = unfreeze_points(backbone, spec) if spec else []

    if blocks is not None:
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 0:
            raise ValueError(f"`blocks` must be an int >= 0. Received: blocks={blocks!r}")
        if spec is None:
            raise ValueError(
                f"Backbone {backbone.name!r} is not in the registry, so its blocks are unknown. "
                f"Received: blocks={blocks}. Use from_layer='<layer name>' or fraction= instead."
            )
        if blocks > len(points):
            raise ValueError(
                f"`blocks` must be at most {len(points)}: {spec.name} has {len(points)} unfreeze "
                f"points. Received: blocks={blocks}. Use blocks <= {len(points)}, or "
                "fraction=1.0 to train the whole backbone."
            )
        return len(ops) - 1 if blocks == 0 else [op.name for op in ops].index(points[blocks - 1])
    elif fraction is not None:
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0.0 <= fraction <= 1.0
        ):
            raise ValueError(
                f"`fraction` must be a number in [0, 1]. Received: fraction={fraction!r}. "
                "Use e.g. fraction=0.3 to train the top 30% of the backbone's layers."
            )
        return _cut_for_fraction(backbone, points, float(fraction))
    else:
        names = [op.name for op in ops]
        if from_layer not in names:
            close = difflib.get_close_matches(str(from_layer), names, n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"Unknown `from_layer` {from_layer!r}: no such layer in backbone "
                f"{backbone.name!r}.{hint} See kt.unfreeze_points(kt.find_backbone(model)) for "
                f"block boundaries. Received: from_layer={from_layer!r}"
            )
        return names.index(from_layer) - 1


def unfreeze(
    model: keras.Model,
    blocks: int | None = None,
    *,
    fraction: float | None = None,
    from_layer: str | None = None,
    train_batchnorm: bool = False,
    backbone: str | None = None,
    backbones: Mapping[str, Mapping | None] | None = None,
) -> str | dict[str, str | None] | None:
    """Unfreezes the top of `model`'s backbone; the rest stays frozen.

    Give exactly one of `blocks`, `fraction` or `from_layer`. Blocks are counted from the top at
    the backbone's unfreeze points (`kt.unfreeze_points`), where one tensor crosses the cut, so
    the frozen part can be cached. BatchNormalization layers stay frozen unless `train_batchnorm`.
    A compiled model is recompiled so the change takes effect.

    Args:
        model: A model built by `kt.build_classifier` or `kt.build_regressor`.
        blocks: Number of top blocks to train (0 trains none of the backbone).
        fraction: Fraction in [0, 1] of the backbone's weighted layers to train, rounded up to
            the next block boundary. 1.0 trains the whole backbone.
        from_layer: Name of the first backbone layer to train; it and every layer after it train.
        train_batchnorm: Also train the BatchNormalization layers. In Keras 3 a trainable
            BatchNorm normalises with batch statistics in training and updates its moving
            statistics, so only do this with large batches and plenty of data.
        backbone: For a fusion model (`kt.build_fusion_classifier`), the name of the backbone
            to unfreeze; the other backbones stay as they are.
        backbones: For a fusion model, what trains in each backbone at once, as
            `{name: kt.unfreeze arguments or None}` (e.g. `{"mobilenet_v2": {"blocks": 2},
            "densenet121": None}`); backbones not listed or None are frozen. Not with
            `blocks`, `fraction` or `from_layer`.

    Returns:
        The name of the last frozen operation of the backbone (the cut), or None when the whole
        backbone trains; with `backbones=`, a dict of those for each backbone that trains.

    Raises:
        ValueError: for zero or several of `blocks`/`fraction`/`from_layer`, more blocks than the
            backbone has, a fraction outside [0, 1], an unknown layer name, or a fusion model
            without `backbone` or `backbones` (or with an unknown backbone name).

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> kt.unfreeze(model, blocks=2)
    'block_15_add'
    """
    if backbones is not None:
        plans = _plan_each(model, blocks, fraction, from_layer, backbones)
        if backbone is not None:
            raise ValueError(
                "Give `backbone` (one backbone) or `backbones` (each backbone's part), not both. "
                f"Received: backbone={backbone!r}, backbones={backbones!r}"
            )
        cuts = {}
        for nested in find_backbones(model):
            if backbones.get(nested.name) is None:
                nested.trainable = False
            else:
                cuts[nested.name] = _unfreeze_at(nested, plans[nested.name], train_batchnorm)
        _recompile(model)
        return cuts
    cut = plan_unfreeze(model, blocks, fraction=fraction, from_layer=from_layer, backbone=backbone)
    backbone = find_backbone(model, backbone)
    name = _unfreeze_at(backbone, cut, train_batchnorm)
    _recompile(model)
    return name


def _plan_each(model, blocks, fraction, from_layer, backbones) -> dict[str, int | None]:
    """Validates `unfreeze(backbones=...)`: each backbone's cut, None for a frozen one."""
    if any(v is not None for v in (blocks, fraction, from_layer)) or not isinstance(
        backbones, Mapping
    ):
        raise ValueError(
            "`backbones` is a dict {backbone name: kt.unfreeze arguments or None}, given instead "
            f"of `blocks`/`fraction`/`from_layer`. Received: backbones={backbones!r}, "
            f"blocks={blocks!r}, fraction={fraction!r}, from_layer={from_layer!r}. E.g. "
            "backbones={'mobilenet_v2': {'blocks': 2}}."
        )
    plans = {}
    for name, kwargs in backbones.items():
        find_backbone(model, name)  # an unknown name fails here, with suggestions
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ValueError(
                f"`backbones[{name!r}]` must be a dict of kt.unfreeze arguments or None. "
                f"Received: {kwargs!r}. E.g. {{'blocks': 2}}, {{'fraction': 1.0}}."
            )
        plans[name] = None if kwargs is None else plan_unfreeze(model, backbone=name, **kwargs)
    return plans


def _unfreeze_at(backbone: keras.Model, cut: int, train_batchnorm: bool) -> str | None:
    ops = backbone.operations
    backbone.trainable = True
    for i, op in enumerate(ops):
        if isinstance(op, keras.layers.Layer):
            op.trainable = i > cut
    if not train_batchnorm:
        freeze_batchnorm(backbone)
    return ops[cut].name if cut >= 0 else None


@dataclass
class BackboneSummary:
    """What trains in one backbone (an entry of `TrainableSummary.backbones`).

    Attributes:
        name: Name of the nested backbone.
        trainable_params: Trainable parameters inside it.
        trainable_blocks: Top blocks with trainable weights.
        total_blocks: Blocks it has (unfreeze points + 1).
        trainable_layers: Names of its layers with trainable weights, bottom to top.
        batchnorm_trainable: Whether any of its BatchNormalization layers trains.
    """

    name: str
    trainable_params: int
    trainable_blocks: int
    total_blocks: int
    trainable_layers: list[str] = field(default_factory=list)
    batchnorm_trainable: bool = False

    def line(self) -> str:
        return (
            f"  backbone {self.name}: {self.trainable_blocks} of {self.total_blocks} "
            f"blocks train, {self.trainable_params:,} parameters; BatchNorm "
            f"{'trains' if self.batchnorm_trainable else 'frozen'}"
        )


@dataclass
class TrainableSummary:
    """What trains in a model: parameter counts, backbone blocks and layers.

    For a fusion model the backbone fields add up its backbones (names joined by `" + "`) and
    `backbones` has one entry each.

    Attributes:
        model_name: The model's name.
        trainable_params: Number of trainable parameters in the whole model.
        total_params: Number of parameters in the whole model.
        backbone_name: Name of the nested backbone.
        backbone_trainable_params: Trainable parameters inside the backbone.
        trainable_blocks: Top blocks of the backbone with trainable weights.
        total_blocks: Blocks the backbone has (unfreeze points + 1).
        trainable_layers: Names of the layers with trainable weights, bottom to top.
        batchnorm_trainable: Whether any backbone BatchNormalization layer trains.
        backbones: One `BackboneSummary` per backbone, in graph order.
    """

    model_name: str
    trainable_params: int
    total_params: int
    backbone_name: str
    backbone_trainable_params: int
    trainable_blocks: int
    total_blocks: int
    trainable_layers: list[str] = field(default_factory=list)
    batchnorm_trainable: bool = False
    backbones: list[BackboneSummary] = field(default_factory=list)

    def __str__(self) -> str:
        share = self.trainable_params / max(self.total_params, 1)
        lines = [
            f"{self.model_name}: {self.trainable_params:,} of {self.total_params:,} parameters "
            f"train ({share:.1%})",
            *(b.line() for b in self.backbones),
            f"  trainable layers ({len(self.trainable_layers)}): "
            + ", ".join(self.trainable_layers[-12:])
            + (" ..." if len(self.trainable_layers) > 12 else ""),
        ]
        return "\n".join(lines)


def _count(variables) -> int:
    return int(sum(math.prod(v.shape) for v in variables))


def _backbone_summary(backbone: keras.Model) -> BackboneSummary:
    spec = registry_entry(backbone)
    points = unfreeze_points(backbone, spec) if spec else []
    ops = backbone.operations
    index = {op.name: i for i, op in enumerate(ops)}
    trainable_positions = [i for i, op in enumerate(ops) if getattr(op, "trainable_weights", None)]
    # Block 1 is above the topmost unfreeze point, block 2 between the first two, and so on.
    boundaries = [index[name] for name in points]
    return BackboneSummary(
        name=backbone.name,
        trainable_params=_count(backbone.trainable_weights),
        trainable_blocks=len({1 + sum(b >= i for b in boundaries) for i in trainable_positions}),
        total_blocks=len(points) + 1,
        trainable_layers=[ops[i].name for i in trainable_positions],
        batchnorm_trainable=any(
            layer.trainable_weights
            for layer in _all_layers(backbone)
            if isinstance(layer, keras.layers.BatchNormalization)
        ),
    )


def trainable_summary(model: keras.Model) -> TrainableSummary:
    """Tells which backbone blocks and layers train and how many parameters that is.

    Args:
        model: A model built by `kt.build_classifier`, `kt.build_regressor` or
            `kt.build_fusion_classifier`.

    Returns:
        A `TrainableSummary`; `print()` it for a readable report.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> _ = kt.unfreeze(model, blocks=1)
    >>> kt.trainable_summary(model).trainable_blocks
    1
    """
    found = find_backbones(model)
    parts = [_backbone_summary(backbone) for backbone in found]
    layers = [
        layer.name
        for layer in model.layers
        if not any(layer is backbone for backbone in found) and layer.trainable_weights
    ]
    return TrainableSummary(
        model_name=model.name,
        trainable_params=_count(model.trainable_weights),
        total_params=_count(model.weights),
        backbone_name=" + ".join(part.name for part in parts),
        backbone_trainable_params=sum(part.trainable_params for part in parts),
        trainable_blocks=sum(part.trainable_blocks for part in parts),
        total_blocks=sum(part.total_blocks for part in parts),
        trainable_layers=[name for part in parts for name in part.trainable_layers] + layers,
        batchnorm_trainable=any(part.batchnorm_trainable for part in parts),
        backbones=parts,
    )
