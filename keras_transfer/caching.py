"""Training on cached activations: run the frozen part of a model once, then train only the rest.

While the backbone (or its bottom) is frozen, every epoch recomputes the same activations for the
same images. `kt.fine_tune` instead runs the frozen *prefix* of the model once over the training
and validation data, in inference mode, and fits a *phase model* on the stored activations:

- phase 1 (head): the prefix ends at the pooling output; the phase model is the head.
- phase 2 (fine-tune): the prefix ends at the unfreeze cut, one of the backbone's single-tensor
  cut points (`kt.unfreeze_points`); the phase model is the rest of the backbone, the pooling and
  the head. When both phases cache, one forward pass over the data fills both caches.

Phase models are Functional models built from the full model's own tensors and layers, so they
share its variables: training a phase model trains the full model, with nothing to copy back.
Dropout in the head still applies during training.

Cached training sees the batches a plain fit would, in the same order: the caching pass iterates
a copy of the training pipeline whose shuffles keep their own random state (`detached_copy`), and
the cached training data is the pipeline itself with each image swapped for its activations,
looked up by a fingerprint of the image (`keyed_batches`). So a reshuffling source hands the
cached and the plain fit the same orders, epoch by epoch, and the two agree to float precision. A
first pass over the fingerprints refuses pipelines that give other images on another pass (random
ops in tf.data), whose randomness caching would freeze; they train plainly. Pipelines made of
in-memory tensors alone (`kt.data.from_arrays`) cannot, and skip that pass.

Caches live in memory up to `budget_bytes` and spill to `tf.data.Dataset.save` files beyond it
(spilled caches of reshuffling data reshuffle on their own, by chunks: same data, another order).

With random augmentation before the backbone, caching happens only for `augment_views=K` (K
augmented views stored per image, one drawn at random per image and epoch); otherwise the phase
runs plainly, and the log says why.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import datacheck, distribute, features, freezing, heads
from keras_transfer._validate import check_int
from keras_transfer.backbones import single_tensor_cuts

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BUDGET_BYTES = 2 * 1024**3
CACHE_MODES = ("auto", True, False)
POOLING_NAME = heads.POOLING_NAME
AUGMENTATION_NAME = heads.AUGMENTATION_NAME
# Callbacks that save or restore the model they are given: on a phase model they would save
# the head or suffix instead of the full model.
_SAVING_CALLBACKS = (keras.callbacks.ModelCheckpoint, keras.callbacks.BackupAndRestore)


@dataclass
class FeatureCache:
    """Activations of one dataset at one point of the model, in memory or on disk.

    Attributes:
        dataset: Unbatched `tf.data.Dataset` of `(activations, *targets)` examples; with
            augmented views, activations carry a leading views axis.
        num_examples: Number of examples.
        nbytes: Bytes the activations take.
        path: Folder of the `tf.data.Dataset.save` files when spilled to disk, else None.
        batch_size: Size of the source dataset's first batch, or None if unknown.
        keys: Fingerprint of each example's image, in cache order (see `image_keys`).
        activations: The activations as one tensor, in cache order, when in memory.
        targets: The targets (and sample weights) as tensors, in cache order, when in memory.
    """

    dataset: tf.data.Dataset
    num_examples: int
    nbytes: int
    path: str | None = None
    batch_size: int | None = None
    keys: np.ndarray | None = None
    activations: tf.Tensor | None = None
    targets: tuple[tf.Tensor, ...] | None = None

    @property
    def on_disk(self) -> bool:
        return self.path is not None


@dataclass
class CachedPhase:
    """What a cached phase fits: a phase model sharing weights with the full model, and data.

    Attributes:
        model: The phase model (head, or backbone top + head); its layers are the full model's.
        train_data: Batched training activations.
        validation_data: Batched validation activations, or None.
        cut: Where the cache was taken: `"pooling"` or the name of the last frozen backbone op.
        caches: The underlying caches (for their sizes and files).
        checked: Whether the caching pass checked the data against the head (`kt.datacheck`).
    """

    model: keras.Model
    train_data: tf.data.Dataset
    validation_data: tf.data.Dataset | None
    cut: str
    caches: list[FeatureCache] = field(default_factory=list)
    checked: bool = False

    def close(self) -> None:
        """Deletes the phase's files on disk, if any."""
        for cache in self.caches:
            if cache.path and os.path.isdir(cache.path):
                shutil.rmtree(cache.path, ignore_errors=True)


def check_cache_arguments(cache, augment_views, budget_bytes) -> None:
    """Validates `fine_tune`'s caching arguments before any work starts."""
    if cache not in CACHE_MODES or not isinstance(cache, bool | str):
        raise ValueError(
            f"`cache` must be 'auto', True or False. Received: cache={cache!r}. 'auto' caches "
            "whenever the phase allows it."
        )
    check_int(
        "augment_views",
        augment_views,
        minimum=1,
        allow_none=True,
        hint="It is the number of augmented views cached per image",
    )
    check_int(
        "cache_budget_bytes",
        budget_bytes,
        minimum=0,
        allow_none=True,
        hint="0 keeps every cache on disk",
    )


def augmentation_layer(model: keras.Model) -> keras.layers.Layer | None:
    """The model's augmentation layer (named `"augmentation"`), or None."""
    try:
        return model.get_layer(AUGMENTATION_NAME)
    except ValueError:
        return None


def cache_blocker(model, *, cut_index, augment_views, callbacks, train_data) -> str | None:
    """Why a phase frozen up to `cut_index` cannot run on cached activations; None if it can.

    `cut_index` is the last frozen backbone op (`freezing.plan_unfreeze`), or None for a phase
    that trains the head only.
    """
    if not any(layer.name == POOLING_NAME for layer in model.layers):
        return f"model {model.name!r} has no {POOLING_NAME!r} layer (not built by kt builders)"
    if augmentation_layer(model) is not None and augment_views is None:
        return (
            "random augmentation precedes the backbone; pass augment_views=K to cache K "
            "augmented views per image, or cache=False to silence this"
        )
    saving = [type(c).__name__ for c in callbacks or () if isinstance(c, _SAVING_CALLBACKS)]
    if saving:
        return f"callbacks {saving} save the model they train, which would be the phase model"
    if train_data.cardinality() == tf.data.INFINITE_CARDINALITY:
        return "the training data repeats forever"
    if cut_index is not None:
        if len(freezing.find_backbones(model)) > 1:
            return "a fusion model's backbones are cached only while all are frozen (head phase)"
        backbone = freezing.find_backbone(model)
        ops = backbone.operations
        if cut_index < 0:
            return "the whole backbone trains, so nothing before it is frozen"
        if cut_index < len(ops) - 1 and ops[cut_index].name not in single_tensor_cuts(backbone):
            return (
                f"the cut after {ops[cut_index].name!r} is not a single-tensor cut point; "
                "unfreeze by blocks= (see kt.unfreeze_points) to cache"
            )
    return None


def _input_like(tensor, name: str):
    return keras.Input(shape=tensor.shape[1:], dtype=tensor.dtype, name=name)


@dataclass
class _Split:
    """A full model split at cuts into a frozen prefix (with its taps) and phase models."""

    start: keras.KerasTensor  # where extraction starts (after augmentation)
    extractor: keras.Model  # start -> list of tapped activations, one per phase model
    phase_models: list[keras.Model]  # one per tap: activation -> model output
    cuts: list[str]


def split_model(model: keras.Model, cut_index: int | None = None, *, cut_indices=None) -> _Split:
    """Splits `model` into a frozen prefix and phase models sharing its layers.

    Args:
        model: A model built by `kt.build_classifier` / `kt.build_regressor`.
        cut_index: Index into the backbone's `operations` of the last frozen op (as returned by
            `freezing.plan_unfreeze`), or None for the pooling output only. Same as
            `cut_indices=[cut_index, None]` (or `[None]`).
        cut_indices: The cuts to tap, in the order wanted: backbone op indices, and None for
            the pooling output (the head-only phase). One forward pass fills them all.

    Returns:
        A `_Split` whose extractor returns one activation per cut, in `cut_indices` order, with
        one phase model per cut (the backbone above the cut, pooling and head; or the head).
    """
    if cut_indices is None:
        cut_indices = [None] if cut_index is None else [cut_index, None]
    cut_indices = list(dict.fromkeys(cut_indices))
    augmentation = augmentation_layer(model)
    start = augmentation.output if augmentation is not None else model.inputs[0]
    pooled = model.get_layer(POOLING_NAME).output
    head = keras.Model(pooled, model.outputs[0], name=f"{model.name}_head")
    depths = sorted(c for c in cut_indices if c is not None)
    if not depths:
        return _Split(start, keras.Model(start, [pooled]), [head], [POOLING_NAME])

    backbone = freezing.find_backbone(model)
    ops = backbone.operations
    backbone_in, backbone_out = features.backbone_tensors(model, backbone)
    after_backbone = keras.Model(backbone_out, model.outputs[0], name=f"{model.name}_top")
    pool = keras.Model(backbone_out, pooled, name=f"{model.name}_pool")
    stem = keras.Model(start, backbone_in, name=f"{model.name}_stem")

    def tensor(c):  # the backbone's tensor after op `c` (its output after the last op)
        return backbone.outputs[0] if c == len(ops) - 1 else ops[c].output

    # Walk up the backbone once, from cut to cut, tapping each; then to its output and pooling.
    x = _input_like(start, "images")
    h, previous, taps, suffixes = stem(x), backbone.inputs[0], {}, {}
    for c in depths:
        if tensor(c) is not previous:
            part = keras.Model(previous, tensor(c), name=f"{backbone.name}_to_{ops[c].name}")
            h = part(h, training=False)
        taps[c], previous = h, tensor(c)
        if c == len(ops) - 1:  # nothing in the backbone trains: cache its output
            suffixes[c] = after_backbone
        else:
            top = keras.Model(tensor(c), backbone.outputs[0], name=f"{backbone.name}_top_{c}")
            a = _input_like(tensor(c), "activations")
            suffixes[c] = keras.Model(
                a, after_backbone(top(a, training=False)), name=f"{model.name}_suffix_{c}"
            )
    if previous is not backbone.outputs[0]:
        h = keras.Model(previous, backbone.outputs[0], name=f"{backbone.name}_rest")(
            h, training=False
        )
    pooled_tap = pool(h)
    outputs = [pooled_tap if c is None else taps[c] for c in cut_indices]
    phase_models = [head if c is None else suffixes[c] for c in cut_indices]
    cuts = [POOLING_NAME if c is None else ops[c].name for c in cut_indices]
    return _Split(start, keras.Model(x, outputs), phase_models, cuts)


def shuffles(dataset: tf.data.Dataset) -> bool:
    """Whether `dataset`'s pipeline shuffles (so the cached copy should too)."""
    pending = [dataset]
    while pending:
        ds = pending.pop()
        if "Shuffle" in type(ds).__name__:
            return True
        try:
            pending.extend(ds._inputs())
        except (AttributeError, TypeError):
            continue
    return False


# Dataset ops that pass elements through as they are (for `unshuffled`).
_PASS_THROUGH = ("_PrefetchDataset", "_OptionsDataset")


def unshuffled(dataset: tf.data.Dataset) -> tf.data.Dataset | None:
    """The elements of one pass of `dataset` in a fixed order, sharing its input; or None.

    For the common pipelines `source.shuffle(n).batch(b)[.map(f)][.prefetch()]`
    (`kt.data.from_arrays`, most hand-written ones, a per-batch resize): the same batches of the
    same examples, built on the very dataset object below the shuffle, so nothing is copied
    (arrays stay where they are, unlike in a serialized `detached_copy`) and the shuffle's random
    state is never touched; maps above the shuffle run again with their traced functions. Batches
    keep the last partial one, so every example is there. None when the pipeline does anything
    else above its shuffle, maps to other than dense tensors, or shuffles more than once.
    """
    above, batches, ds = [], 0, dataset  # the ops above the shuffle, from the top down
    while "Shuffle" not in type(ds).__name__:
        name = type(ds).__name__
        if name == "_BatchDataset":
            batches += 1
        elif name not in _PASS_THROUGH and not (name in _MAPS and _dense(ds)):
            return None
        above.append(ds)
        inputs = ds._inputs()
        if len(inputs) != 1:
            return None
        ds = inputs[0]
    below = ds._inputs()
    if batches != 1 or len(below) != 1 or shuffles(below[0]):
        return None
    rebuilt = below[0]
    for op in reversed(above):
        if type(op).__name__ == "_BatchDataset":
            rebuilt = rebuilt.batch(op._batch_size)
        elif type(op).__name__ in _MAPS:
            rebuilt = _map_again(op, rebuilt)
    return rebuilt


# Maps above a shuffle (a per-batch resize, say) are applied again, with the same traced function.
_MAPS = ("_MapDataset", "_ParallelMapDataset")


def _dense(ds: tf.data.Dataset) -> bool:
    """Whether a map's input and output elements are dense tensors (flat lists of them)."""
    specs = tf.nest.flatten(ds.element_spec) + tf.nest.flatten(ds._inputs()[0].element_spec)
    return hasattr(ds, "_map_func") and all(type(s) is tf.TensorSpec for s in specs)


def _map_again(op: tf.data.Dataset, ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds.map(f)` for the function `op` maps with (traced already: no Python function needed)."""
    function, spec = op._map_func.function, op.element_spec

    def call(*element):
        return tf.nest.pack_sequence_as(spec, function(*tf.nest.flatten(element)))

    return ds.map(call, num_parallel_calls=tf.data.AUTOTUNE)


# Datasets made of tensors alone: every pass gives the same elements in the same order.
_REPLAYABLE = (
    "_TensorSliceDataset",
    "_TensorDataset",
    "_RangeDataset",
    "_BatchDataset",
    "_PrefetchDataset",
    "_OptionsDataset",
    "_TakeDataset",
    "_SkipDataset",
    "_ZipDataset",
    "_ConcatenateDataset",
)


def replays(dataset: tf.data.Dataset) -> bool:
    """Whether every pass over `dataset` gives the same elements, from its structure alone.

    True for pipelines built only of in-memory tensors and ops that cannot change them (such as
    `unshuffled(kt.data.from_arrays(...))`); False for anything else (maps, files, generators),
    even when it would in fact replay: those get a pass over their image keys instead.
    """
    pending = [dataset]
    while pending:
        ds = pending.pop()
        if type(ds).__name__ not in _REPLAYABLE:
            return False
        pending.extend(ds._inputs())
    return True


class RandomPipelineError(ValueError):
    """The training data's pipeline is random beyond its order, so caching would freeze a draw."""


def image_keys(images) -> tf.Tensor:
    """A 64-bit fingerprint of each image in a batch: what ties cached activations to images."""
    return tf.bitcast(tf.fingerprint(images), tf.int64)


def _all_keys(dataset: tf.data.Dataset) -> np.ndarray:
    """Every example's key, over one pass of `dataset` (no model runs)."""
    keys = dataset.map(
        lambda images, *rest: image_keys(images), num_parallel_calls=tf.data.AUTOTUNE
    )
    parts = [k.numpy() for k in keys]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def detached_copy(dataset: tf.data.Dataset) -> tf.data.Dataset | None:
    """A copy of `dataset` whose shuffles have their own random state, or None if impossible.

    A reshuffling `shuffle` draws a fresh order for each new iterator from a seed generator
    that the dataset, everything built on it and even its serialized copies share, so merely
    iterating `dataset` changes the orders that later iterators see. The copy is rebuilt from
    the serialized pipeline with each `ShuffleDatasetV3` (shared generator) turned into a
    `ShuffleDataset` with the same seeds and a generator of its own: iterating it leaves
    `dataset`'s sequence of orders exactly as a plain `fit` would find it. Pipelines that cannot
    be serialized (`from_generator`, `py_function`, arrays over 2 GB) or hold other random
    state give None.
    """
    from tensorflow.python.data.ops import dataset_ops
    from tensorflow.python.ops import gen_experimental_dataset_ops

    try:
        serialized = dataset._as_serialized_graph(
            external_state_policy=tf.data.experimental.ExternalStatePolicy.FAIL
        )
        graph = tf.compat.v1.GraphDef.FromString(serialized.numpy())
    except (tf.errors.OpError, ValueError, TypeError) as error:
        logger.debug("Cannot serialize the training pipeline (%s).", error)
        return None
    for node in graph.node:
        if node.op == "ShuffleDatasetV3":
            node.op = "ShuffleDataset"
            del node.input[4]  # the shared seed generator's handle
    referenced = {name.split(":")[0].lstrip("^") for node in graph.node for name in node.input}
    for node in graph.node:
        handles = node.attr["value"].tensor.resource_handle_val if node.op == "Const" else ()
        if node.name in referenced and any("SeedGenerator" in h.maybe_type_name for h in handles):
            logger.debug("The training pipeline holds other random state (%s).", node.name)
            return None
    variant = gen_experimental_dataset_ops.dataset_from_graph(graph.SerializeToString())
    return dataset_ops._VariantDataset(variant, dataset.element_spec)


def _extract_fn(model: keras.Model, split: _Split, augment: bool, jit_compile: bool):
    """One traced forward function for the frozen prefix, shared by every dataset it caches.

    Traced once per image dtype and shape with the batch dimension left open
    (`kt.features.forward_fn`), so the last, partial batch and the validation data reuse the
    training data's trace instead of tracing (and graph-optimizing) the whole prefix again.
    """
    augmentation = augmentation_layer(model)
    # Explicit `training` on each part: augmentation active only when caching augmented views,
    # and the frozen prefix always in inference mode.
    if augmentation is not None:
        augment_model = keras.Model(model.inputs[0], split.start)

    def extract(images):
        x = images
        if augmentation is not None:
            x = augment_model(x, training=augment)
        return split.extractor(x, training=False)

    return features.forward_fn(extract, jit_compile=jit_compile)


def _views(extract_plain, extract_augmented, images, augment_views):
    if augment_views is None:
        return [t.numpy() for t in extract_plain(images)]
    views = [extract_augmented(images) for _ in range(augment_views)]
    return [np.stack([v[i].numpy() for v in views], axis=1) for i in range(len(views[0]))]


def _example_bytes(split: _Split, augment_views) -> list[int]:
    sizes = []
    for tensor in split.extractor.outputs:
        itemsize = np.dtype(keras.backend.standardize_dtype(tensor.dtype)).itemsize
        sizes.append(math.prod(tensor.shape[1:]) * itemsize * (augment_views or 1))
    return sizes


def _count_examples(dataset: tf.data.Dataset) -> int:
    return int(
        dataset.map(lambda x, *rest: tf.shape(x)[0]).reduce(tf.constant(0), lambda a, b: a + b)
    )


def _extractors(model: keras.Model, split: _Split, augment_views, jit_compile: bool):
    """The plain and (with `augment_views`) augmenting forward functions of the prefix."""
    plain = _extract_fn(model, split, False, jit_compile)
    return plain, (_extract_fn(model, split, True, jit_compile) if augment_views else None)


# Byte alignment of a store's buffer: TensorFlow's kernels assume Eigen's (at most 64 bytes).
_ALIGNMENT = 64


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-ordered array whose data starts on an `_ALIGNMENT`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _aliasing_tensor(array: np.ndarray) -> tf.Tensor:
    """A CPU tensor over `array`'s own buffer (DLPack: no copy; the tensor keeps it alive).

    `tf.constant(array)` copies, and holds a second transient copy while it does: at the end
    of a caching pass that was two more copies of the whole cache at the peak. Dtypes DLPack
    lacks (bfloat16) travel as unsigned integers of their size and are bitcast back, which
    shares the buffer too.
    """
    array = np.ascontiguousarray(array)
    try:
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    except BufferError:
        carrier = array.view(f"u{array.dtype.itemsize}")
        tensor = tf.experimental.dlpack.from_dlpack(carrier.__dlpack__())
        return tf.bitcast(tensor, tf.as_dtype(array.dtype))


class _Store:
    """One in-memory tap's activations, written batch by batch into one preallocated array.

    Holding the batches in a list and concatenating them at the end needs the cache twice over
    at that moment; here the pass writes each batch where it belongs, and `tensor` hands out the
    filled rows without copying them. The array is sized on the first batch for `capacity`
    examples (a bound or the exact count) and doubles if a pass brings more.
    """

    def __init__(self, capacity: int):
        self.capacity = max(int(capacity), 1)
        self.array: np.ndarray | None = None
        self.size = 0

    def append(self, batch: np.ndarray) -> None:
        end = self.size + len(batch)
        if self.array is None:
            self.capacity = max(self.capacity, end)
            self.array = _aligned_empty((self.capacity, *batch.shape[1:]), batch.dtype)
        elif end > self.capacity:
            self.capacity = max(2 * self.capacity, end)
            grown = _aligned_empty((self.capacity, *self.array.shape[1:]), self.array.dtype)
            grown[: self.size] = self.array[: self.size]
            self.array = grown
        self.array[self.size : end] = batch
        self.size = end

    def tensor(self) -> tf.Tensor:
        """The activations so far, as a tensor sharing this store's buffer; empties the store."""
        array, self.array = self.array, None
        return _aliasing_tensor(array[: self.size])


def _first_batch(dataset: tf.data.Dataset):
    """`(iterator, first element)` of `dataset`, or `(None, None)` when it is empty."""
    iterator = iter(dataset)
    try:
        return iterator, next(iterator)
    except StopIteration:
        return None, None


def build_caches(
    model: keras.Model,
    split: _Split,
    dataset: tf.data.Dataset,
    *,
    augment_views: int | None,
    budget: list[int],
    cache_dir: str | None,
    jit_compile: bool = False,
    strategy: tf.distribute.Strategy | None = None,
    name: str = "train",
    extractors=None,
    expected_keys: np.ndarray | None = None,
    head: heads.HeadSpec | None = None,
    mix_spilled: bool = False,
    mix_seed: int | None = None,
) -> list[FeatureCache]:
    """Runs the frozen prefix once over `dataset`; returns one cache per tap.

    Taps stay in memory, in order, while `budget[0]` (bytes left, decremented here) allows; the
    others stream to `tf.data.Dataset.save` files under `cache_dir` during the same pass, so
    memory never holds more activations than the budget. When an upper bound on the number of
    examples (first batch size times number of batches) already fits the budget, every tap stays
    in memory and no counting pass over the data runs first.

    `extractors` (from `_extractors`) lets several datasets share one traced forward function.
    Each cache records its examples' `image_keys`. With `expected_keys` (sorted keys of an
    earlier pass), an image whose key is not among them raises `RandomPipelineError` at once.
    With `head`, the pass also checks the labels and pixels against it (`kt.datacheck`) and
    raises `ValueError` at its end. With `mix_spilled` (for training data that reshuffles), spilled
    taps are written in chunks of consecutive examples and read back in a random order of chunks,
    several at once (`_mixed_chunks`), so even a source in class order gives mixed batches under a
    shuffle buffer the budget bounds.
    """
    extract_plain, extract_augmented = extractors or _extractors(
        model, split, augment_views, jit_compile
    )
    per_example = _example_bytes(split, augment_views)
    iterator, first = _first_batch(dataset)
    if first is None:
        raise ValueError(f"The {name} data is empty: nothing to cache.")
    first_size = int(tf.shape(first[0])[0])
    batches_known = int(dataset.cardinality())
    bound = first_size * batches_known if batches_known > 0 else None
    all_fit = bound is not None and bound * sum(per_example) <= budget[0]
    stores = [_Store(bound or 0) for _ in per_example]
    targets: list[tuple[np.ndarray, ...]] = []
    keys: list[np.ndarray] = []
    in_memory = [True] * len(per_example)
    stats = datacheck.DataStats()

    def batches(elements):
        stats.reset()  # a pass may run again (exactly counted, after the first outgrew the budget)
        for element in elements:
            if head is not None:
                stats.update(datacheck.array_stats(*element))
            batch_keys = image_keys(element[0]).numpy()
            if expected_keys is not None:
                _check_keys(batch_keys, expected_keys)
            keys.append(batch_keys)
            activations = _views(extract_plain, extract_augmented, element[0], augment_views)
            rest = tuple(np.asarray(r) for r in element[1:])
            targets.append(rest)
            for i in range(len(activations)):
                if in_memory[i]:
                    stores[i].append(activations[i])
            yield (*(activations[i] for i in spilled), *rest)

    spilled: list[int] = []
    n = None
    if all_fit:
        for _ in batches(itertools.chain([first], iterator)):
            pass
        n = sum(len(t[0]) for t in targets)
        if n * sum(per_example) > budget[0]:  # a later batch outgrew the first: redo exactly
            stores, targets, keys, n = [], [], [], None
        else:
            budget[0] -= n * sum(per_example)
    del iterator, first
    path = None
    if n is None:
        n = _count_examples(dataset)
        stores = [_Store(n) for _ in per_example]
        in_memory = []
        for size in per_example:
            in_memory.append(n * size <= budget[0])
            if in_memory[-1]:
                budget[0] -= n * size
        spilled = [i for i, keep in enumerate(in_memory) if not keep]
        if spilled:
            root = cache_dir or tempfile.mkdtemp(prefix="keras_transfer_cache_")
            worker = distribute.worker_id(strategy)
            path = os.path.join(root, f"{name}_w{worker}_{uuid.uuid4().hex[:8]}")
            os.makedirs(root, exist_ok=True)
            spec = dataset.element_spec
            signature = tuple(
                tf.TensorSpec(
                    (None, *((augment_views,) if augment_views else ()), *t.shape[1:]),
                    tf.as_dtype(keras.backend.standardize_dtype(t.dtype)),
                )
                for t in (split.extractor.outputs[i] for i in spilled)
            ) + tuple(tf.TensorSpec((None, *s.shape[1:]), s.dtype) for s in spec[1:])
            generated = tf.data.Dataset.from_generator(
                lambda: batches(dataset), output_signature=signature
            )
            if mix_spilled:
                chunk = -(-n // _CHUNKS)

                @tf.autograph.experimental.do_not_convert
                def chunk_of(index, _):
                    return index // chunk

                @tf.autograph.experimental.do_not_convert
                def example_of(_, example):
                    return example

                generated.unbatch().enumerate().save(path, shard_func=chunk_of)
                reader = _mixed_chunks(-(-n // chunk), mix_seed)
                saved = tf.data.Dataset.load(path, reader_func=reader).map(example_of)
            else:
                generated.unbatch().save(path)
                saved = tf.data.Dataset.load(path)
        else:
            for _ in batches(dataset):
                pass
    if head is not None:
        try:
            datacheck.raise_for(head, dataset.element_spec[1], stats, f"{name}_data")
        except ValueError:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
            raise
    target_arrays = tuple(np.concatenate(parts) for parts in zip(*targets, strict=True))
    key_array = np.concatenate(keys)
    if expected_keys is not None and len(key_array) != len(expected_keys):
        raise RandomPipelineError(
            f"the training data gave {len(expected_keys)} images on one pass and "
            f"{len(key_array)} on the next; pass cache=False"
        )
    target_tensors = tuple(tf.convert_to_tensor(t) for t in target_arrays)
    caches = []
    for i, size in enumerate(per_example):
        if in_memory[i]:
            # The store's own buffer becomes the tensor: the cache exists once, never copied.
            array = stores[i].tensor()
            ds = tf.data.Dataset.from_tensor_slices((array, *target_tensors))
            caches.append(
                FeatureCache(
                    ds,
                    n,
                    n * size,
                    batch_size=first_size,
                    keys=key_array,
                    activations=array,
                    targets=target_tensors,
                )
            )
        else:
            k, m = spilled.index(i), len(spilled)
            ds = saved.map(lambda *e, k=k, m=m: (e[k], *e[m:]))
            caches.append(
                FeatureCache(ds, n, n * size, path=path, batch_size=first_size, keys=key_array)
            )
    for cache, cut in zip(caches, split.cuts, strict=True):
        where = f"on disk in {cache.path}" if cache.on_disk else "in memory"
        logger.info(
            "Cached %d %s examples at %r (%.1f MB) %s.", n, name, cut, cache.nbytes / 1e6, where
        )
    return caches


# Spilled training caches: at most _CHUNKS files of consecutive examples, _CYCLE read at once.
_CHUNKS, _CYCLE = 64, 16


def _mixed_chunks(num_chunks: int, seed: int | None):
    """A `Dataset.load` reader: a spilled cache's chunk files in a shuffled order, `_CYCLE` at once.

    A shuffle buffer the memory budget bounds (often a hundred examples) cannot mix a source that
    comes in class order (an image folder, sorted arrays): its batches would be nearly single-class.
    Reading `_CYCLE` random chunks at once puts examples from as many random stretches of the data
    in every batch. The chunk order is drawn when the reader runs, at each epoch; under a global
    seed (or with `seed`) it is the same order each epoch, and the budget-bound shuffle on top
    varies the batches. (A seed tensor fed per epoch trips `Dataset.shuffle` under a global seed
    of 0, and rotating the order per epoch crashed TensorFlow's iterator.)
    """

    @tf.autograph.experimental.do_not_convert  # plain tf.data calls: nothing to convert
    def read(chunks: tf.data.Dataset) -> tf.data.Dataset:
        return chunks.shuffle(num_chunks, seed=seed).interleave(
            lambda chunk: chunk, cycle_length=_CYCLE, num_parallel_calls=tf.data.AUTOTUNE
        )

    return read


def _check_keys(batch_keys: np.ndarray, expected_keys: np.ndarray) -> None:
    positions = np.minimum(np.searchsorted(expected_keys, batch_keys), len(expected_keys) - 1)
    if not np.array_equal(expected_keys[positions], batch_keys):
        raise RandomPipelineError(
            "the training data's pipeline gives different images on each pass (random ops such "
            "as augmentation or a random subset in tf.data), so cached activations would freeze "
            "one draw; move augmentation into the model (build_classifier(augmentation=...)) "
            "with augment_views=K, or pass cache=False"
        )


def _without_graph_rewrites(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` without tf.data's default graph rewrites, which would copy an in-memory cache.

    To rewrite a pipeline, tf.data serializes it when an iterator is made (each epoch of `fit`),
    and the tensors a map function captures, such as the activations that `keyed_batches` and
    `batch_cache` gather from, are copied into that graph: a whole extra copy of the cache at
    the peak (measured: a map capturing a 381 MB tensor added 404 MB of resident memory on its
    first iteration, 0.3 MB without the rewrites). The rewrites (fusions, parallelising maps)
    only speed pipelines up, and here by nothing measurable (an epoch of the keyed 16,000-image
    scale pipeline: 0.6-0.9 s either way); they change neither the elements nor their order.
    """
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    return dataset.with_options(options)


def batch_cache(
    cache: FeatureCache,
    *,
    batch_size: int,
    shuffle: bool,
    augment_views: int | None,
    shuffle_buffer: int | None = None,
    seed: int | None = None,
) -> tf.data.Dataset:
    """Turns a cache into batches for `fit`: reshuffled each epoch if asked, one random view.

    An in-memory cache is batched by shuffling example indices and gathering their rows, so the
    shuffle buffer holds indices, not a second copy of the activations (with the same seed, the
    order is the one a shuffle of the examples themselves would give).
    """
    buffer = max(min(cache.num_examples, shuffle_buffer or cache.num_examples), 1)
    if cache.activations is not None and cache.targets is not None:
        columns = (cache.activations, *cache.targets)
        indices = tf.data.Dataset.range(cache.num_examples)
        if shuffle:
            indices = indices.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)

        def rows(index):
            activations = tf.gather(columns[0], index)
            if augment_views:
                view = tf.random.uniform(tf.shape(index), 0, augment_views, dtype=tf.int32)
                activations = tf.gather(activations, view, axis=1, batch_dims=1)
            return (activations, *(tf.gather(column, index) for column in columns[1:]))

        ds = indices.batch(batch_size).map(
            rows, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        return _without_graph_rewrites(ds.prefetch(tf.data.AUTOTUNE))
    ds = cache.dataset
    if shuffle:
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if augment_views:

        def pick_view(activations, *rest):
            view = tf.random.uniform((), 0, augment_views, dtype=tf.int32)
            return (activations[view], *rest)

        ds = ds.map(pick_view, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def keyed_batches(
    cache: FeatureCache, train_data: tf.data.Dataset, *, augment_views: int | None
) -> tf.data.Dataset:
    """`train_data` with each image replaced by its cached activations, looked up by key.

    Iterating this dataset iterates `train_data` itself (without running the model), so a
    reshuffling source hands out exactly the batches, in exactly the order, that a plain `fit`
    on `train_data` would see, epoch after epoch: cached and plain training then agree.
    """
    order = np.argsort(cache.keys, kind="stable")
    sorted_keys = tf.constant(cache.keys[order])
    rows = tf.constant(order.astype(np.int64))
    activations = cache.activations
    last = cache.num_examples - 1

    def lookup(images, *rest):
        keys = image_keys(images)
        positions = tf.minimum(tf.searchsorted(sorted_keys, keys), last)
        found = tf.reduce_all(tf.equal(tf.gather(sorted_keys, positions), keys))
        check = tf.debugging.Assert(
            found,
            [
                "An image of the training data is not in the activation cache: its pipeline "
                "changed between passes (random ops in tf.data). Pass cache=False."
            ],
        )
        with tf.control_dependencies([check]):
            features = tf.gather(activations, tf.gather(rows, positions))
        if augment_views:
            view = tf.random.uniform(tf.shape(keys), 0, augment_views, dtype=tf.int32)
            features = tf.gather(features, view, axis=1, batch_dims=1)
        return (features, *rest)

    keyed = train_data.map(lookup, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _without_graph_rewrites(keyed)


def _batch_size(dataset: tf.data.Dataset) -> int:
    for element in dataset.take(1):
        return int(tf.shape(element[0])[0])
    raise ValueError("The training data is empty: nothing to train on.")


def prepare(
    model: keras.Model,
    train_data: tf.data.Dataset,
    validation_data: tf.data.Dataset | None,
    *,
    cut_index: int | None = None,
    cut_indices=None,
    augment_views: int | None = None,
    budget_bytes: int | None = DEFAULT_CACHE_BUDGET_BYTES,
    cache_dir: str | os.PathLike | None = None,
    jit_compile: bool = False,
    strategy: tf.distribute.Strategy | None = None,
    seed: int | None = None,
) -> list[CachedPhase]:
    """Caches the frozen prefix of `model` once and returns the phases that train on it.

    Args:
        model: A model built by `kt.build_classifier` / `kt.build_regressor`, with its frozen
            part already frozen.
        train_data: Batched `(images, targets[, sample_weights])` dataset.
        validation_data: Same form, or None.
        cut_index: Last frozen backbone op for phase 2 (`freezing.plan_unfreeze`), or None to
            cache only the pooling output (phase 1); same as `cut_indices=[cut_index, None]`.
        cut_indices: The cuts to cache in one pass, in order: backbone op indices, and None
            for the pooling output.
        augment_views: Augmented views cached per training image, or None for none.
        budget_bytes: Bytes of activations kept in memory; beyond, caches go to disk.
        cache_dir: Folder for disk caches; a temporary folder when None.
        jit_compile: Compile the extraction with XLA.
        strategy: The training strategy (names per-worker files).
        seed: Seed of the cached data's own per-epoch shuffle, used when the training data
            reshuffles but its order cannot be followed (a pipeline that cannot be copied, or
            caches on disk).

    Returns:
        One `CachedPhase` per cut, in `cut_indices` order (for `cut_index`: `[head phase]`
        when None, else `[finetune phase, head phase]`). Their data was checked against the
        head on the way (`kt.datacheck`: labels in range, finite pixels).

    Raises:
        RandomPipelineError: when `train_data` gives other images on another pass (random ops
            in its pipeline), before the model runs on more than one batch of it.
        ValueError: when the data's labels or pixels cannot train the head.
    """
    # Phase models belong to the strategy they are built under, like their variables.
    with (strategy or model.distribute_strategy).scope():
        split = split_model(model, cut_index, cut_indices=cut_indices)
    try:
        head = heads.head_of(model)
    except ValueError:  # a head of the user's own: nothing to check the labels against
        head = None
    budget = [DEFAULT_CACHE_BUDGET_BYTES if budget_bytes is None else budget_bytes]
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    # One traced forward function serves the training and the validation data.
    plain, augmented = _extractors(model, split, augment_views, jit_compile)
    # Caching iterates a detached copy of a reshuffling source, so the training fits find the
    # source's sequence of orders untouched and, via `keyed_batches`, see the batches a plain
    # fit would. A first pass over image keys alone catches pipelines that are random beyond
    # their order (iterating the copy, or an unshuffled source, twice changes nothing).
    shuffle = shuffles(train_data)
    source = (unshuffled(train_data) or detached_copy(train_data)) if shuffle else train_data
    if source is None:
        logger.info(
            "The training pipeline cannot be copied, so cached phases reshuffle on their own: "
            "same data, another order than a plain fit."
        )
        source, expected = train_data, None
    elif replays(source):  # tensors alone: a second pass gives the same images, nothing to check
        expected = None
    else:
        expected = np.sort(_all_keys(source))
    train_caches = build_caches(
        model,
        split,
        source,
        augment_views=augment_views,
        budget=budget,
        cache_dir=cache_dir,
        jit_compile=jit_compile,
        strategy=strategy,
        name="train",
        extractors=(plain, augmented),
        expected_keys=expected,
        head=head,
        mix_spilled=shuffle,
        mix_seed=seed,
    )
    val_caches = [None] * len(train_caches)
    if validation_data is not None:
        try:
            val_caches = build_caches(
                model,
                split,
                validation_data,
                augment_views=None,
                budget=budget,
                cache_dir=cache_dir,
                jit_compile=jit_compile,
                strategy=strategy,
                name="validation",
                extractors=(plain, None),
                head=head,
            )
        except BaseException:
            for cache in train_caches:
                if cache.path:
                    shutil.rmtree(cache.path, ignore_errors=True)
            raise
    batch_size = train_caches[0].batch_size or _batch_size(source)
    keyed = shuffle and source is not train_data
    phases = []
    for phase_model, cut, train_cache, val_cache in zip(
        split.phase_models, split.cuts, train_caches, val_caches, strict=True
    ):
        if keyed and not train_cache.on_disk:
            train = keyed_batches(train_cache, train_data, augment_views=augment_views)
        else:
            per_example = max(train_cache.nbytes // max(train_cache.num_examples, 1), 1)
            buffer = None if not train_cache.on_disk else max(1, budget[0] // per_example)
            train = batch_cache(
                train_cache,
                batch_size=batch_size,
                shuffle=shuffle,
                augment_views=augment_views,
                shuffle_buffer=buffer,
                seed=seed,
            )
        val = None
        if val_cache is not None:
            val = batch_cache(
                val_cache,
                batch_size=val_cache.batch_size or _batch_size(validation_data),
                shuffle=False,
                augment_views=None,
            )
        caches = [c for c in (train_cache, val_cache) if c is not None]
        phases.append(CachedPhase(phase_model, train, val, cut, caches, checked=head is not None))
    return phases


def describe(phases: Sequence[CachedPhase]) -> dict:
    """Sizes and places of the caches, for logs and `history.cache_info`."""
    return {
        phase.cut: [
            {"examples": c.num_examples, "bytes": c.nbytes, "path": c.path} for c in phase.caches
        ]
        for phase in phases
    }
