"""The `tf.data` pipeline after a source: cache, shuffle, batch, augment and normalize."""

import os

import numpy as np
import tensorflow as tf

# The shuffle buffer holds this many bytes of images (all of CIFAR, 21k Tiny ImageNet images).
_SHUFFLE_BUFFER_BYTES = 256 * 2**20
_MIN_SHUFFLE_BUFFER = 1024
# cache=None caches decoded images in memory only below this size.
_CACHE_LIMIT_BYTES = 2 * 2**30
_RESIZED_CROP_AREA = (0.08, 1.0)
_RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def _augment(images, seed, policy):
    """Random crops and flips of a float32 batch `(B, H, W, C)` in raw pixel units; same shape.

    Vectorized over the batch (one op per batch, not per image): a per-image tf.data map costs
    more than the whole rest of the pipeline on small images.
    """
    _, height, width, _ = images.shape
    batch = tf.shape(images)[0]
    crop_seed, offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if policy in ("crop", "crop_flip"):
        pad_h, pad_w = max(1, height // 8), max(1, width // 8)
        # Zero pixels (black) as in torchvision's RandomCrop(padding=...), not the mean.
        padded = tf.pad(images, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])
        dy = tf.random.stateless_uniform([batch], crop_seed, 0, 2 * pad_h + 1, dtype=tf.int32)
        dx = tf.random.stateless_uniform([batch], offset_seed, 0, 2 * pad_w + 1, dtype=tf.int32)
        rows = dy[:, None] + tf.range(height)[None, :]
        cols = dx[:, None] + tf.range(width)[None, :]
        images = tf.gather(
            tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1
        )
    else:
        images = _random_resized_crop(images, crop_seed, offset_seed)
    if policy != "crop":
        flip = tf.random.stateless_uniform([batch], flip_seed) < 0.5
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return images


def _random_resized_crop(images, size_seed, offset_seed, attempts=10):
    """torchvision's RandomResizedCrop, batched: the first of `attempts` random boxes that fits."""
    _, height, width, _ = images.shape
    batch = tf.shape(images)[0]
    area_seed, ratio_seed = tf.unstack(tf.random.experimental.stateless_split(size_seed, 2))
    area = tf.random.stateless_uniform([batch, attempts], area_seed, *_RESIZED_CROP_AREA)
    area *= height * width
    log_ratio = tf.random.stateless_uniform(
        [batch, attempts],
        ratio_seed,
        np.log(_RESIZED_CROP_RATIO[0]),
        np.log(_RESIZED_CROP_RATIO[1]),
    )
    box_w = tf.round(tf.sqrt(area * tf.exp(log_ratio)))
    box_h = tf.round(tf.sqrt(area / tf.exp(log_ratio)))
    fits = (box_w >= 1) & (box_w <= width) & (box_h >= 1) & (box_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    found = tf.reduce_any(fits, axis=1)
    # No box fits in any attempt: the whole image.
    box_w = tf.where(found, tf.gather(box_w, first, batch_dims=1), float(width))
    box_h = tf.where(found, tf.gather(box_h, first, batch_dims=1), float(height))
    u = tf.random.stateless_uniform([batch, 2], offset_seed)
    top = tf.floor(u[:, 0] * (height - box_h + 1))
    left = tf.floor(u[:, 1] * (width - box_w + 1))
    # crop_and_resize samples from y1*(H-1) to y2*(H-1): pixel rows top .. top+h-1.
    boxes = tf.stack(
        [
            top / max(height - 1, 1),
            left / max(width - 1, 1),
            (top + box_h - 1) / max(height - 1, 1),
            (left + box_w - 1) / max(width - 1, 1),
        ],
        axis=1,
    )
    return tf.image.crop_and_resize(
        images, boxes, tf.range(batch), (height, width), method="bilinear"
    )


def pipeline(
    examples,
    shape,
    *,
    labels,
    batch_size,
    shuffle,
    policy,
    seed,
    cache,
    drop_remainder,
    mean,
    std,
    index=False,
):
    ds = examples.dataset
    if index:
        # Numbered in the split's fixed order, before any shuffle: an example keeps its number
        # every epoch.
        ds = ds.enumerate().map(lambda i, example: (*example, i))
    image_bytes = int(np.prod(shape))
    if cache is None:
        size = None if examples.count is None else examples.count * image_bytes
        cache = examples.cacheable and (size is None or size <= _CACHE_LIMIT_BYTES)
    if cache:
        # Cached before shuffling and augmenting, so every epoch still gets a new order and crops.
        ds = ds.cache(os.fspath(cache) if isinstance(cache, (str, os.PathLike)) else "")
    if shuffle:
        buffer = max(_MIN_SHUFFLE_BUFFER, _SHUFFLE_BUFFER_BYTES // image_bytes)
        if examples.count is not None:
            buffer = min(buffer, max(examples.count, 1))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if batch_size is not None:
        # uint8 batches: augmentation and normalization then run once per batch.
        ds = ds.batch(
            batch_size, drop_remainder=bool(drop_remainder), num_parallel_calls=tf.data.AUTOTUNE
        )

    scale = tf.constant([1.0 / (255.0 * s) for s in std], tf.float32)
    offset = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)
    unbatched = batch_size is None

    def finish(example, aug_seed=None):
        images, label = example[:2]
        images = tf.cast(images, tf.float32)
        if policy is not None:
            images = _augment(images[None] if unbatched else images, aug_seed, policy)
            images = images[0] if unbatched else images
        images = images * scale + offset
        if index:
            images = {"images": images, "index": example[2]}
        return (images, label) if labels else images

    if policy is not None:
        # One seed per batch from a seeded stream that changes every epoch: reproducible given
        # `seed`, and independent of how tf.data parallelizes the map.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda *example: finish(example), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    if examples.shard_by_data:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        ds = ds.with_options(options)
    return ds
