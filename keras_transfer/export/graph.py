"""The serving graph: pixels or encoded bytes of any size in, the model's outputs by name out.

`prepare_pixels` and `decode_images` are the exact input pipelines of the `serving_default` and
`serve_bytes` signatures; `make_serving_functions` puts them in front of the model and names the
outputs. `_header_pixels` reads an image's size from its header, so an oversized image is refused
before it is decoded.
"""

from __future__ import annotations

from typing import Any

from keras_transfer.export.spec import SERVE_BYTES, SERVING_DEFAULT, ExportSpec


def _resize(images, size: tuple[int, int]):
    """Bilinear resize to `size`, skipped when the images already have it (so it is exact)."""
    import tensorflow as tf

    shape = tf.shape(images)
    same = tf.logical_and(tf.equal(shape[-3], size[0]), tf.equal(shape[-2], size[1]))
    return tf.cond(
        same,
        lambda: tf.identity(images),
        lambda: tf.image.resize(images, size, method="bilinear"),
    )


def _rgb_to_grey(images):
    """ITU-R 601 luma; the weights sum to exactly 1, so a grey image stays the same grey."""
    import tensorflow as tf

    weights = tf.constant([0.299, 0.587, 0.114], tf.float32)
    return tf.reduce_sum(images[..., :3] * weights, axis=-1, keepdims=True)


def _match_channels(images, channels: int):
    """Greyscale or RGB in, the model's channel count out."""
    import tensorflow as tf

    found = tf.shape(images)[-1]
    check = tf.debugging.Assert(
        tf.logical_or(tf.equal(found, 1), tf.equal(found, 3)),
        ["`images` must have 1 (greyscale) or 3 (RGB) channels; received", found],
    )
    with tf.control_dependencies([check]):
        if channels == 3:
            return tf.cond(
                tf.equal(found, 1),
                lambda: tf.image.grayscale_to_rgb(images[..., :1]),
                lambda: tf.identity(images[..., :3]),
            )
        return tf.cond(
            tf.equal(found, 3),
            lambda: _rgb_to_grey(images),
            lambda: tf.identity(images[..., :1]),
        )


def prepare_pixels(images, image_size: tuple[int, int], channels: int):
    """Float pixels of any size, greyscale or RGB, to the model's input size and channels.

    This is the exact graph the `serving_default` signature runs before the model.

    Args:
        images: A float tensor `(batch, height, width, 1 or 3)` of pixels in [0, 255].
        image_size: `(height, width)` of the model input.
        channels: The model's input channels (1 or 3).

    Returns:
        A float32 tensor `(batch, image_size[0], image_size[1], channels)`.
    """
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    images = _resize(_match_channels(images, channels), image_size)
    images.set_shape([None, image_size[0], image_size[1], channels])
    return images


def _header_pixels(data):
    """`height * width` read from an encoded image's header, before anything is decoded.

    Covers JPEG, PNG, GIF, BMP and WebP (lossy, lossless, extended); 0 for anything else, which
    the decoder then refuses as an unknown format.
    """
    import tensorflow as tf

    padded = tf.strings.join([tf.strings.substr(data, 0, 32), tf.constant(b"\0" * 32)])
    head = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, 32), tf.uint8), tf.int64)

    def le(start: int, count: int):
        return sum(head[start + i] * (256**i) for i in range(count))

    def be(start: int, count: int):
        return sum(head[start + i] * (256 ** (count - 1 - i)) for i in range(count))

    def magic(start: int, text: bytes):
        return tf.reduce_all(tf.equal(head[start : start + len(text)], list(text)))

    bmp_height = le(22, 4)
    bmp_height = tf.abs(tf.where(bmp_height >= 2**31, bmp_height - 2**32, bmp_height))
    webp = tf.logical_and(magic(0, b"RIFF"), magic(8, b"WEBP"))
    vp8l_w = 1 + (head[22] % 64) * 256 + head[21]
    vp8l_h = 1 + (head[24] % 16) * 1024 + head[23] * 4 + head[22] // 64
    candidates = [
        (magic(0, b"\x89PNG"), be(16, 4) * be(20, 4)),
        (magic(0, b"GIF8"), le(6, 2) * le(8, 2)),
        (magic(0, b"BM"), le(18, 4) * bmp_height),
        (tf.logical_and(webp, magic(12, b"VP8 ")), (le(26, 2) % 16384) * (le(28, 2) % 16384)),
        (tf.logical_and(webp, magic(12, b"VP8L")), vp8l_w * vp8l_h),
        (tf.logical_and(webp, magic(12, b"VP8X")), (1 + le(24, 3)) * (1 + le(27, 3))),
    ]
    pixels = tf.constant(0, tf.int64)
    for is_format, count in reversed(candidates):
        pixels = tf.where(is_format, count, pixels)
    return tf.cond(
        magic(0, b"\xff\xd8"),
        lambda: tf.reduce_prod(tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64)),
        lambda: pixels,
    )


def decode_images(image_bytes, image_size: tuple[int, int], channels: int, max_pixels: int):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes of any size to the model's input size and channels.

    This is the exact graph the `serve_bytes` signature runs before the model. Each image is
    decoded with 3 channels (greyscale files are expanded; the first frame of an animation is
    kept), resized, then converted to greyscale if the model wants 1 channel. An image whose header
    declares more than `max_pixels` pixels is refused before it is decoded.

    Args:
        image_bytes: A string tensor `(batch,)` of encoded images.
        image_size: `(height, width)` of the model input.
        channels: The model's input channels (1 or 3).
        max_pixels: Largest accepted `height * width`.

    Returns:
        A float32 tensor `(batch, image_size[0], image_size[1], channels)`, pixels in [0, 255].
    """
    import tensorflow as tf

    def decode_one(data):
        pixels = _header_pixels(data)
        check = tf.debugging.assert_less_equal(
            pixels,
            tf.constant(max_pixels, tf.int64),
            message=f"Image exceeds the decoded-size limit of {max_pixels} pixels (height*width)",
        )
        with tf.control_dependencies([check]):
            image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        image.set_shape([None, None, 3])
        decoded = tf.cast(tf.shape(image)[0], tf.int64) * tf.cast(tf.shape(image)[1], tf.int64)
        check = tf.debugging.assert_less_equal(
            decoded,
            tf.constant(max_pixels, tf.int64),
            message=f"Image exceeds the decoded-size limit of {max_pixels} pixels (height*width)",
        )
        with tf.control_dependencies([check]):
            image = _resize(tf.cast(image, tf.float32), image_size)
        if channels == 1:
            image = _rgb_to_grey(image)
        image.set_shape([image_size[0], image_size[1], channels])
        return image

    return tf.map_fn(
        decode_one,
        image_bytes,
        fn_output_signature=tf.TensorSpec([image_size[0], image_size[1], channels], tf.float32),
    )


def _head_outputs(predictions, spec: ExportSpec) -> dict[str, Any]:
    import tensorflow as tf

    predictions = tf.cast(predictions, tf.float32)
    if spec.head == "regression":
        return {"predictions": predictions}
    vocabulary = tf.constant(list(spec.labels), dtype=tf.string)
    scores, indices = tf.math.top_k(predictions, k=spec.top_k)
    outputs = {"probabilities": predictions}
    if spec.head == "classification":
        class_ids = tf.argmax(predictions, axis=-1, output_type=tf.int64)
        outputs["class_ids"] = class_ids
        outputs["classes"] = tf.gather(vocabulary, class_ids)
    else:
        outputs["over_threshold"] = tf.cast(predictions >= spec.threshold, tf.int32)
    outputs["top_k_classes"] = tf.gather(vocabulary, indices)
    outputs["top_k_scores"] = scores
    return outputs


def _predict(model: Any, pixels):
    """`model(pixels)` as float32; an empty batch gets an empty answer without running the model.

    With oneDNN on (TensorFlow's default on x86 CPUs), a graph-mode convolution fed zero images
    returns a tensor of its input's shape, and the next layer then fails on that shape.
    """
    import tensorflow as tf

    units = int(model.outputs[0].shape[-1])
    return tf.cond(
        tf.shape(pixels)[0] > 0,
        lambda: tf.cast(model(pixels, training=False), tf.float32),
        lambda: tf.zeros([0, units], tf.float32),
    )


def make_serving_functions(model: Any, spec: ExportSpec) -> dict[str, Any]:
    """The Python functions behind each signature, keyed by signature name.

    `export_for_serving` traces these into the SavedModel; `verify_export` runs them eagerly on
    the Keras model to get the expected outputs.

    Args:
        model: The Keras model.
        spec: What the export serves.

    Returns:
        `{"serving_default": fn(images), "serve_bytes": fn(image_bytes)}`, each returning a dict of
        named output tensors.
    """

    def serve_images(images):
        pixels = prepare_pixels(images, spec.image_size, spec.channels)
        return _head_outputs(_predict(model, pixels), spec)

    def serve_bytes(image_bytes):
        pixels = decode_images(image_bytes, spec.image_size, spec.channels, spec.max_image_pixels)
        return _head_outputs(_predict(model, pixels), spec)

    return {SERVING_DEFAULT: serve_images, SERVE_BYTES: serve_bytes}


def _input_signatures() -> dict[str, Any]:
    import tensorflow as tf

    return {
        SERVING_DEFAULT: [tf.TensorSpec([None, None, None, None], tf.float32, name="images")],
        SERVE_BYTES: [tf.TensorSpec([None], tf.string, name="image_bytes")],
    }
