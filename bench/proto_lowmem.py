"""Prototype of four memory fixes to the core, applied in a benchmark process only (the core is untouched).

All four were merged into the core in commit e3f5a20; ``apply()`` now reports them as
"merged" and changes nothing. Kept as the record of what was measured (see README.md).

Each fix is a small text change to one core function, applied to the function's current source
and re-defined in its own module, so the measured code is the core's code plus exactly these
changes (a fix whose original text is gone is reported as merged; one that only partly matches raises):

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


def _redefine(module: ModuleType, name: str, replacements: list[tuple[str, str]]) -> bool:
    """Re-define ``module.name`` from its current source with ``replacements`` applied.

    Returns False (and changes nothing) when none of the original texts is in the source any
    more (the fix was merged into the core); raises when only some are.
    """
    src = textwrap.dedent(inspect.getsource(getattr(module, name)))
    found = [old in src for old, _ in replacements]
    if not any(found):
        return False
    if not all(found):
        raise RuntimeError(f"prototype fix only partly applies to {module.__name__}.{name}; update proto_lowmem.py")
    for old, new in replacements:
        src = src.replace(old, new)
    code = compile("from __future__ import annotations\n" + src, f"<proto_lowmem {module.__name__}.{name}>", "exec")
    exec(code, module.__dict__)  # noqa: S102 - the core's own source, changed as described above
    return True


def label_sizes(labels: np.ndarray, n: int, slab: int = 16) -> np.ndarray:
    """Voxel count per label 0..n of an int label array, counted slab by slab (no int64 copy)."""
    sizes = np.zeros(n + 1, dtype=np.int64)
    for k in range(0, labels.shape[-1], slab):
        sizes += np.bincount(labels[..., k : k + slab].ravel(), minlength=n + 1)
    return sizes


def apply() -> list[str]:
    """Apply the fixes that the core does not have yet; return their names ("merged: ..." for the others)."""
    import vnetseg.inference as inf
    import vnetseg.io as vio
    import vnetseg.postprocess as pp
    import vnetseg.preprocess as pre

    pp.label_sizes = label_sizes
    done = {
        "validate: ravel view": _redefine(vio, "_all_finite", [("arr.reshape(-1)", 'np.ravel(arr, order="K")')]),
        "keep CT integer type": (
            _redefine(inf, "predict_file", [("vio.read_image(input_path)", "vio.read_image(input_path, dtype=None)")])
            | _redefine(pre, "to_model_grid", [("np.asarray(canonical, dtype=np.float32),", "canonical,")])
        ),
        "uint8 label map after clean-up": _redefine(inf, "predict_volume", [
            ("np.where(keep, labelmap if len(info.labels) > 1 else 1, 0).astype(np.uint8)",
             "(labelmap if len(info.labels) > 1 else np.uint8(1)) * keep"),
        ]),
        "chunked component sizes": (
            _redefine(pp, "components_ml", [("np.bincount(labels.ravel())", "label_sizes(labels, n)")])
            | _redefine(pp, "largest_component", [("np.bincount(labels.ravel())", "label_sizes(labels, n)")])
        ),
    }
    inf.to_model_grid = pre.to_model_grid
    return [name if applied else f"merged: {name}" for name, applied in done.items()]
