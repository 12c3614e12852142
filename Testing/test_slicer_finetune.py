"""'Improve the model...': the Logic fine-tunes a model on exported cases in a separate process (progress,
cancel, resume, clear failures) and registers the new model in the user's model folder; headless, on
Slicer's real MRML classes (slicer-core) and a real CT."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from slicer_helpers import one_torch_thread  # noqa: F401  (autouse: one torch thread here and in the child)
from training_helpers import blob_case, write_case, write_dataset

import training.data as training_data
from training.metrics import dice_score
from vnetseg.checkpoint import SPLEEN_LABELS, file_sha256
from vnetseg.io import read_image
from vnetseg.registry import default_model
from VNetSegmentationLib import FinetuneCancelled, FinetuneSettings, SegmentationOptions, nodes
from VNetSegmentationLib.finetune import WORK_FOLDER


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def segment_mask(logic, ct, model) -> np.ndarray:
    node, result = logic.segment(ct, model, SegmentationOptions(device="cpu"))
    return nodes.segmentMask(node, result.segmentIDs[0], ct)


def test_a_corrected_case_exported_then_improved_on_scores_better_and_the_new_model_is_installed(
    env, ct_dir, logic, tmp_path
):
    nib = pytest.importorskip("nibabel")
    shipped = default_model()
    if shipped is None:
        pytest.skip("no shipped model installed")
    ct = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "patient 7 (CT)")
    spleen = (np.asarray(nib.load(str(ct_dir / "example_ct_sm_multilabel_v2.nii.gz")).dataobj) == 1).astype(np.uint8)
    wrong = spleen.copy()
    wrong[60:100, 30:70, 5:25] = 1  # a deliberately wrong region: liver marked as spleen,
    wrong[:, :, 12:16] = 0  # and four slices of the spleen erased
    seg = nodes.createSegmentationNode(env.scene, ct, wrong, SPLEEN_LABELS, "auto", closedSurface=False)
    nodes.fillSegments(seg, ct, spleen, SPLEEN_LABELS)  # the correction in the Segment Editor: reference restored
    folder = tmp_path / "Task_corrected"
    logic.exportForTraining(ct, seg, folder, "patient7")
    dataset = training_data.read_msd(folder)
    assert np.array_equal(training_data.load_case(dataset.cases[0], dataset.labels)[1], spleen)

    base_sha = file_sha256(shipped.path)
    before = segment_mask(logic, ct, shipped.path)
    seen: list[tuple[str, int, float]] = []
    settings = FinetuneSettings(steps=30, locatorSteps=5, patchSize=(96, 96, 32), device="cpu")
    outcome = logic.improveModel(folder, shipped.path, "spleen-improved", settings,
                                 progress=lambda run: seen.append((run.phase, run.step, run.loss)), timeout=300)

    assert outcome.installed and not outcome.worse and outcome.onTrainingCases and outcome.resumedAt == 0
    assert "TRAINING cases" in outcome.table and "Installed 'spleen-improved'" in outcome.message
    main_steps = [(s, loss) for phase, s, loss in seen if phase == "main"]
    assert main_steps[-1][0] == 30 and all(math.isfinite(loss) for _, loss in main_steps)
    assert any(phase == "locator" for phase, _, _ in seen)
    entry = outcome.model
    assert entry.name == "spleen-improved" and entry.path == logic.models.folder / "spleen-improved.pt"
    assert entry.sha256 == file_sha256(entry.path) and [e.name for e in logic.listModels()] == ["spleen-improved"]
    assert not (folder / WORK_FOLDER / "spleen-improved" / "spleen-improved.pt").exists()  # moved, not copied twice
    card = logic.models.readInfo(entry).card
    assert card["base_model"]["sha256"] == base_sha and card["base_model"]["name"] == shipped_name(shipped)
    assert card["data"]["train_cases"] == ["patient7"] and card["fine_tune"]["steps"] == 30
    assert file_sha256(shipped.path) == base_sha  # the base model is never modified
    text = logic.modelCardText(entry)  # what the panel shows for the new model
    assert f"Fine-tuned from: {shipped_name(shipped)}" in text and base_sha[:16] in text
    assert "1 training cases: not an independent test" in text

    after = segment_mask(logic, ct, entry)  # the installed model, segmenting in Slicer as a user would
    # measured: shipped v1.1.0 0.892 -> 0.93; v2.0.0 (already closer on this case) 0.894 -> 0.901 (10 steps);
    # v2.2.0, whose native-CT growth already brings it to 0.923, is beaten after 30 steps (0.934; 0.918
    # after 10, and the guard then refuses to install it)
    assert dice_score(after, spleen) > dice_score(before, spleen) + 0.005
    assert outcome.scores["new"][0]["dice"] == pytest.approx(dice_score(after, spleen), abs=1e-6)


def test_a_worse_model_is_not_installed_unless_the_user_insists(ct_dir, logic, tmp_path):
    nib = pytest.importorskip("nibabel")
    shipped = default_model()
    if shipped is None:
        pytest.skip("no shipped model installed")
    image = read_image(ct_dir / "example_ct_sm.nii.gz")
    spleen = (np.asarray(nib.load(str(ct_dir / "example_ct_sm_multilabel_v2.nii.gz")).dataobj) == 1).astype(np.uint8)
    wrong = np.zeros_like(spleen)  # a case built to make the guard fire: liver marked as spleen, spleen as background
    wrong[60:100, 30:70, 5:25] = 1
    wrong[spleen > 0] = 0
    data = tmp_path / "data"
    write_dataset(data, [write_case(data, "right", image.array, spleen, image.affine),
                         write_case(data, "wrong", image.array, wrong, image.affine)])
    settings = FinetuneSettings(steps=8, locatorSteps=0, patchSize=(96, 96, 32), lr=3e-3, device="cpu",
                                valCases=("right",))
    outcome = logic.improveModel(data, shipped.path, "spleen-worse", settings, timeout=300)
    assert not outcome.installed and outcome.worse and outcome.model is None and not outcome.onTrainingCases
    assert "WORSE than the base model" in outcome.table and "NOT installed" in outcome.message
    assert not logic.models.folder.exists() and logic.listModels() == []

    settings.force = True  # the user insists: the finished run is resumed, not trained again
    insisted = logic.improveModel(data, shipped.path, "spleen-worse", settings, timeout=300)
    assert insisted.installed and insisted.resumedAt == 8 and "because you insisted" in insisted.message
    assert [e.name for e in logic.listModels()] == ["spleen-worse"]


def shipped_name(shipped) -> str:
    from vnetseg.checkpoint import read_model_info

    return str(read_model_info(shipped.path)[0].card.get("name", ""))


def blob_folder(root: Path) -> Path:
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    pairs = []
    for n in range(2):
        image, label = blob_case(shape=(32, 28, 20), centre=(14 + n, 13, 10), radius=5.0, seed=n)
        pairs.append(write_case(root, f"blob_{n}", image, label, affine))
    write_dataset(root, pairs)
    return root


def test_cancel_leaves_the_model_folder_unchanged_and_starting_again_resumes(logic, tiny_model_file, tmp_path):
    data = blob_folder(tmp_path / "data")
    logic.models.folder.mkdir(parents=True)
    before = tree(logic.models.folder)
    settings = FinetuneSettings(steps=16, locatorSteps=0, patchSize=(32, 32, 16), device="cpu", checkpointEvery=2,
                                force=True)
    run = logic.startFinetune(data, tiny_model_file, "tiny-improved", settings)
    deadline = time.monotonic() + 120
    while run.step < 4 and not run.finished and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    assert run.step >= 4 and not run.finished and run.loss is not None and "main step" in run.message
    run.cancel()
    assert run.state == "cancelled"
    with pytest.raises(FinetuneCancelled, match="nothing was installed.*resume"):
        logic.finishFinetune(run)
    assert tree(logic.models.folder) == before
    assert (data / WORK_FOLDER / "tiny-improved" / "state_main.pth").is_file()

    outcome = logic.improveModel(data, tiny_model_file, "tiny-improved", settings, timeout=120)
    assert outcome.installed and outcome.model.name == "tiny-improved" and outcome.resumedAt >= 2
    assert tree(logic.models.folder) == ["tiny-improved.pt", "tiny-improved.pt.sha256"]
    with pytest.raises(FileExistsError, match="already installed"):
        logic.startFinetune(data, tiny_model_file, "tiny-improved", settings)


def test_failures_say_what_is_wrong_and_install_nothing(logic, tiny_model_file, tmp_path):
    with pytest.raises(ValueError, match="has no dataset.json"):
        logic.startFinetune(tmp_path, tiny_model_file, "new-model")
    data = blob_folder(tmp_path / "data")
    with pytest.raises(ValueError, match="name must be letters"):
        logic.startFinetune(data, tiny_model_file, "my model.pt")
    fake = tmp_path / "fake.pt"
    fake.write_text("not a model")
    before = tree(tmp_path)
    with pytest.raises(RuntimeError, match=r"improving the model failed: --model: .*is not a usable vnetseg model"):
        logic.improveModel(data, fake, "new-model", FinetuneSettings(steps=2, device="cpu"), timeout=120)
    assert tree(tmp_path) == before and not logic.models.folder.exists()
