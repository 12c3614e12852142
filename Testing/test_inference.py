"""Sliding window and whole-volume prediction: known answers, progress, cancel, devices, geometry."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from test_io import make_affine

from vnetseg.checkpoint import ModelInfo, Preprocessing
from vnetseg.inference import (
    Cancelled,
    DeviceError,
    InferenceOptions,
    WindowSettings,
    _windows,
    gaussian_importance,
    predict_volume,
    resolve_device,
    sliding_window,
    touching_windows,
    window_starts,
)
from vnetseg.io import Image, read_image
from vnetseg.model import VNetConfig
from vnetseg.postprocess import dice


@pytest.mark.parametrize("shape", [(1, 50, 70, 33), (2, 16, 16, 16), (1, 10, 40, 7)])
@pytest.mark.parametrize("overlap,batch", [(0.0, 1), (0.25, 3), (0.5, 8)])
def test_identity_plus_one_returns_input_plus_one(shape, overlap, batch) -> None:
    vol = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = sliding_window(vol, lambda x: x + 1, WindowSettings((16, 32, 16), overlap, batch), out_channels=shape[0])
    assert out.shape == vol.shape
    np.testing.assert_allclose(out, vol + 1, atol=1e-5)


def test_windows_cover_every_voxel_with_the_requested_overlap() -> None:
    for size in (96, 97, 150, 273, 400):
        starts = window_starts(size, 96, 0.25)
        assert starts[0] == 0 and starts[-1] + 96 == size or size <= 96
        assert all(b - a <= 72 for a, b in itertools.pairwise(starts))
    assert window_starts(50, 96, 0.5) == [0]
    g = gaussian_importance((8, 8, 8))
    assert g.max() == 1.0 and g.min() > 0 and np.allclose(g, g[::-1, ::-1, ::-1])


def test_progress_is_monotone_and_cancel_stops_within_one_window() -> None:
    vol = np.zeros((1, 64, 64, 64), np.float32)
    seen: list[float] = []
    out = sliding_window(vol, lambda x: x, WindowSettings((32, 32, 32), 0.0, 1), 1, progress=lambda f, m: seen.append(f))
    assert out.shape == vol.shape and seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 8
    calls = {"n": 0}

    def predictor(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return x

    with pytest.raises(Cancelled):
        sliding_window(vol, predictor, WindowSettings((32, 32, 32), 0.0, 1), 1, cancel=lambda: calls["n"] >= 3)
    assert calls["n"] == 3  # the window running when cancel was raised is the last one


def test_out_of_memory_halves_the_batch_and_still_gives_the_right_answer() -> None:
    vol = np.random.default_rng(1).normal(size=(1, 48, 48, 48)).astype(np.float32)
    sizes: list[int] = []

    def predictor(x: torch.Tensor) -> torch.Tensor:  # behaves like a GPU that fits 2 windows at a time
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return x * 2

    out = sliding_window(vol, predictor, WindowSettings((16, 16, 16), 0.0, 8), 1, on_oom=sizes.append)
    assert sizes == [4, 2]
    np.testing.assert_allclose(out, vol * 2, atol=1e-5)

    def never(x: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(MemoryError, match="--device cpu"):
        sliding_window(vol, never, WindowSettings((16, 16, 16), 0.0, 2), 1)


def test_device_choice_never_falls_back_silently() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("gpu")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")


class ThresholdNet(torch.nn.Module):
    """A stand-in network with a known answer: foreground where the windowed intensity > 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.config = VNetConfig(widths=(4, 8, 16, 32, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 40.0 * (x - 0.5)], dim=1)  # (B, 2, ...) logits


INFO = ModelInfo(VNetConfig(widths=(4, 8, 16, 32, 64)), Preprocessing(target_spacing=(2.0, 2.0, 2.5), patch_size=(48, 48, 48)))


def _reoriented(image: Image, kind: str) -> Image:
    """The same voxels under another voxel->RAS matrix (a physically different, valid image)."""
    spacing = image.spacing
    return Image(image.array, make_affine(kind, spacing=tuple(spacing), origin=(10.0, -20.0, 30.0)))


@pytest.mark.parametrize("kind", ["RAS", "LPS", "LAS", "oblique_left_handed"])
def test_prediction_lands_exactly_on_the_input_grid(ct_dir: Path, kind: str) -> None:
    real = read_image(ct_dir / "example_ct_sm.nii.gz")
    smooth = Image(ndimage.gaussian_filter(real.array, 1.5), real.affine)  # so resampling barely changes it
    ct = _reoriented(smooth, kind)
    truth = ct.array > 53.5  # what ThresholdNet finds, on the input grid
    result = predict_volume(ct, ThresholdNet(), INFO, InferenceOptions(device="cpu", postprocess=False))
    assert result.labelmap.shape == ct.shape and result.labelmap.dtype == np.uint8
    np.testing.assert_array_equal(result.affine, ct.affine)
    assert dice(result.labelmap > 0, truth) > 0.95  # only resampling blur separates them
    assert dice(result.labelmap[::-1] > 0, truth) < 0.8  # a mirrored result would be caught


def test_postprocess_keeps_one_component_and_reports_volume(ct_dir: Path) -> None:
    ct = read_image(ct_dir / "example_ct_sm.nii.gz")
    raw = predict_volume(ct, ThresholdNet(), INFO, InferenceOptions(device="cpu", postprocess=False))
    clean = predict_volume(ct, ThresholdNet(), INFO, InferenceOptions(device="cpu", postprocess=True))
    assert 0 < clean.labelmap.sum() < raw.labelmap.sum()
    assert clean.volume_ml == pytest.approx(clean.labelmap.sum() * 27 / 1000)
    assert any("separate parts" in w for w in clean.report.warnings)
    assert clean.device == "cpu" and clean.seconds > 0


def test_prediction_with_a_real_vnet_and_progress(ct_dir: Path, tiny_model_file: Path) -> None:
    from vnetseg.checkpoint import load_model

    net, info = load_model(tiny_model_file)
    ct = read_image(ct_dir / "example_ct_sm.nii.gz")
    seen: list[float] = []
    result = predict_volume(ct, net, info, InferenceOptions(device="cpu"), progress=lambda f, m: seen.append(f))
    assert result.labelmap.shape == ct.shape
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    with pytest.raises(Cancelled):
        predict_volume(ct, net, info, InferenceOptions(device="cpu"), cancel=lambda: True)


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="overlap"):
        InferenceOptions(overlap=1.0)
    with pytest.raises(ValueError, match="threshold"):
        InferenceOptions(threshold=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        InferenceOptions(batch_size=0)


def test_sliding_window_over_some_windows_equals_the_full_pass_where_they_are_all_run() -> None:
    rng = np.random.default_rng(3)
    vol = rng.random((1, 50, 40, 30)).astype(np.float32)

    def predictor(x: torch.Tensor) -> torch.Tensor:  # depends on the window: a voxel's value and the window mean
        return x * 0.5 + x.mean(dim=(2, 3, 4), keepdim=True)

    settings = WindowSettings((24, 24, 16), 0.25, 1)
    full = sliding_window(vol, predictor, settings, 1)
    lo, hi = (20, 10, 8), (30, 22, 14)  # a box; run only the windows that share a voxel with it
    touching = touching_windows(_windows(vol.shape[1:], settings.patch, 0.25), settings.patch, lo, hi)
    some = sliding_window(vol, predictor, settings, 1, windows=touching)
    box = (slice(None), *(slice(a, b) for a, b in zip(lo, hi)))
    np.testing.assert_array_equal(some[box], full[box])  # every window over the box ran: identical values
    assert not np.array_equal(some, full)  # elsewhere windows are missing
    # z windows start at 0, 7 and 14; the last misses the box (slices 8-13), so slices 23+ are
    # covered by no run window: 0 there, not NaN
    assert window_starts(30, 16, 0.25) == [0, 7, 14]
    assert np.all(some[..., 23:] == 0.0) and np.isfinite(some).all() and np.all(some[..., :23] > 0)
