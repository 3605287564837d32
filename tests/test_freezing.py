import keras
import numpy as np
import pytest

import keras_transfer as kt


def trainable_names(model):
    return {v.path for v in model.trainable_weights}


def test_freeze_backbone_leaves_only_the_head(tiny_model):
    kt.freeze_backbone(tiny_model)
    names = trainable_names(tiny_model)
    assert names and all(n.startswith("logits/") for n in names)


def test_unfreeze_blocks_counts_from_the_top_and_keeps_batchnorm_frozen(tiny_model):
    backbone = kt.find_backbone(tiny_model)
    points = kt.unfreeze_points(backbone)
    assert points[:2] == ["block_16_project_BN", "block_15_add"]
    cut = kt.unfreeze(tiny_model, blocks=2)
    assert cut == "block_15_add"
    ops = [op.name for op in backbone.operations]
    for layer in backbone.layers:
        above = ops.index(layer.name) > ops.index(cut)
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == (above and not is_bn), layer.name
    summary = kt.trainable_summary(tiny_model)
    assert summary.trainable_blocks == 2 and summary.total_blocks == len(points) + 1
    assert not summary.batchnorm_trainable
    assert "2 of 18 blocks train" in str(summary)


def test_train_batchnorm_opt_in(tiny_model):
    kt.unfreeze(tiny_model, blocks=1, train_batchnorm=True)
    assert kt.trainable_summary(tiny_model).batchnorm_trainable


def test_unfreeze_fraction_snaps_to_a_block_boundary(tiny_model):
    backbone = kt.find_backbone(tiny_model)
    cut = kt.unfreeze(tiny_model, fraction=0.3)
    assert cut in kt.unfreeze_points(backbone)
    weighted = [layer for layer in backbone.layers if layer.weights]
    not_bn = [layer for layer in weighted if not isinstance(layer, keras.layers.BatchNormalization)]
    trained = [layer for layer in not_bn if layer.trainable]
    assert 0.3 * len(weighted) <= sum(1 for layer in weighted if ops_after(backbone, cut, layer))
    assert 0 < len(trained) < len(not_bn)
    assert kt.unfreeze(tiny_model, fraction=1.0) is None
    assert all(layer.trainable for layer in not_bn)
    assert kt.unfreeze(tiny_model, fraction=0.0) == backbone.operations[-1].name
    assert not backbone.trainable_weights


def ops_after(backbone, cut, layer):
    names = [op.name for op in backbone.operations]
    return names.index(layer.name) > names.index(cut)


def test_unfreeze_from_layer(tiny_model):
    kt.unfreeze(tiny_model, from_layer="Conv_1")
    backbone = kt.find_backbone(tiny_model)
    assert {v.path.split("/")[-2] for v in backbone.trainable_weights} == {"Conv_1"}


def test_unfreeze_recompiles_so_fit_trains_the_new_layers(tiny_model, images):
    """Keras trains the variables it compiled with: unfreeze must recompile a compiled model."""
    x, y = images
    kt.freeze_backbone(tiny_model)
    tiny_model.compile("adam", "sparse_categorical_crossentropy")
    tiny_model.fit(x, y, epochs=1, verbose=0)
    kt.unfreeze(tiny_model, blocks=1)
    conv = kt.find_backbone(tiny_model).get_layer("Conv_1")
    before = np.array(conv.kernel)
    tiny_model.fit(x, y, epochs=1, verbose=0)
    assert not np.array_equal(np.array(conv.kernel), before)


def test_unfreeze_recompiles_a_model_compiled_with_a_lambda_loss(tiny_model, images):
    """A lambda loss cannot be serialized: the recompile reuses the live loss instead."""
    x, y = images
    kt.freeze_backbone(tiny_model)
    loss = lambda t, p: keras.losses.sparse_categorical_crossentropy(t, p)  # noqa: E731
    tiny_model.compile(keras.optimizers.Adam(0.05), loss)
    old_optimizer = tiny_model.optimizer
    kt.unfreeze(tiny_model, blocks=1)
    # Recompiled: a fresh optimizer of the same config, the same live loss.
    assert tiny_model.optimizer is not old_optimizer
    assert isinstance(tiny_model.optimizer, keras.optimizers.Adam)
    assert float(tiny_model.optimizer.learning_rate) == pytest.approx(0.05)
    assert tiny_model.loss is loss
    tiny_model.fit(x, y, epochs=1, verbose=0)
    # Adam keeps two slots per variable it trains: the unfrozen Conv_1 kernel is among them.
    slots = {v.path for v in tiny_model.optimizer.variables}
    assert any("conv_1_kernel" in path.lower() for path in slots), sorted(slots)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fraction=1.5), "fraction=1.5"),
        (dict(fraction=-0.1), "fraction=-0.1"),
        (dict(blocks=99), "blocks=99"),
        (dict(blocks=-1), "blocks=-1"),
        (dict(from_layer="Conv_2"), "Did you mean 'Conv_1'"),
        (dict(), "exactly one of"),
        (dict(blocks=1, fraction=0.5), "exactly one of"),
    ],
)
def test_bad_unfreeze_arguments(tiny_model, kwargs, match):
    flags = [layer.trainable for layer in kt.find_backbone(tiny_model).layers]
    with pytest.raises(ValueError, match=match):
        kt.unfreeze(tiny_model, **kwargs)
    assert [layer.trainable for layer in kt.find_backbone(tiny_model).layers] == flags
