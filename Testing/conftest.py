"""Shared fixtures: where the real CT data lives, and small models made on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_ct_dir() -> Path:
    """``$VNETSEG_CT_DIR`` or ``../shared/data/ct`` next to the checkout."""
    env = os.environ.get("VNETSEG_CT_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "ct"


@pytest.fixture(scope="session")
def ct_dir() -> Path:
    path = shared_ct_dir()
    if not (path / "example_ct.nii.gz").is_file():
        pytest.skip(f"real CT data not found at {path} (set VNETSEG_CT_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight V-Net small enough for fast tests, saved as a real model file."""
    import torch

    from vnetseg.checkpoint import ModelInfo, Preprocessing, save_model
    from vnetseg.model import VNetConfig, build_model

    torch.manual_seed(0)
    cfg = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="instance")
    model = build_model(cfg)
    info = ModelInfo(cfg, Preprocessing(target_spacing=(3.0, 3.0, 3.0), patch_size=(32, 32, 32)),
                     card={"name": "tiny random test model", "trained": False})
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_model(path, model, info)
    return path


@pytest.fixture(scope="session")
def blind_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a locator that never finds a spleen (its output bias says background)."""
    import torch

    from vnetseg.checkpoint import ModelInfo, Preprocessing, save_model
    from vnetseg.model import VNetConfig, build_model

    torch.manual_seed(0)
    cfg = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="instance")
    model, locator = build_model(cfg), build_model(cfg)
    with torch.no_grad():
        locator.head.weight.zero_()
        locator.head.bias.copy_(torch.tensor([10.0, -10.0]))  # background everywhere
    info = ModelInfo(cfg, Preprocessing(target_spacing=(3.0, 3.0, 3.0), patch_size=(32, 32, 32)),
                     card={"name": "tiny model whose locator sees no spleen", "trained": False})
    loc_info = ModelInfo(cfg, Preprocessing(target_spacing=(6.0, 6.0, 6.0), patch_size=(32, 32, 32)))
    path = tmp_path_factory.mktemp("models") / "blind.pt"
    save_model(path, model, info, locator=(locator, loc_info))
    return path


@pytest.fixture(scope="module")
def env():
    """A scene that behaves like the application's (slicer-core), one per test module."""
    from slicer_helpers import make_scene

    return make_scene()


@pytest.fixture
def logic(env, tmp_path: Path):
    """The Slicer module's Logic on that scene, with an empty model folder of its own."""
    from VNetSegmentationLib import VNetSegmentationLogic

    return VNetSegmentationLogic(env.scene, tmp_path / "models", includeShippedModels=False)
