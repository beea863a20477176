"""The segmentation study's canvases: a pixel's label is the class + 1 of the photo seen there, 0 on background."""
import numpy as np

from bench.segmentation_study import PER_CANVAS, PHOTO, make_canvases


def test_canvas_labels_name_the_photo_seen_at_each_pixel_and_repeat_with_the_seed():
    count = 8 * PER_CANVAS
    colours = np.arange(count)[:, None] * [7, 13, 29] % 256  # one distinct flat colour per photo
    photos = np.broadcast_to(colours[:, None, None, :], (count, PHOTO, PHOTO, 3)).astype(np.uint8)
    labels = np.arange(count) % 10
    images, masks = make_canvases(photos, labels, 32, np.random.default_rng(0))
    assert masks.max() > 0 and (masks == 0).any()
    for i, (image, mask) in enumerate(zip(images, masks)):
        group = range(i * PER_CANVAS, (i + 1) * PER_CANVAS)
        assert (image[mask == 0] == colours[group[0]]).all()  # the background photo, blurred but flat
        for label in set(np.unique(mask)) - {0}:
            seen = {tuple(c) for c in image[mask == label]}
            assert seen <= {tuple(colours[j]) for j in group[1:] if labels[j] + 1 == label}
    again = make_canvases(photos, labels, 32, np.random.default_rng(0))
    assert (again[0] == images).all() and (again[1] == masks).all()
