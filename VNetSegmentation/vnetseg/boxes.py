"""The box of an array's non-zero voxels (numpy only: imported by io, preprocess and postprocess)."""

from __future__ import annotations

import numpy as np


def nonzero_box(array: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The bounding box of a 3-D array's non-zero voxels, as slices (None when all are zero).

    One pass over the whole array (collapsing the last axis), then only the in-plane box: on a
    512 x 512 x 120 CT about 10 ms, where labelling a uint8 copy took 60 ms (it runs several times
    per result: component selection, HU trim, hole filling, the report, the box copy for writing)."""
    plane = array.any(axis=2)
    xs, ys = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if xs.size == 0:
        return None
    x, y = slice(int(xs[0]), int(xs[-1]) + 1), slice(int(ys[0]), int(ys[-1]) + 1)
    zs = np.flatnonzero(array[x, y].any(axis=(0, 1)))
    return x, y, slice(int(zs[0]), int(zs[-1]) + 1)
