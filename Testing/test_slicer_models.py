"""Models offered by the panel: import with load + checksum checks, listing, model card, no-model message."""

from __future__ import annotations

import shutil

import pytest

from vnetseg.checkpoint import ModelFileError, ModelInfo, Preprocessing, file_sha256, save_model
from VNetSegmentationLib.models import ModelStore, modelCardText


def make_model(path, card, seed=1):
    import torch

    from vnetseg.model import VNetConfig, build_model

    torch.manual_seed(seed)
    cfg = VNetConfig(widths=(2, 4, 8, 16, 32), kernel_size=3, norm="none")
    save_model(path, build_model(cfg), ModelInfo(cfg, Preprocessing(patch_size=(32, 32, 32)), card=card))
    return path


def test_no_model_installed_says_how_to_get_one(tmp_path):
    store = ModelStore(tmp_path / "models", includeShipped=False)
    assert store.listModels() == []
    message = store.noModelMessage()
    assert "No segmentation model is installed" in message and "Import model file" in message
    assert str(tmp_path / "models") in message


def test_import_copies_a_verified_model(tmp_path, tiny_model_file):
    store = ModelStore(tmp_path / "models", includeShipped=False)
    entry = store.importModel(tiny_model_file, sha256=file_sha256(tiny_model_file))
    assert entry.path.parent == tmp_path / "models" and entry.name == tiny_model_file.stem
    assert file_sha256(entry.path) == file_sha256(tiny_model_file) == entry.sha256
    assert store.listModels() == [entry]
    assert store.findModel(entry.name) == entry
    # importing the same file again is harmless
    assert store.importModel(tiny_model_file) == entry
    assert [p.name for p in (tmp_path / "models").iterdir()] == sorted([entry.path.name, entry.path.name + ".sha256"])


def test_import_refuses_wrong_checksum_and_damaged_files(tmp_path, tiny_model_file):
    store = ModelStore(tmp_path / "models", includeShipped=False)
    with pytest.raises(ModelFileError, match="SHA-256"):
        store.importModel(tiny_model_file, sha256="0" * 64)
    damaged = tmp_path / "damaged.pt"
    data = bytearray(tiny_model_file.read_bytes())
    damaged.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ModelFileError):
        store.importModel(damaged)
    with pytest.raises(ValueError, match="must end in .pt"):
        store.importModel(tmp_path / "weights.bin")
    assert store.listModels() == [] and not any((tmp_path / "models").glob("*.pt"))


def test_a_different_model_with_the_same_name_needs_confirmation(tmp_path, tiny_model_file):
    store = ModelStore(tmp_path / "models", includeShipped=False)
    store.importModel(tiny_model_file)
    other = make_model(tmp_path / tiny_model_file.name, {"name": "another"}, seed=5)
    with pytest.raises(FileExistsError, match="already installed"):
        store.importModel(other)
    assert file_sha256(store.listModels()[0].path) == file_sha256(tiny_model_file)
    entry = store.importModel(other, overwrite=True)
    assert entry.sha256 == file_sha256(other) and store.readInfo(entry).card["name"] == "another"


def test_tampered_installed_model_is_refused_on_use(tmp_path, tiny_model_file):
    store = ModelStore(tmp_path / "models", includeShipped=False)
    entry = store.importModel(tiny_model_file)
    replacement = make_model(tmp_path / "x.pt", {"name": "swapped"}, seed=9)
    shutil.copyfile(replacement, entry.path)  # the file changed behind the store's back
    with pytest.raises(ModelFileError, match="SHA-256"):
        store.readInfo(store.findModel(entry.name))


def test_model_card_of_a_model_trained_with_training_engine(tmp_path):
    """The card training.engine writes: data (task, cases), validation (Dice per case, mean), fold, epochs."""
    card = {
        "name": "V-Net Task09_Spleen fold 0 (best)",
        "trained": True,
        "data": {
            "root": "/data/Task09_Spleen",
            "task": "Task09_Spleen",
            "labels": {"0": "background", "1": "spleen"},
            "num_cases": 41,
            "train_cases": [f"spleen_{i}" for i in range(32)],
            "val_cases": [f"spleen_{i}" for i in range(32, 41)],
        },
        "fold": 0,
        "epochs": 300,
        "validation": {"dice_per_case": {f"spleen_{i}": 0.9 for i in range(32, 41)}, "dice_mean": 0.9123},
        "date": "2026-11-27T10:00:00+00:00",
    }
    store = ModelStore(tmp_path / "models", includeShipped=False)
    entry = store.importModel(make_model(tmp_path / "spleen.pt", card))
    text = modelCardText(store.readInfo(entry))
    assert "Model: V-Net Task09_Spleen fold 0 (best)" in text
    assert "Trained on: Task09_Spleen: 32 training and 9 validation cases" in text
    assert "Validation Dice: 0.912 (mean of 9 validation cases)" in text
    assert "Epochs: 300" in text and "Fold: 0" in text
    assert "random weights" not in text and "Labels: Spleen" in text


def test_model_card_of_the_shipped_kind_of_model(tmp_path):
    """The shipped model's card: training_data (source, labels), leave-one-patient-out scores, limits."""
    card = {
        "name": "spleen-ct-light",
        "version": "1.0",
        "trained": True,
        "training_data": {"source": "two real abdominal CTs", "labels": "TotalSegmentator pseudo-labels"},
        "leave_one_patient_out": {
            "P1": {"trained_on": "P2", "cases": [{"scan": "p1_ct", "dice": 0.81}]},
            "P2": {"trained_on": "P1", "cases": [{"scan": "p2_dicom", "dice": 0.77}]},
        },
        "limits": ["research use only; not for clinical decisions"],
    }
    info = ModelStore(tmp_path, includeShipped=False).readInfo(make_model(tmp_path / "light.pt", card))
    text = modelCardText(info)
    assert "Model: spleen-ct-light v1.0" in text
    assert "Trained on: two real abdominal CTs; labels: TotalSegmentator pseudo-labels" in text
    assert "Validation Dice: leave-one-patient-out p1_ct 0.810, p2_dicom 0.770" in text
    assert "Limits: research use only; not for clinical decisions" in text


def test_model_card_of_an_untrained_model_says_so(tiny_model_file, tmp_path):
    info = ModelStore(tmp_path, includeShipped=False).readInfo(tiny_model_file)
    text = modelCardText(info)
    assert "random weights" in text and "Validation Dice: not recorded" in text and "Trained on: not recorded" in text


def test_shipped_models_are_listed_first(tmp_path, tiny_model_file):
    import json

    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copyfile(tiny_model_file, weights / "shipped.pt")
    (weights / "registry.json").write_text(
        json.dumps(
            {"default": "spleen", "models": {"spleen": {"file": "shipped.pt", "sha256": file_sha256(tiny_model_file)}}}
        )
    )
    store = ModelStore(tmp_path / "models", registryFile=weights / "registry.json")
    store.importModel(make_model(tmp_path / "mine.pt", {"name": "mine"}))
    assert [(e.name, e.source) for e in store.listModels()] == [("spleen", "shipped"), ("mine", "user")]


def test_self_test_model_loads_and_is_flagged_as_random(tmp_path):
    """The in-Slicer tests build their model with writeRandomModel; it must load and say what it is."""
    from vnetseg.checkpoint import load_model
    from VNetSegmentationLib.models import modelCardText, writeRandomModel

    path = writeRandomModel(tmp_path / "selftest.pt", "self-test model")
    _, info = load_model(path)
    assert info.card == {"name": "self-test model", "trained": False}
    assert "random weights" in modelCardText(info)
