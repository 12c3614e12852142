"""Sliding-window inference, in three layers: ``predict_file -> predict_volume -> sliding_window``.

``sliding_window`` is model-agnostic (any callable from (B, C, *patch) to (B, K, *patch));
``predict_volume`` adds the model's preprocessing and post-processing around it on arrays;
``predict_file`` adds reading, checking and atomic writing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import confidence as conf
from . import io as vio
from .checkpoint import ModelInfo, check_member, load_model
from .fast import (
    BODY_MARGIN_MM,
    MIN_LOCATED_ML,
    BodyView,
    Box,
    Location,
    box_from_coarse_mask,
    grown,
    head_foot_extent_mm,
    locate,
    single_window_patch,
    thin_view_warning,
)
from .model import VNet, VNetConfig
from .postprocess import (
    APPENDAGE_REACH_MM,
    DENSE_HU,
    MAX_DENSE_SHARE,
    QualityReport,
    dense_share,
    drop_thin_appendages,
    fill_holes,
    grow_native,
    quality_report,
    select_located,
    split_components,
    trim_to_organ_hu,
)
from .preprocess import GridMap, make_grid_map, to_input_grid, to_model_grid, window_hu

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]
Predictor = Callable[[torch.Tensor], torch.Tensor]


class Cancelled(RuntimeError):
    """The caller's cancel flag was raised; nothing was written."""


class DeviceError(ValueError):
    """A device that was asked for by name is not available."""


# ------------------------------------------------------------------------------ devices
def available_devices() -> list[str]:
    """Devices torch can use here, best first (always ends with "cpu")."""
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def resolve_device(name: str = "auto") -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "cuda:N" | "gpu" | "mps" to a torch device.

    "auto" picks CUDA, then Apple MPS, then CPU. A named device that is absent raises
    :class:`DeviceError`; there is no silent fallback.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    if name == "gpu":
        name = "cuda"
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{name}' was requested but no CUDA GPU is available here; use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s) found")
        return dev
    if name == "mps":
        if "mps" not in available_devices():
            raise DeviceError("device 'mps' was requested but Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise DeviceError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps")


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (CUDA: free GPU memory; otherwise MemAvailable of the host)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def window_memory_bytes(config: VNetConfig, patch: tuple[int, int, int], bytes_per_value: int = 4) -> int:
    """Rough activation memory of one window in inference (largest stage's tensors, x4 live)."""
    voxels = math.prod(patch)
    widths = config.widths
    per_level = [2 * w * voxels / 8**i for i, w in enumerate(widths)]
    return int(4 * max(per_level) * bytes_per_value + 2 * voxels * 4)


def choose_batch_size(model: VNet, patch: tuple[int, int, int], device: torch.device) -> int:
    """Windows per forward pass, from the memory that is free now (capped: 1 on CPU, 8 on GPU)."""
    per_window = window_memory_bytes(model.config, patch, 2 if device.type == "cuda" else 4)
    budget = available_memory_bytes(device) // 2
    cap = 8 if device.type == "cuda" else 1  # on CPU a bigger batch is no faster and costs memory
    return int(max(1, min(cap, budget // max(per_window, 1))))


# ------------------------------------------------------------------------ sliding window
def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """Separable Gaussian weight map (peak 1 at the centre, sigma = ``sigma_scale`` x patch)."""
    weights = np.ones(patch, dtype=np.float32)
    for axis, size in enumerate(patch):
        x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        g = np.exp(-0.5 * (x / max(sigma_scale * size, 1e-6)) ** 2)
        shape = [1] * len(patch)
        shape[axis] = size
        weights = weights * g.reshape(shape).astype(np.float32)
    return np.maximum(weights / weights.max(), 1e-3).astype(np.float32)  # never 0: edges still count


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows covering ``size`` voxels with at least ``overlap`` overlap."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    n = math.ceil((size - patch) / step) + 1
    return sorted({round(i * (size - patch) / (n - 1)) for i in range(n)})


def _windows(shape: tuple[int, ...], patch: tuple[int, ...], overlap: float) -> list[tuple[int, int, int]]:
    starts = [window_starts(s, p, overlap) for s, p in zip(shape, patch)]
    return [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]


def touching_windows(
    windows: list[tuple[int, int, int]], patch: tuple[int, ...], start: Sequence[int], stop: Sequence[int]
) -> list[tuple[int, int, int]]:
    """The window starts whose ``patch``-sized window shares at least one voxel with the box ``start:stop``."""
    return [w for w in windows if all(a < hi and a + p > lo for a, p, lo, hi in zip(w, patch, start, stop))]


def _batches(items: list[tuple[int, int, int]], size: int) -> Iterator[list[tuple[int, int, int]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class WindowSettings:
    """Sliding-window settings.

    Attributes:
        patch: window size in voxels.
        overlap: fraction of a window shared with its neighbour (0 <= overlap < 1).
        batch_size: windows per forward pass.
        pad_value: value used where the window extends past the volume.
    """

    patch: tuple[int, int, int]
    overlap: float = 0.25
    batch_size: int = 1
    pad_value: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def sliding_window(
    volume: np.ndarray,
    predictor: Predictor,
    settings: WindowSettings,
    out_channels: int,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    on_oom: Callable[[int], None] | None = None,
    windows: list[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """Gaussian-weighted sliding-window prediction over a whole volume.

    Args:
        volume: (C, X, Y, Z) float32 input.
        predictor: maps a (B, C, *patch) tensor on ``device`` to (B, out_channels, *patch).
        settings: patch, overlap, batch size and padding value.
        out_channels: channels the predictor returns.
        progress: called with (fraction done, message) after each batch.
        cancel: polled before each batch; when it returns True, :class:`Cancelled` is raised.
        on_oom: called with the new batch size when CUDA memory runs out and the batch is halved.
        windows: run exactly these window starts instead of the grid's (each window must lie
            inside the volume padded up to one patch), e.g. a part of a bigger volume's grid, so that
            the part's answer is the bigger run's, voxel for voxel; voxels no run window covers come
            out as 0.

    Returns:
        (out_channels, X, Y, Z) float32: the weighted mean of all window predictions.
    """
    if volume.ndim != 4:
        raise ValueError(f"volume must be (C, X, Y, Z), got shape {volume.shape}")
    device = torch.device(device)
    shape = volume.shape[1:]
    patch = settings.patch
    padded = tuple(max(s, p) for s, p in zip(shape, patch))
    if padded != shape:
        pad = [(0, 0)] + [(0, p - s) for p, s in zip(padded, shape)]
        volume = np.pad(volume, pad, mode="constant", constant_values=settings.pad_value)
    acc = np.zeros((out_channels, *padded), dtype=np.float32)  # weighted sum of predictions
    norm = np.zeros(padded, dtype=np.float32)  # sum of weights
    weight = gaussian_importance(patch)
    weight_t = torch.from_numpy(weight).to(device)
    windows = _windows(padded, patch, settings.overlap) if windows is None else list(windows)
    batch_size = settings.batch_size
    done = 0
    pending = list(windows)
    while pending:
        if cancel is not None and cancel():
            raise Cancelled("cancelled by the user")
        batch = pending[:batch_size]
        tiles = np.stack([volume[:, a : a + patch[0], b : b + patch[1], c : c + patch[2]] for a, b, c in batch])
        try:
            with torch.inference_mode():
                out = predictor(torch.from_numpy(tiles).to(device))  # (B, K, *patch)
                out = (out.float() * weight_t).cpu().numpy()
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise MemoryError(
                    "the GPU ran out of memory even with one window per batch; close other GPU programs "
                    "or use --device cpu"
                ) from None
            torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            if on_oom is not None:
                on_oom(batch_size)
            continue
        for (a, b, c), pred in zip(batch, out):
            acc[:, a : a + patch[0], b : b + patch[1], c : c + patch[2]] += pred
            norm[a : a + patch[0], b : b + patch[1], c : c + patch[2]] += weight
        pending = pending[len(batch) :]
        done += len(batch)
        if progress is not None:
            progress(done / len(windows), f"window {done}/{len(windows)}")
    np.divide(acc, norm[None], out=acc, where=norm[None] > 0)
    return acc[(slice(None), *(slice(0, s) for s in shape))]


def softmax_foreground(model: VNet, amp: bool) -> Predictor:
    """Predictor returning the softmax probabilities of the foreground classes (B, K-1, ...)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp and x.is_cuda):
            logits = model(x)
        return torch.softmax(logits.float(), dim=1)[:, 1:]

    return run


# ----------------------------------------------------------------------------- volumes
@dataclass
class InferenceOptions:
    """User-facing inference settings (the CLI and the Slicer Logic map onto this).

    Attributes:
        device: "auto", "cpu", "cuda", "cuda:N", "gpu" or "mps".
        overlap: sliding-window overlap fraction.
        batch_size: windows per forward pass; None chooses from free memory.
        postprocess: keep the largest component (the located one), trim it to the organ's own HU
            range (``hu_trim``), grow it on native CT (``native_grow``) and fill holes.
        threshold: foreground probability above which a voxel is foreground (binary models).
        amp: mixed precision on CUDA.
        mode: "fast" (coarse pass, then full resolution on the organ's box), "full" (whole
            volume at full resolution) or "auto" (fast on CPU when the model supports it).
        probability: also return the spleen probability on the input grid: None (default: no
            map is made, no memory is spent on it), "float32" (0-1) or "uint8" (0-255).
        hu_trim: with ``postprocess``, remove mask voxels outside the organ's own HU range
            (:func:`vnetseg.postprocess.trim_to_organ_hu`); False keeps the network's boundary.
        native_grow: with ``postprocess`` and ``hu_trim``, and when the model file declares it
            (``ModelInfo.postprocessing["native_grow_probability"]``: a calibration of those weights,
            the shipped model's is ``postprocess.GROW_PROBABILITY``), on native CT (the organ's core
            under ``postprocess.NATIVE_MAX_HU``) grow the mask into connected voxels over that
            probability in its HU band (:func:`vnetseg.postprocess.grow_native`).
        appendages: with ``postprocess``, cut off the parts of the mask that lie more than
            ``postprocess.APPENDAGE_REACH_MM`` from the organ's thick body (a neighbour's rim joined
            through a thin bridge: :func:`vnetseg.postprocess.drop_thin_appendages`).
        min_located_ml: the smallest part the whole-CT view takes for a spleen in view (mL). The
            default is ``fast.MIN_LOCATED_ML``; lower values find more spleens that the scan range
            cuts through, and more false ones (``bench/bench_view_slabs.py``, README); the CLI's
            ``--min-located-ml``. The shipped model's spleen-free answers were measured at the default.
    """

    device: str = "auto"
    overlap: float = 0.25
    batch_size: int | None = None
    postprocess: bool = True
    threshold: float = 0.5
    amp: bool = True
    mode: str = "auto"
    probability: str | None = None
    hu_trim: bool = True
    native_grow: bool = True
    appendages: bool = True
    min_located_ml: float = MIN_LOCATED_ML

    def __post_init__(self) -> None:
        conf.check_probability_type(self.probability)
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.min_located_ml > 0.0:
            raise ValueError(f"min_located_ml must be more than 0 mL, got {self.min_located_ml}")


@dataclass
class Prediction:
    """The result of one case, on the input grid.

    Attributes:
        labelmap: (I, J, K) uint8 label values (0 = background).
        affine: voxel-to-RAS matrix (the input's).
        report: volume (mL), components and warnings.
        device: the device that ran the network.
        seconds: wall time of ``predict_volume``.
        notes: how the run went where it matters (fast mode's fallbacks, GPU memory retries).
        mode: "fast" or "full", as run.
        box: in fast mode, the box of the full-resolution model grid that was segmented
            (None: the whole volume was).
        probability: (I, J, K) spleen probability on the input grid (float32 0-1 or uint8
            0-255) when ``InferenceOptions.probability`` asked for it, else None.
        probability_covers: what the map covers: "volume", "box" (fast mode: 0 outside the
            segmented box), "body" (full mode with a whole-CT view: 0 in the air outside the
            body's box) or "nothing" (no spleen in view: all 0); "" without a map.
        located_ml: the whole-CT view's located part (mL, on its coarse grid); 0.0 when it located
            none (a best part under ``InferenceOptions.min_located_ml`` included); None for models
            without a whole-CT view.
    """

    labelmap: np.ndarray
    affine: np.ndarray
    report: QualityReport
    device: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    mode: str = "full"
    box: Box | None = None
    probability: np.ndarray | None = None
    probability_covers: str = ""
    located_ml: float | None = None

    @property
    def volume_ml(self) -> float:
        return self.report.volume_ml

    @property
    def confidence(self) -> conf.Confidence | None:
        """How sure the network was about the returned mask (None when nothing was segmented)."""
        return self.report.confidence

    @property
    def probability_note(self) -> str:
        """What the probability map covers, in words ("" without a map)."""
        return conf.COVERS_NOTES.get(self.probability_covers, "")


def choose_mode(requested: str, device: torch.device, info: ModelInfo) -> str:
    """"auto" -> "fast" on CPU when the model supports it, else "full"; "fast" needs model support."""
    if requested not in ("auto", "fast", "full"):
        raise ValueError(f"mode must be auto, fast or full, got {requested!r}")
    supported = info.locator is not None or info.preprocessing.coarse_spacing is not None
    if requested == "fast" and not supported:
        raise ValueError(
            "--mode fast needs a model file with a locator or a coarse_spacing (this one has neither); use --mode full"
        )
    if requested == "auto":
        return "fast" if supported and device.type == "cpu" else "full"
    return requested


def window_for(patch: tuple[int, ...], shape: tuple[int, ...], multiple: int) -> tuple[int, int, int]:
    """The trained window ``patch``, but never bigger than ``shape`` rounded up to ``multiple``: no wasted padding."""
    return tuple(min(p, -(-s // multiple) * multiple) for p, s in zip(patch, shape))  # type: ignore[return-value]


def _run_network(
    array: np.ndarray,
    region: GridMap,
    model: VNet,
    info: ModelInfo,
    opts: InferenceOptions,
    device: torch.device,
    progress: ProgressFn | None,
    cancel: CancelFn | None,
    notes: list[str],
    single_window: bool,
    resampled: np.ndarray | None = None,
    windows: list[tuple[int, int, int]] | None = None,
    patch: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Resample ``array`` onto ``region`` (a model grid or a box of it), window HU, run the network.

    ``resampled``: ``array`` already on ``region`` (HU), when the caller needed it too.
    ``windows`` and ``patch``: run these window starts of that patch (see :func:`sliding_window`)
    instead of ``region``'s own grid.

    Returns:
        (K-1, *region.model_shape) float32 foreground probabilities.
    """
    pre = info.preprocessing
    hu = to_model_grid(array, region) if resampled is None else resampled
    volume = window_hu(hu, pre.hu_window, pre.scale)
    multiple = model.config.size_multiple
    if patch is None:
        patch = (single_window_patch(region.model_shape, multiple) if single_window else None) or window_for(
            pre.patch_size, region.model_shape, multiple
        )
    batch = opts.batch_size or choose_batch_size(model, patch, device)
    return sliding_window(
        volume[None],
        softmax_foreground(model, opts.amp),
        WindowSettings(patch, opts.overlap, batch, pad_value=pre.scale[0]),
        out_channels=info.config.out_channels - 1,
        device=device,
        progress=progress,
        cancel=cancel,
        on_oom=lambda b: notes.append(f"GPU out of memory: retried with batch size {b}"),
        windows=windows,
    )


def _stage(progress: ProgressFn | None, lo: float, hi: float, label: str) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda f, m: progress(lo + (hi - lo) * f, f"{label}: {m}")


def whole_ct_view(
    image: vio.Image,
    model: VNet,
    info: ModelInfo,
    opts: InferenceOptions,
    device: torch.device,
    progress: ProgressFn | None,
    cancel: CancelFn | None,
    notes: list[str],
) -> tuple[Location, GridMap] | None:
    """Run the locator (or the model at its coarse spacing) over the whole CT; None for models with neither."""
    if info.locator is not None:  # a small network of its own, at its own spacing
        loc_net, loc_info = info.locator[0].to(device).eval(), info.locator[1]
        spacing = loc_info.preprocessing.target_spacing
    elif info.preprocessing.coarse_spacing is not None:  # the model itself, trained to work coarse too
        loc_net, loc_info, spacing = model, info, info.preprocessing.coarse_spacing
    else:
        return None
    coarse = make_grid_map(image.shape, image.affine, spacing)
    hu = to_model_grid(image.array, coarse)  # resampled once: for the anatomy and for the network
    anatomy = BodyView.from_hu(hu)  # before the network: it windows ``hu`` in place
    members = info.locator_members if info.locator is not None else []
    thin = _thin_locator(image, info, spacing)
    if thin is not None:  # a thin CT: the locator trained on slabs decides alone
        loc_net, loc_info, members = thin[0].to(device).eval(), thin[1], []
        notes.append(f"whole-CT view: the thin-CT locator (the CT covers at most {info.thin_locator_max_mm:g} mm head to foot)")
    check = info.locator_check if info.locator is not None else None
    raw = hu.copy() if members or check is not None else None  # the network windows ``hu`` in place; the others need the HU
    if thin is not None:
        found = _run_thin(hu, coarse, loc_net, loc_info, opts, device, progress, cancel, notes)
    else:
        found = _run_network(image.array, coarse, loc_net, loc_info, opts, device, progress, cancel, notes, True, hu)
    # the model at its coarse spacing: all its foreground; a locator: its channel of the main model's organ
    organ = found.sum(0) if loc_info is info else found[_organ_channel(loc_info, info)]
    largest = info.locator_rule == "max"
    for m_net, m_info in members:  # the mean (or the maximum) of several locators' organ probabilities
        check_member(m_info, loc_info, info)
        more = _run_network(image.array, coarse, m_net.to(device).eval(), m_info, opts, device, None, cancel, notes,
                            True, raw.copy())
        organ = np.maximum(organ, more[_organ_channel(m_info, info)]) if largest else organ + more[_organ_channel(m_info, info)]
    if members and not largest:
        organ = organ / (1 + len(members))
    confirm, rivals = None, ()
    if check is not None:  # a second network must agree that the located part is the organ
        check_member(check[1], loc_info, info)
    if check is not None and (organ > 0.5).any():  # with no candidate part there is nothing to confirm
        said = _run_network(image.array, coarse, check[0].to(device).eval(), check[1], opts, device, None, cancel,
                            notes, True, raw.copy())
        names = [lab.name.lower() for lab in check[1].labels]
        confirm = said[_organ_channel(check[1], info)]
        rivals = tuple(said[names.index(r.lower())] for r in info.locator_check_rivals)
    # left of the midline, not above lung (and confirmed by the check)
    location = locate(organ, coarse, opts.min_located_ml, anatomy, confirm, info.locator_check_min, rivals)
    if location.unconfirmed_ml:
        parts = ", ".join(f"{v:g} mL" for v in location.unconfirmed_ml)
        notes.append(f"whole-CT view: the locator check did not confirm {len(location.unconfirmed_ml)} part(s) ({parts}): "
                     f"its mean {info.labels[0].name.lower()} probability over each is under "
                     + " or under ".join([*([f"{info.locator_check_min:g}"] if info.locator_check_min > 0 else []),
                                          *([f"its mean of {', '.join(info.locator_check_rivals)}"]
                                            if info.locator_check_rivals else [])]))
    location.body = anatomy.body
    return location, coarse


def _thin_locator(image: vio.Image, info: ModelInfo, spacing: tuple[float, ...]) -> tuple[VNet, ModelInfo] | None:
    """The model's thin-CT locator when it has one, it shares the locator's grid, and ``image`` is thin enough."""
    if info.thin_locator is None or info.locator is None:
        return None
    if head_foot_extent_mm(image.shape, image.affine) > info.thin_locator_max_mm:
        return None
    check_member(info.thin_locator[1], info.locator[1], info)
    return info.thin_locator


def _run_thin(
    hu: np.ndarray, coarse: GridMap, net: VNet, loc_info: ModelInfo, opts: InferenceOptions, device: torch.device,
    progress: ProgressFn | None, cancel: CancelFn | None, notes: list[str],
) -> np.ndarray:
    """The thin-CT locator over the whole CT, as it was trained: the slab centred in a window of its
    trained depth (air above and below), in one window."""
    depth = loc_info.preprocessing.patch_size[2]
    extra = max(0, depth - hu.shape[2])
    below = extra // 2
    padded = np.pad(hu, ((0, 0), (0, 0), (below, extra - below)), mode="constant", constant_values=-1024.0)
    multiple = net.config.size_multiple
    patch = single_window_patch(padded.shape, multiple) or window_for(loc_info.preprocessing.patch_size, padded.shape, multiple)
    found = _run_network(padded, coarse, net, loc_info, opts, device, progress, cancel, notes, True, padded, patch=patch)
    return found[..., below:below + hu.shape[2]]


def _organ_channel(loc_info: ModelInfo, info: ModelInfo) -> int:
    """Which of the whole-CT view's foreground channels is the main model's organ.

    A locator with one foreground label is that organ. A multi-organ locator (spleen, liver,
    kidney, heart...) must name it: its other classes are what the organ is not.
    """
    if len(loc_info.labels) == 1:
        return 0
    organ = info.labels[0].name.lower()
    names = [lab.name.lower() for lab in loc_info.labels]
    if organ not in names:
        raise ValueError(
            f"the model file's locator labels {names} do not include the model's organ '{organ}'; "
            "the file is inconsistent: re-export it with a locator trained for that organ"
        )
    return names.index(organ)


def _warn_if_thin(report: QualityReport, image: vio.Image, info: ModelInfo) -> None:
    """Add the thin-view warning to a "no spleen" answer on a CT too short for it to be sure."""
    if report.found:
        return
    thin = thin_view_warning(head_foot_extent_mm(image.shape, image.affine), info.labels[0].name.lower())
    if thin is not None:
        report.warnings.append(thin)


def _empty_prediction(image: vio.Image, info: ModelInfo, location: Location, device, t0, notes, mode) -> Prediction:
    """The first-class "no spleen in view" answer: an empty mask on the input grid, said plainly."""
    labelmap = np.zeros(image.shape, dtype=np.uint8)
    report = quality_report(labelmap, labelmap, 1.0, info.labels[0].name.lower(), raw_components=[])
    report.message = location.reason
    _warn_if_thin(report, image, info)
    if location.candidates_ml:
        shown = ", ".join(f"{v:g}" for v in location.candidates_ml[:3])
        more = f" and {len(location.candidates_ml) - 3} smaller" if len(location.candidates_ml) > 3 else ""
        notes.append(f"whole-CT view: its likeliest parts were {shown} mL{more}; none was located as the spleen")
    return Prediction(labelmap, image.affine, report, str(device), time.perf_counter() - t0, notes, mode, None)


# fast mode runs full mode's own windows on the organ (then its answer is full mode's, voxel for
# voxel) while that costs at most this many times the windows of a box of its own around the organ
# (3: a body two windows wide, and one window more along z than its own box; a model with small
# windows, such as the paper V-Net's 96^3, touches many more of full mode's and keeps its own box)
EXACT_FAST_COST = 3.0


def fast_region(
    grid: GridMap, full_box: Box, organ: Box, patch_size: tuple[int, int, int], multiple: int, overlap: float
) -> tuple[GridMap, Box, list[tuple[int, int, int]] | None, tuple[int, int, int] | None]:
    """Fast mode's part of the model grid and the windows to run on it.

    Args:
        grid: the whole model grid; ``full_box``: the box of it full mode windows (the whole grid or
            the body's box).
        organ: the located organ's box on ``grid`` (at least one trained window wide).

    Returns:
        (region, box, windows, patch): when full mode's windows that touch ``organ`` are at most
        ``EXACT_FAST_COST`` times the windows of ``organ`` alone, region is their union and
        windows/patch are those windows (relative to it), so that fast mode's probabilities there
        equal full mode's exactly; otherwise region is ``organ`` with its own window grid (windows
        and patch None). ``box`` is region's box on ``grid``.
    """
    full = grid.crop(full_box.start, full_box.stop)
    origin = np.asarray(full_box.start)
    patch = window_for(patch_size, full.model_shape, multiple)
    padded = tuple(max(s, p) for s, p in zip(full.model_shape, patch))
    lo = np.asarray(organ.start) - origin
    hi = np.asarray(organ.stop) - origin
    touching = touching_windows(_windows(padded, patch, overlap), patch, lo, hi)
    own_patch = window_for(patch_size, organ.shape, multiple)
    own = len(_windows(tuple(max(s, p) for s, p in zip(organ.shape, own_patch)), own_patch, overlap))
    if not touching or len(touching) > EXACT_FAST_COST * own:
        return grid.crop(organ.start, organ.stop), organ, None, None
    start = np.min(np.asarray(touching), 0)
    stop = np.minimum(np.max(np.asarray(touching), 0) + np.asarray(patch), full.model_shape)
    region = full.crop(tuple(int(v) for v in start), tuple(int(v) for v in stop))  # type: ignore[arg-type]
    box = Box(tuple(int(v) for v in start + origin), tuple(int(v) for v in stop + origin))  # type: ignore[arg-type]
    return region, box, [tuple(int(v) for v in np.asarray(w) - start) for w in touching], patch  # type: ignore[misc]


def predict_volume(
    image: vio.Image,
    model: VNet,
    info: ModelInfo,
    options: InferenceOptions | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> Prediction:
    """Segment one CT volume held in memory; the result lies exactly on the input grid.

    When the model file has a locator (or a coarse spacing), a whole-CT view decides first, for
    both modes, whether a spleen is in view and where (see :mod:`vnetseg.fast`): nothing located
    gives an empty mask with ``report.found`` False and the reason in ``report.message``; otherwise
    only the component on the located part is kept. Full mode then windows the patient's body
    (its box), fast mode only full mode's windows that touch the located part's box, so that its
    answer there is full mode's voxel for voxel (or, where those would cost more than
    ``EXACT_FAST_COST`` times a box of its own, that box: see :func:`fast_region`).
    """
    opts = options or InferenceOptions()
    t0 = time.perf_counter()
    vio.validate_image(image, "input")
    device = resolve_device(opts.device)
    mode = choose_mode(opts.mode, device, info)
    model = model.to(device).eval()
    pre = info.preprocessing
    notes: list[str] = []
    if progress is not None:
        progress(0.0, "resampling")
    grid = make_grid_map(image.shape, image.affine, pre.target_spacing)
    region, fine_from, box = grid, 0.05, None
    full_box = Box((0, 0, 0), grid.model_shape)  # what full mode windows: the grid, or the body's box
    windows: list[tuple[int, int, int]] | None = None
    patch: tuple[int, int, int] | None = None
    view = whole_ct_view(image, model, info, opts, device, _stage(progress, 0.02, 0.2, "locating"), cancel, notes)
    if view is not None:
        location, coarse = view
        if cancel is not None and cancel():
            raise Cancelled("cancelled by the user")
        if not location.found:
            if progress is not None:
                progress(1.0, "done: no spleen in view")
            empty = _empty_prediction(image, info, location, device, t0, notes, mode)
            empty.located_ml = 0.0
            if opts.probability:
                empty.probability = conf.empty_probability(image.shape, opts.probability)
                empty.probability_covers = conf.COVERS_NOTHING
            return empty
        fine_from = 0.2
        if location.body is not None and location.body.any():
            # both modes window the patient's body (its box, at least one window): the air around it
            # holds no spleen, and skipping it keeps full mode ahead of a plain sliding window
            body_box, _ = box_from_coarse_mask(location.body, coarse, grid, BODY_MARGIN_MM, min_shape=pre.patch_size)
            if body_box is not None and body_box.shape != grid.model_shape:
                full_box, region = body_box, grid.crop(body_box.start, body_box.stop)
                if mode == "full":
                    share = math.prod(body_box.shape) / math.prod(grid.model_shape)
                    notes.append(f"full mode: the body's box, {100 * share:.0f} % of the CT's volume, was segmented")
        if mode == "fast":
            # the box is at least one trained window in every direction (centred on the organ), so the
            # network sees the organ with as much surrounding anatomy as in full mode, not a tight crop
            organ, note = box_from_coarse_mask(location.mask, coarse, grid, min_shape=pre.patch_size)
            notes += [f"fast mode: {note}"] if note else []
            region, box, windows, patch = fast_region(  # type: ignore[arg-type]
                grid, full_box, organ, pre.patch_size, model.config.size_multiple, opts.overlap
            )
    # the main network always uses its trained window (fast mode just runs fewer of them): its output
    # depends on the window size, so one big window would not give the full pass's answer
    segmenting = _stage(progress, fine_from, 0.9, "segmenting")
    probs = _run_network(image.array, region, model, info, opts, device, segmenting, cancel, notes, False,
                         windows=windows, patch=patch)
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")
    if progress is not None:
        progress(0.9, "resampling to the input grid")
    grow_p = info.postprocessing.get("native_grow_probability", 0.0)
    growing = opts.postprocess and opts.hu_trim and opts.native_grow and len(info.labels) == 1
    if growing and 0.0 < grow_p < opts.threshold:
        # one resampling gives both: 2 = over the threshold (the mask), 1 = only over grow_p
        levels = to_input_grid(probs[0], region, levels=(grow_p, opts.threshold))
        labelmap, candidates = (levels == 2).view(np.uint8) * np.uint8(info.label_values[0]), levels > 0
        del levels
    else:
        labelmap, candidates = _labels_on_input_grid(probs, region, info, opts.threshold), None
    probability = conf.probability_on_input_grid(probs[0], region, opts.probability) if opts.probability else None
    raw = labelmap > 0
    focus = conf.crop_around(probs[0], region, raw, image.affine)  # a small copy, for the confidence
    del probs
    if view is None:  # no whole-CT view: the largest component is the organ
        keep, counts = split_components(raw)  # labelled once: clean-up and the report share it
        keep = keep if opts.postprocess else raw
    else:
        located = _located_on_input_grid(grown(location.mask, coarse), coarse)
        keep, counts = select_located(raw, located, single=opts.postprocess)
        if raw.any() and not keep.any():
            notes.append("the full-resolution mask does not overlap the part the whole-CT view located")
    if opts.postprocess and opts.hu_trim:
        keep, trim = trim_to_organ_hu(keep, image.array, image.spacing)
        if trim is not None and trim.removed * image.voxel_volume_ml >= 0.05:
            notes.append(
                f"HU trim: {trim.removed * image.voxel_volume_ml:.1f} mL outside the organ's own range "
                f"({trim.low:.0f} to {trim.high:.0f} HU) removed from its surface"
            )
        if trim is not None and candidates is not None:
            keep, added = grow_native(keep, candidates, image.array, trim)
            if added * image.voxel_volume_ml >= 0.05:
                notes.append(
                    f"native CT (the organ's core {trim.median:.0f} HU): grown by {added * image.voxel_volume_ml:.1f} mL "
                    f"into voxels of probability over {grow_p:g} in its HU range"
                )
    del candidates
    if opts.postprocess and opts.appendages:
        keep, cut = drop_thin_appendages(keep, image.spacing)
        if cut * image.voxel_volume_ml >= 0.05:
            notes.append(
                f"thin appendage: {cut * image.voxel_volume_ml:.1f} mL more than {APPENDAGE_REACH_MM:g} mm from "
                "the organ's thick body cut off"
            )
    if opts.postprocess:
        keep = fill_holes(keep)
    dense = None  # (share, mL) of a kept part that is bone or contrast-filled blood: then no spleen
    if opts.postprocess and opts.hu_trim and len(info.labels) == 1:
        share = dense_share(keep, image.array, image.spacing)
        if share is not None and share > MAX_DENSE_SHARE:
            dense = (share, float(np.count_nonzero(keep)) * image.voxel_volume_ml)
            keep = np.zeros_like(keep)
    labelmap = (labelmap if len(info.labels) > 1 else np.uint8(1)) * keep  # uint8, no int64 temporary
    voxel_ml = vio.Image(labelmap, image.affine).voxel_volume_ml
    organ_name = info.labels[0].name.lower()
    report = quality_report(raw, labelmap > 0, voxel_ml, organ_name, raw_components=counts)
    if dense is not None:
        report.message = (
            f"{report.message} (the part found, {dense[1]:.1f} mL, is {100 * dense[0]:.0f} % denser than {DENSE_HU:g} HU "
            f"at its core: bone or contrast-filled blood, not the {organ_name})"
        )
    _warn_if_thin(report, image, info)  # "no spleen" also when the mask missed the located part or was cut away
    if focus is not None and report.found:
        report.confidence = conf.measure_confidence(focus[0], focus[1], labelmap == info.label_values[0])
        if report.confidence is not None and report.confidence.low:
            report.warnings.append(conf.low_confidence_warning(report.confidence))
    if progress is not None:
        progress(1.0, "done")
    result = Prediction(labelmap, image.affine, report, str(device), time.perf_counter() - t0, notes, mode, box)
    result.located_ml = None if view is None else location.volume_ml
    if probability is not None:
        result.probability = probability
        result.probability_covers = (
            conf.COVERS_BOX if box is not None else conf.COVERS_BODY if region is not grid else conf.COVERS_VOLUME
        )
    return result


def _located_on_input_grid(mask: np.ndarray, coarse: GridMap) -> np.ndarray:
    """The located part (coarse model grid, bool) as an input-grid mask, resampling only its box.

    Nearest-neighbour resampling of the box plus one empty voxel on each side gives every input
    voxel the value the whole coarse grid would (outside the box it is 0 either way; an input voxel
    centred exactly half-way between two coarse voxels may round either way, as it may there), at a
    fraction of the cost: resampling the whole grid took 0.24-0.54 s on a 512 x 512 x 120 CT.
    """
    idx = np.argwhere(mask)
    if idx.size == 0:
        return np.zeros(coarse.input_shape, dtype=bool)
    start = np.maximum(idx.min(0) - 1, 0)
    stop = np.minimum(idx.max(0) + 2, mask.shape)
    part = mask[tuple(slice(a, b) for a, b in zip(start, stop))].astype(np.float32)
    box = coarse.crop(tuple(int(v) for v in start), tuple(int(v) for v in stop))  # type: ignore[arg-type]
    return to_input_grid(part, box, order=0, threshold=0.5) > 0


def _labels_on_input_grid(probs: np.ndarray, grid: GridMap, info: ModelInfo, threshold: float) -> np.ndarray:
    """(K-1, model grid) foreground probabilities -> (I, J, K) uint8 labels on the input grid."""
    values = info.label_values
    if len(values) == 1:
        return to_input_grid(probs[0], grid, threshold=threshold) * np.uint8(values[0])
    best = np.zeros(grid.input_shape, dtype=np.float32)
    total = np.zeros(grid.input_shape, dtype=np.float32)
    labels = np.zeros(grid.input_shape, dtype=np.uint8)
    for c, value in enumerate(values):
        p = to_input_grid(probs[c], grid)
        total += p
        better = p > best
        labels[better] = value
        best[better] = p[better]
    labels[best <= 1.0 - total] = 0  # argmax: the background probability is 1 - sum(foreground)
    return labels


def segments_of(info: ModelInfo) -> list[vio.SegmentSpec]:
    return [vio.SegmentSpec(lab.value, lab.name, lab.color, lab.terminology) for lab in info.labels]


def predict_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    model: str | os.PathLike[str] | tuple[VNet, ModelInfo],
    options: InferenceOptions | None = None,
    *,
    overwrite: bool = False,
    sha256: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    read: vio.ReadOptions | None = None,
    probability_path: str | os.PathLike[str] | None = None,
) -> Prediction:
    """Read a CT, segment it, and write the mask (format from the file name), atomically.

    The output is checked before any work (an existing file is kept unless ``overwrite``), and
    nothing is written when reading, inference or cancellation fails. ``read`` says how a DICOM
    folder is read (which series, missing slices allowed); what reading noticed comes first in ``notes``.
    With ``probability_path`` (.nii.gz, .nii or .nrrd) the spleen probability map is written too, as
    ``options.probability`` asks (float32 when it asks for none), saying in the file what it covers.
    """
    dest = vio.check_writable(output_path, overwrite)
    prob_dest = vio.check_writable_volume(probability_path, overwrite) if probability_path is not None else None
    if prob_dest is not None and (options is None or options.probability is None):
        options = replace(options or InferenceOptions(), probability="float32")
    if isinstance(model, tuple):
        net, info = model
    else:
        net, info = load_model(model, sha256=sha256)
    read = read or vio.ReadOptions()
    image = vio.read_image(input_path, dtype=None, series=read.series, allow_gaps=read.allow_gaps)  # int16 stays int16
    vio.check_source_for(dest, image.source)  # DICOM SEG output needs a DICOM input: say so before any work
    result = predict_volume(image, net, info, options, progress, cancel)
    result.notes[:0] = image.notes
    from .dicom_seg import algorithm_of

    vio.write_mask(dest, result.labelmap, result.affine, segments_of(info), overwrite=overwrite, source=image.source,
                   algorithm=algorithm_of(info))
    if prob_dest is not None and result.probability is not None:
        write_probability(prob_dest, result, info, overwrite=overwrite)
    return result


def write_probability(path: str | os.PathLike[str], result: Prediction, info: ModelInfo, *, overwrite: bool = False) -> Path:
    """Write ``result.probability`` (NIfTI or NRRD) on the input grid, saying what it is and covers."""
    if result.probability is None:
        raise ValueError("this prediction holds no probability map; run it with InferenceOptions(probability='float32')")
    scale = "0-255 = probability x 255" if result.probability.dtype == np.uint8 else "0-1"
    description = {
        "vnetseg_probability": f"{info.labels[0].name} probability {scale}",
        "vnetseg_probability_covers": result.probability_covers,
        "vnetseg_probability_note": result.probability_note,
    }
    return vio.write_volume(path, result.probability, result.affine, description, overwrite=overwrite)


def output_name(input_path: str | os.PathLike[str], suffix: str = ".nii.gz") -> str:
    """``case.nii.gz`` -> ``case_spleen.nii.gz`` (folders: the folder name)."""
    p = Path(input_path)
    name = p.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return f"{name}_spleen{suffix}"
