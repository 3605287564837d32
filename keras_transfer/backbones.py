"""The backbone registry: every image backbone in `keras.applications`, described as data.

Each `Backbone` entry carries what a transfer-learning run needs to know about an architecture:
its constructor, the preprocessing its ImageNet weights expect, its default and minimum image size,
and a regular expression naming the layers that end a block. The *unfreeze points* of a backbone are
the block ends where a single tensor crosses the cut (no residual edge jumps over it); they are read
off the built graph, listed from the top, so "unfreeze the top 2 blocks" means the same thing for
every family, and a cut there is a valid place to cache activations.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import keras

from keras_transfer._validate import image_hw


@dataclass(frozen=True)
class Backbone:
    """One `keras.applications` backbone, as data.

    Attributes:
        name: Registry key, snake_case (`"mobilenet_v2"`).
        constructor: The `keras.applications` function building it.
        preprocessing: Mode of `keras.applications.imagenet_utils.preprocess_input` its ImageNet
            weights expect: `"tf"` ([-1, 1]), `"torch"` (ImageNet mean/std), `"caffe"` (BGR minus
            means) or `"none"` (the model rescales its own input).
        default_size: Image side its ImageNet weights were trained at.
        min_size: Smallest image side the architecture accepts.
        block_end: Regular expression (`re.fullmatch`) naming layers that end a block.
        family: Human-readable family name, for listings.
        imagenet_sizes: Sizes with ImageNet weights; empty means any size at least `min_size`.
    """

    name: str
    constructor: Callable[..., keras.Model]
    preprocessing: str
    default_size: int
    min_size: int
    block_end: str
    family: str
    imagenet_sizes: tuple[int, ...] = field(default=())

    def build(self, image_size: int | tuple[int, int] | None = None, **kwargs) -> keras.Model:
        """Builds the headless backbone (`include_top=False`) at `image_size`."""
        size = image_hw(image_size or self.default_size)
        kwargs.setdefault("weights", None)
        model = self.constructor(include_top=False, input_shape=(*size, 3), **kwargs)
        # Renamed after construction: EfficientNetV2 looks its block table up by `name`.
        model.name = self.name
        return model


_apps = keras.applications

# One row per backbone: name, constructor, preprocessing, default size, minimum size, block end.
_EFFNET_END = r"block\d+[a-z]_(add|project_bn|drop)"
_RESNET_END = r"conv\d_block\d+_out"
_DENSENET_END = r"(pool\d_pool|conv\d_block\d+_concat)"
# ConvNeXt's residual sums are raw `x + y` operations, auto-named "add", "add_1", ...
_CONVNEXT_END = r"(add(_\d+)?|.*_downsampling_block_\d+)"
_NASNET_END = r"(normal_concat_\d+|reduction_concat_reduce_\d+)"

_ROWS = [
    ("mobilenet", _apps.MobileNet, "tf", 224, 32, r"conv_pw_\d+_relu", "MobileNet"),
    (
        "mobilenet_v2",
        _apps.MobileNetV2,
        "tf",
        224,
        32,
        r"(expanded_conv_project_BN|block_\d+_(add|project_BN))",
        "MobileNet",
    ),
    (
        "mobilenet_v3_small",
        _apps.MobileNetV3Small,
        "none",
        224,
        32,
        r"expanded_conv(_\d+)?_(add|project_bn)",
        "MobileNet",
    ),
    (
        "mobilenet_v3_large",
        _apps.MobileNetV3Large,
        "none",
        224,
        32,
        r"expanded_conv(_\d+)?_(add|project_bn)",
        "MobileNet",
    ),
    *[
        (
            f"efficientnet_b{i}",
            getattr(_apps, f"EfficientNetB{i}"),
            "none",
            size,
            32,
            _EFFNET_END,
            "EfficientNet",
        )
        for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600))
    ],
    *[
        (
            f"efficientnet_v2_{v.lower()}",
            getattr(_apps, f"EfficientNetV2{v}"),
            "none",
            size,
            32,
            _EFFNET_END,
            "EfficientNetV2",
        )
        for v, size in (
            ("B0", 224),
            ("B1", 240),
            ("B2", 260),
            ("B3", 300),
            ("S", 384),
            ("M", 480),
            ("L", 480),
        )
    ],
    ("resnet50", _apps.ResNet50, "caffe", 224, 32, _RESNET_END, "ResNet"),
    ("resnet101", _apps.ResNet101, "caffe", 224, 32, _RESNET_END, "ResNet"),
    ("resnet152", _apps.ResNet152, "caffe", 224, 32, _RESNET_END, "ResNet"),
    ("resnet50_v2", _apps.ResNet50V2, "tf", 224, 32, _RESNET_END, "ResNetV2"),
    ("resnet101_v2", _apps.ResNet101V2, "tf", 224, 32, _RESNET_END, "ResNetV2"),
    ("resnet152_v2", _apps.ResNet152V2, "tf", 224, 32, _RESNET_END, "ResNetV2"),
    ("densenet121", _apps.DenseNet121, "torch", 224, 32, _DENSENET_END, "DenseNet"),
    ("densenet169", _apps.DenseNet169, "torch", 224, 32, _DENSENET_END, "DenseNet"),
    ("densenet201", _apps.DenseNet201, "torch", 224, 32, _DENSENET_END, "DenseNet"),
    ("convnext_tiny", _apps.ConvNeXtTiny, "none", 224, 32, _CONVNEXT_END, "ConvNeXt"),
    ("convnext_small", _apps.ConvNeXtSmall, "none", 224, 32, _CONVNEXT_END, "ConvNeXt"),
    ("convnext_base", _apps.ConvNeXtBase, "none", 224, 32, _CONVNEXT_END, "ConvNeXt"),
    ("convnext_large", _apps.ConvNeXtLarge, "none", 224, 32, _CONVNEXT_END, "ConvNeXt"),
    ("convnext_xlarge", _apps.ConvNeXtXLarge, "none", 224, 32, _CONVNEXT_END, "ConvNeXt"),
    (
        "xception",
        _apps.Xception,
        "tf",
        299,
        71,
        r"(block\d+_pool|add(_\d+)?|block14_sepconv2_act)",
        "Xception",
    ),
    ("inception_v3", _apps.InceptionV3, "tf", 299, 75, r"mixed\d+", "Inception"),
    (
        "inception_resnet_v2",
        _apps.InceptionResNetV2,
        "tf",
        299,
        75,
        r"(mixed_\w+|block\d+_\d+_ac|conv_7b_ac)",
        "Inception",
    ),
    ("nasnet_mobile", _apps.NASNetMobile, "tf", 224, 32, _NASNET_END, "NASNet"),
    ("nasnet_large", _apps.NASNetLarge, "tf", 331, 32, _NASNET_END, "NASNet"),
    ("vgg16", _apps.VGG16, "caffe", 224, 32, r"block\d+_pool", "VGG"),
    ("vgg19", _apps.VGG19, "caffe", 224, 32, r"block\d+_pool", "VGG"),
]

_FIXED_IMAGENET_SIZES = {"nasnet_mobile": (224,), "nasnet_large": (331,)}

REGISTRY: dict[str, Backbone] = {
    name: Backbone(
        name=name,
        constructor=ctor,
        preprocessing=prep,
        default_size=default,
        min_size=minimum,
        block_end=block_end,
        family=family,
        imagenet_sizes=_FIXED_IMAGENET_SIZES.get(name, ()),
    )
    for name, ctor, prep, default, minimum, block_end, family in _ROWS
}


def _normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_NORMALIZED = {_normalize(name): name for name in REGISTRY}
# Also accept the keras.applications spelling ("MobileNetV2", "EfficientNetV2B0", "ResNet50V2").
_BY_NORMALIZED.update({_normalize(b.constructor.__name__): name for name, b in REGISTRY.items()})


def list_backbones(family: str | None = None) -> list[str]:
    """Lists the registry's backbone names.

    Args:
        family: Optional family name (`"EfficientNet"`, `"ResNet"`, ...) to filter by,
            case-insensitive.

    Returns:
        Sorted list of names accepted by `get_backbone` and the builders.

    Example:
    >>> import keras_transfer as kt
    >>> "mobilenet_v2" in kt.list_backbones()
    True
    """
    names = REGISTRY
    if family is not None:
        names = [n for n, b in REGISTRY.items() if b.family.lower() == family.lower()]
        if not names:
            families = sorted({b.family for b in REGISTRY.values()})
            raise ValueError(
                f"Unknown backbone `family`. Expected one of {families}. "
                f"Received: family={family!r}"
            )
    return sorted(names)


def get_backbone(name: str | Backbone) -> Backbone:
    """Returns the registry entry for `name`, accepting either spelling.

    Args:
        name: Registry name (`"mobilenet_v2"`), the `keras.applications` name (`"MobileNetV2"`) or
            a `Backbone` (returned unchanged).

    Raises:
        ValueError: for an unknown name, with the closest registry names as suggestions.

    Example:
    >>> import keras_transfer as kt
    >>> kt.get_backbone("MobileNetV2").preprocessing
    'tf'
    """
    if isinstance(name, Backbone):
        return name
    if not isinstance(name, str):
        raise TypeError(
            "`backbone` must be a registry name such as 'mobilenet_v2' (see "
            f"kt.list_backbones()). Received: backbone={name!r} of type {type(name).__name__}"
        )
    key = _BY_NORMALIZED.get(_normalize(name))
    if key is not None:
        return REGISTRY[key]
    close = difflib.get_close_matches(name.lower(), list(REGISTRY), n=3, cutoff=0.5)
    close += [
        REGISTRY[_BY_NORMALIZED[k]].name
        for k in difflib.get_close_matches(_normalize(name), list(_BY_NORMALIZED), n=3, cutoff=0.6)
    ]
    close = list(dict.fromkeys(close))[:3]
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Unknown backbone {name!r}.{hint} Expected one of kt.list_backbones(): "
        f"{', '.join(sorted(REGISTRY))}. Received: backbone={name!r}"
    )


def single_tensor_cuts(model: keras.Model) -> list[str]:
    """Names of layers after which exactly one tensor (that layer's output) flows on.

    Walks the Functional graph in topological order and keeps the set of tensors produced so far
    and still needed later; where that set is just the current layer's output, the graph can be
    split in two there: the bottom part's output is the only input of the top part.

    Args:
        model: A Functional `keras.Model` (typically a backbone).

    Returns:
        Layer names in bottom-to-top order.
    """
    # `operations`, not `layers`: a raw `x + y` in a Functional graph is an operation, not a layer.
    layers = model.operations
    position = {id(layer): i for i, layer in enumerate(layers)}
    last_use: dict[tuple[int, int], int] = {}
    for j, layer in enumerate(layers):
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                history = tensor._keras_history
                producer = position.get(id(history.operation))
                if producer is not None:
                    key = (producer, history.tensor_index)
                    last_use[key] = max(last_use.get(key, -1), j)
    for tensor in model.outputs:
        history = tensor._keras_history
        last_use[(position[id(history.operation)], history.tensor_index)] = len(layers)

    cuts = []
    live: set[tuple[int, int]] = set()
    for i, layer in enumerate(layers):
        live = {key for key in live if last_use[key] > i}
        live |= {key for key in last_use if key[0] == i and last_use[key] > i}
        if len(live) == 1 and next(iter(live))[0] == i and i < len(layers) - 1:
            cuts.append(layer.name)
    return cuts


def unfreeze_points(backbone_model: keras.Model, spec: Backbone | str | None = None) -> list[str]:
    """Block ends of a built backbone where a single tensor crosses, listed from the top.

    `unfreeze_points(base)[n - 1]` is the last frozen layer when the top `n` blocks train.

    Args:
        backbone_model: The built backbone (a Functional `keras.Model`).
        spec: Its registry entry or name; found from the model's name when omitted.

    Returns:
        Layer names, topmost first.
    """
    key = backbone_model.name
    if spec is None and key not in REGISTRY:  # a fusion model's repeated copy: "<name>_2"
        key = re.sub(r"_\d+$", "", key)
    spec = get_backbone(spec if spec is not None else key)
    pattern = re.compile(spec.block_end)
    return [
        name for name in reversed(single_tensor_cuts(backbone_model)) if pattern.fullmatch(name)
    ]
