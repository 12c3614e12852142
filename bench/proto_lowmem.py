"""Prototype of four memory fixes to the core, applied in a benchmark process only (the core is untouched).

Each fix is a small text change to one core function, applied to the function's current source
and re-defined in its own module, so the measured code is the core's code plus exactly these
changes (a change whose original text is no longer found raises, rather than measuring something else):

1. ``io._all_finite``: ``arr.reshape(-1)`` copies a Fortran-ordered array (every NIfTI read by
   nibabel): a full float32 copy of the CT, twice per run (``read_image`` and ``predict_volume``
   both validate). ``np.ravel(arr, order="K")`` is a view for C- or F-contiguous arrays.
2. Keep the CT in its stored integer type: ``read_image(dtype=None)`` in ``predict_file`` and no
   float32 cast in ``preprocess.to_model_grid`` (``affine_transform`` reads int16 and writes
   float32 itself): the CT held during the whole run is 2 bytes per voxel instead of 4.
3. ``inference.predict_volume``: ``np.where(keep, ..., 1, 0)`` makes an int64 input-sized array
   (8 bytes per voxel) before ``astype(uint8)``; multiplying the uint8 label map by the mask does not.
4. ``postprocess.largest_component`` / ``components_ml``: ``np.bincount(labels.ravel())`` casts
   the int32 label array to int64 (8 bytes per voxel of the mask's box); counting slab by slab does not.
"""

from __future__ import annotations

import inspect
import textwrap
from types import ModuleType

import numpy as np

FIXES = {
    "validate: ravel view": "1",
    "keep CT integer type": "2",
    "uint8 label map after clean-up": "3",
    "chunked component sizes": "4",
}


def _redefine(module: ModuleType, name: str, replacements: list[tuple[str, str]]) -> None:
    """Re-define ``module.name`` from its current source with ``replacements`` applied."""
    src = textwrap.dedent(inspect.getsource(getattr(module, name)))
    for old, new in replacements:
        if old not in src:
            raise RuntimeError(f"prototype fix no longer applies: {module.__name__}.{name} has no {old!r}")
        src = src.replace(old, new)
    code = compile("from __future__ import annotations\n" + src, f"<proto_lowmem {module.__name__}.{name}>", "exec")
    exec(code, module.__dict__)  # noqa: S102 - the core's own source, changed as described above


def label_sizes(labels: np.ndarray, n: int, slab: int = 16) -> np.ndarray:
    """Voxel count per label 0..n of an int label array, counted slab by slab (no int64 copy)."""
    sizes = np.zeros(n + 1, dtype=np.int64)
    for k in range(0, labels.shape[-1], slab):
        sizes += np.bincount(labels[..., k : k + slab].ravel(), minlength=n + 1)
    return sizes


def apply() -> list[str]:
    """Apply the four fixes in this process; return their names."""
    import vnetseg.inference as inf
    import vnetseg.io as vio
    import vnetseg.postprocess as pp
    import vnetseg.preprocess as pre

    _redefine(vio, "_all_finite", [("arr.reshape(-1)", 'np.ravel(arr, order="K")')])
    _redefine(inf, "predict_file", [("vio.read_image(input_path)", "vio.read_image(input_path, dtype=None)")])
    _redefine(pre, "to_model_grid", [("np.asarray(canonical, dtype=np.float32),", "canonical,")])
    inf.to_model_grid = pre.to_model_grid
    _redefine(inf, "predict_volume", [
        ("np.where(keep, labelmap if len(info.labels) > 1 else 1, 0).astype(np.uint8)",
         "(labelmap if len(info.labels) > 1 else np.uint8(1)) * keep"),
    ])
    pp.label_sizes = label_sizes
    _redefine(pp, "components_ml", [("np.bincount(labels.ravel())", "label_sizes(labels, n)")])
    _redefine(pp, "largest_component", [("np.bincount(labels.ravel())", "label_sizes(labels, n)")])
    return list(FIXES)
