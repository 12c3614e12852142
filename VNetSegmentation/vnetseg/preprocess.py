"""Reorientation, resampling to the model's spacing, HU windowing, and the way back.

The model grid keeps the axes of the input reoriented to the closest RAS axes (a lossless
permutation and flip of the array) and changes only the voxel size. So the map between the
input grid and the model grid is a per-axis scale and shift: resampling is separable, cheap, and
the way back lands exactly on the input grid whatever its orientation (oblique or left-handed
included).
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from .boxes import nonzero_box

_IDENTITY_ORNT = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)

# resampling runs on at most this many threads (scipy.ndimage releases the GIL while it
# interpolates); on the way back each holds one float32 slab of the input grid: ~15 MB for 512 x 512
MAX_RESAMPLE_THREADS = 8
# resampling onto the model grid works in blocks of this many planes of its first axis
MODEL_GRID_ROWS = 16


def resample_threads() -> int:
    """Threads for resampling: the CPUs this process may run on, at most ``MAX_RESAMPLE_THREADS``."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_RESAMPLE_THREADS))


@dataclass(frozen=True)
class GridMap:
    """How an input grid maps onto the model grid.

    Attributes:
        input_shape: (I, J, K) of the input array.
        ornt: nibabel orientation that turns the input array into the canonical (closest-RAS) one.
        canonical_shape: shape after reorientation.
        model_shape: shape on the model grid.
        scale: canonical index per model index, per axis (model spacing / canonical spacing).
        offset: canonical index of model voxel 0, per axis.
        model_affine: voxel-to-RAS matrix of the model grid.
    """

    input_shape: tuple[int, int, int]
    ornt: np.ndarray
    canonical_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    scale: np.ndarray
    offset: np.ndarray
    model_affine: np.ndarray

    @property
    def model_spacing(self) -> np.ndarray:
        return np.linalg.norm(self.model_affine[:3, :3], axis=0)

    def crop(self, start: tuple[int, int, int], stop: tuple[int, int, int]) -> GridMap:
        """The same map restricted to model voxels ``start:stop`` (a box of the model grid)."""
        start_a = np.asarray(start, dtype=float)
        shift = np.eye(4)
        shift[:3, 3] = start_a
        return GridMap(
            self.input_shape,
            self.ornt,
            self.canonical_shape,
            tuple(int(b - a) for a, b in zip(start, stop)),  # type: ignore[arg-type]
            self.scale,
            self.offset + self.scale * start_a,
            self.model_affine @ shift,
        )


def make_grid_map(shape: tuple[int, ...], affine: np.ndarray, target_spacing: tuple[float, float, float]) -> GridMap:
    """Plan the model grid for an input of ``shape`` and ``affine`` at ``target_spacing`` mm (RAS order)."""
    ornt = nib.orientations.io_orientation(affine)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    # row i of ornt: input axis i becomes canonical axis ornt[i, 0] (flipped if ornt[i, 1] == -1)
    canonical = [0, 0, 0]
    for i, (axis, _) in enumerate(ornt):
        canonical[int(axis)] = int(shape[i])
    canonical_shape = tuple(canonical)
    spacing = np.linalg.norm(canonical_affine[:3, :3], axis=0)
    target = np.asarray(target_spacing, dtype=float)
    model_shape = np.maximum(1, np.round(np.asarray(canonical_shape) * spacing / target)).astype(int)
    scale = np.asarray(canonical_shape, dtype=float) / model_shape  # align the grids' outer edges
    offset = 0.5 * scale - 0.5
    to_canonical = np.eye(4)
    to_canonical[:3, :3] = np.diag(scale)
    to_canonical[:3, 3] = offset
    return GridMap(
        tuple(int(s) for s in shape),  # type: ignore[arg-type]
        ornt,
        canonical_shape,  # type: ignore[arg-type]
        tuple(int(s) for s in model_shape),  # type: ignore[arg-type]
        scale,
        offset,
        canonical_affine @ to_canonical,
    )


def _canonical_ornt_inverse(ornt: np.ndarray) -> np.ndarray:
    return nib.orientations.ornt_transform(_IDENTITY_ORNT, ornt)


def to_model_grid(
    array: np.ndarray, grid: GridMap, order: int = 1, threads: int | None = None, blocks: bool = True
) -> np.ndarray:
    """Resample an (I, J, K) input array (any numeric type) onto the model grid as float32 (trilinear).

    Blocks of ``MODEL_GRID_ROWS`` planes along the first model axis run on ``threads`` threads
    (default :func:`resample_threads`). The blocks are the same whatever the number of threads,
    so the result does not depend on it. Each block's coordinates are computed from its own
    offset, so a value may differ from one scipy call over the whole grid in its last bit (one
    voxel of P4's 10 M at 1.5 mm). ``blocks=False`` makes that one call, on one thread: the
    training cache uses it, so that the subjects a recipe trains on stay bit for bit the same.
    """
    canonical = nib.orientations.apply_orientation(array, grid.ornt)  # a view: flips and transposes
    out = np.empty(grid.model_shape, dtype=np.float32)

    step = MODEL_GRID_ROWS if blocks else grid.model_shape[0]

    def block(a: int) -> None:
        b = min(a + step, grid.model_shape[0])
        offset = grid.offset.copy()
        offset[0] += grid.scale[0] * a  # + 0.0 for the first block: one call's own offset
        ndimage.affine_transform(
            canonical,
            grid.scale,
            offset=offset,
            output_shape=(b - a, *grid.model_shape[1:]),
            order=order,
            mode="nearest",
            output=out[a:b],
            prefilter=False,
        )

    _run_threaded(block, list(range(0, grid.model_shape[0], step)), threads)
    return out


def _workers(threads: int | None, items: int) -> int:
    return max(1, min(threads or resample_threads(), items))


def _run_threaded(work, items: list[int], threads: int | None) -> None:
    """``work(item)`` for every item, on up to ``threads`` threads (default :func:`resample_threads`)."""
    workers = _workers(threads, len(items))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, items))
    else:
        for item in items:
            work(item)


def to_input_grid(
    values: np.ndarray,
    grid: GridMap,
    order: int = 1,
    fill: float = 0.0,
    threshold: float | None = None,
    slab: int = 16,
    quantize: bool = False,
    levels: tuple[float, ...] | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Resample a model-grid array (or a crop described by ``grid``) back onto the input grid.

    Works slab by slab along the last canonical axis. Input voxels whose centre lies outside the
    model voxels of ``values`` get ``fill``. With ``threshold``, each slab is thresholded as it is
    made and the result is a uint8 mask: no input-sized float array is ever allocated. With
    ``quantize`` (values in [0, 1], e.g. probabilities), each slab becomes ``round(255 * value)``
    as uint8 the same way. With ``levels`` (ascending thresholds), each voxel gets the number of
    levels its value exceeds, as uint8: several thresholds from one resampling. The slabs run on
    ``threads`` threads (default :func:`resample_threads`); the result is the same for any number.

    Returns:
        (I, J, K) array in the input's own voxel order: float32, uint8 (0/1) with ``threshold``, or
        uint8 (0-255) with ``quantize``.
    """
    if sum(x is not None and x is not False for x in (threshold, quantize, levels)) > 1:
        raise ValueError("to_input_grid: give one of threshold, quantize and levels")
    values = np.asarray(values, dtype=np.float32)
    if levels is not None:
        out = np.full(grid.canonical_shape, sum(fill > t for t in levels), dtype=np.uint8)
    elif threshold is not None:
        out = np.full(grid.canonical_shape, fill > threshold, dtype=np.uint8)
    elif quantize:
        out = np.full(grid.canonical_shape, round(255 * min(max(float(fill), 0.0), 1.0)), dtype=np.uint8)
    else:
        out = np.full(grid.canonical_shape, fill, dtype=np.float32)
    lowest = threshold if threshold is not None else min(levels) if levels else None
    if lowest is not None and fill <= lowest - _MARGIN:
        # an input voxel's value is a weighted mean of its model neighbours', so only the box of the
        # model voxels over the lowest threshold (and one more voxel around it, all under it) can give
        # an input voxel over it: resample that box alone (a mask is small beside its region)
        box = nonzero_box(values > lowest - _MARGIN)
        if box is None:
            return nib.orientations.apply_orientation(out, _canonical_ornt_inverse(grid.ornt))
        start = [max(b.start - 1, 0) for b in box]
        stop = [min(b.stop + 1, n) for b, n in zip(box, values.shape)]
        values = values[tuple(slice(a, b) for a, b in zip(start, stop))]
        grid = grid.crop(tuple(start), tuple(stop))  # type: ignore[arg-type]
    inv_scale = 1.0 / grid.scale
    inside = []  # per canonical axis: the input index range covered by the model voxels
    for axis in range(3):
        centre = (np.arange(grid.canonical_shape[axis]) - grid.offset[axis]) * inv_scale[axis]
        hit = np.nonzero((centre >= -0.5) & (centre < values.shape[axis] - 0.5))[0]
        inside.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, 0))
    (i0, i1), (j0, j1), (k0, k1) = inside

    slabs = list(range(k0, k1, slab))
    plane = (i1 - i0) * (j1 - j0)
    # each worker's float32 slab (and a boolean one for levels) is allocated here, in the calling
    # thread: buffers allocated in the workers stay in their malloc arenas when freed and would
    # raise the process's resident memory (by ~100 MB on a 512 x 512 x 600 CT)
    free: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(_workers(threads, len(slabs))):
        free.put((np.empty(plane * slab, np.float32), np.empty(plane * slab if levels else 0, np.bool_)))

    def one_slab(s0: int) -> None:
        s1 = min(s0 + slab, k1)
        shape = (i1 - i0, j1 - j0, s1 - s0)
        buffer, flags = free.get()
        try:
            part = buffer[: plane * (s1 - s0)].reshape(shape)
            start = np.array([i0, j0, s0], dtype=float)
            ndimage.affine_transform(
                values,
                inv_scale,
                offset=(start - grid.offset) * inv_scale,
                output_shape=shape,
                order=order,
                mode="nearest",
                output=part,
                prefilter=False,
            )
            dest = out[i0:i1, j0:j1, s0:s1]
            if levels is not None:
                np.greater(part, levels[0], out=dest.view(np.bool_))
                over = flags[: part.size].reshape(shape)
                for t in levels[1:]:
                    dest += np.greater(part, t, out=over)
            elif threshold is not None:
                np.greater(part, threshold, out=dest.view(np.bool_))
            elif quantize:
                dest[...] = _scaled_to_255(part)
            else:
                dest[...] = part
        finally:
            free.put((buffer, flags))

    # each slab is the same computation whichever thread runs it: the result does not depend on the
    # number of threads (scipy.ndimage releases the GIL while it interpolates)
    _run_threaded(one_slab, slabs, threads)
    return nib.orientations.apply_orientation(out, _canonical_ornt_inverse(grid.ornt))


# how far under the lowest threshold a model voxel may be and still count for the box resampled back:
# far more than float32's rounding of a weighted mean near 0.5 (6e-8), so the box loses no voxel
_MARGIN = 1e-4


def _scaled_to_255(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> round(255 * value), clipped, in place in float32 ``values`` (exact integers 0-255)."""
    np.multiply(values, 255.0, out=values)
    np.clip(values, 0.0, 255.0, out=values)
    return np.rint(values, out=values)


def window_hu(array: np.ndarray, hu_window: tuple[float, float], scale: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Clip HU to ``hu_window`` and map it linearly onto ``scale`` (in place when float32)."""
    lo, hi = hu_window
    a, b = scale
    out = np.asarray(array, dtype=np.float32)
    np.clip(out, lo, hi, out=out)
    out -= lo
    out *= (b - a) / (hi - lo)
    out += a
    return out
