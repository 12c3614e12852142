"""training.finetune: base model -> new model on corrected cases, with a guard against getting worse,
resume after a cancel, the same weights from the same seed, and one clear error per bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from training_helpers import blob_case, write_case, write_dataset

from training.finetune import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_WORSE,
    FinetuneCancelled,
    FinetuneOptions,
    finetune,
    main,
    split_cases,
)
from training.finetune_scores import Comparison
from training.metrics import CaseMetrics
from vnetseg.checkpoint import file_sha256, load_model, weights_digest
from vnetseg.io import read_image, write_nifti
from vnetseg.registry import default_model

AFFINE_3MM = np.diag([3.0, 3.0, 3.0, 1.0])


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blob_folder(root: Path, count: int = 2) -> Path:
    pairs = []
    for n in range(count):
        image, label = blob_case(shape=(32, 28, 20), centre=(14 + n, 13, 10), radius=5.0, seed=n)
        pairs.append(write_case(root, f"blob_{n}", image, label, AFFINE_3MM))
    write_dataset(root, pairs)
    return root


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_split_cases_holds_out_a_fifth_or_the_named_cases_or_none():
    names = [f"c{i}" for i in range(10)]
    train, val, on_train = split_cases(names, (), seed=0)
    assert len(val) == 2 and not set(val) & set(train) and sorted(train + val) == sorted(names) and not on_train
    assert split_cases(names, (), seed=0) == (train, val, on_train)
    assert split_cases(names, ("c3",), seed=0) == ([n for n in names if n != "c3"], ["c3"], False)
    assert split_cases(["a", "b"], (), seed=0) == (["a", "b"], ["a", "b"], True)


def test_worse_is_a_lower_mean_dice_or_at_equal_dice_a_larger_hd95():
    def rows(*scores):
        return [CaseMetrics(f"c{n}", dice, hd95, 0.0, 10.0, 10.0, 0.0, 0.0) for n, (dice, hd95) in enumerate(scores)]

    base = rows((0.8, 5.0), (0.6, 9.0))  # mean Dice 0.7
    assert Comparison(base, rows((0.9, 4.0), (0.48, 3.0)), False, "fast").worse  # 0.69 < 0.7, HD95 better
    assert not Comparison(base, rows((0.9, 4.0), (0.48, 3.0)), False, "fast", tolerance=0.02).worse
    assert not Comparison(base, rows((0.7, 30.0), (0.72, 30.0)), False, "fast").worse  # 0.71: better Dice
    assert Comparison(rows((0.0, 200.0)), rows((0.0, 210.0)), True, "full").worse  # same Dice, larger HD95
    table = Comparison(rows((0.0, 210.0)), rows((0.0, 200.0)), True, "full").table()
    assert "TRAINING cases" in table and "not worse than the base model (mean Dice 0.0000 vs 0.0000, mean HD95 " \
        "200.0 vs 210.0 mm)" in table


def test_same_seed_same_weights_resume_after_cancel_and_card(tiny_model_file, tmp_path):
    data = blob_folder(tmp_path / "data")
    base_sha = file_sha256(tiny_model_file)

    def run(out: Path, cancel=None):
        opts = FinetuneOptions(tiny_model_file, data, out, steps=6, patch_size=(32, 32, 16), checkpoint_every=2,
                               lr=1e-3, force=True, device="cpu", name="tiny fine-tuned", version="2.0")
        return finetune(opts, cancel=cancel)

    first = run(tmp_path / "a.pt")
    again = run(tmp_path / "b.pt")
    calls = []
    with pytest.raises(FinetuneCancelled, match="resume"):
        run(tmp_path / "c.pt", cancel=lambda: calls.append(1) or len(calls) > 3)  # stops before step 4
    assert not (tmp_path / "c.pt").exists()
    assert (tmp_path / "c_finetune" / "state_main.pth").is_file()
    resumed = run(tmp_path / "c.pt")
    assert resumed.resumed_at == 2  # the last state was written after step 2
    digests = [weights_digest(load_model(p)[0].state_dict()) for p in (first.out, again.out, resumed.out)]
    assert digests[0] == digests[1] == digests[2]
    assert digests[0] != weights_digest(load_model(tiny_model_file)[0].state_dict())  # it did train
    assert file_sha256(tiny_model_file) == base_sha  # the base is never modified

    card = load_model(first.out)[1].card
    assert card["base_model"] == {"name": "tiny random test model", "version": "", "sha256": base_sha,
                                  "file": tiny_model_file.name}
    assert card["name"] == "tiny fine-tuned" and card["version"] == "2.0" and card["trained"] is True
    assert card["data"]["train_cases"] == ["blob_0", "blob_1"] and card["fine_tune"]["steps"] == 6
    assert card["scores"]["on_training_cases"] is True and [r["case"] for r in card["scores"]["new"]] == \
        ["blob_0", "blob_1"]
    assert card["validation"]["dice_mean"] == pytest.approx(np.mean([r["dice"] for r in card["scores"]["new"]]))
    assert not (tmp_path / "a_finetune" / "state_main.pth").exists()  # state removed once the model is written
    log = (tmp_path / "a_finetune" / "log.csv").read_text().splitlines()
    assert log[0] == "phase,step,loss,lr" and len(log) == 7


def _spleen_case(ct_dir: Path) -> tuple:
    image = read_image(ct_dir / "example_ct_sm.nii.gz")
    multi = nib.load(str(ct_dir / "example_ct_sm_multilabel_v2.nii.gz"))
    return image, (np.asarray(multi.dataobj) == 1).astype(np.uint8)


def test_guard_refuses_a_worse_model_and_force_installs_it_without_training_again(ct_dir, tmp_path, capsys):
    image, spleen = _spleen_case(ct_dir)
    data = tmp_path / "data"
    wrong = np.zeros_like(spleen)  # built to make the guard fire: the spleen marked as background and
    wrong[60:100, 30:70, 5:25] = 1  # a box of liver and bowel on the patient's right marked as spleen
    wrong[spleen > 0] = 0
    pairs = [write_case(data, "right", image.array, spleen, image.affine),
             write_case(data, "wrong", image.array, wrong, image.affine)]
    write_dataset(data, pairs)
    out = tmp_path / "worse.pt"
    args = ["--model", str(default_model().path), "--data", str(data), "--out", str(out), "--val-case", "right",
            "--steps", "8", "--locator-steps", "0", "--lr", "3e-3", "--patch", "96", "96", "32", "--device", "cpu"]
    assert main(args) == EXIT_WORSE
    text = capsys.readouterr().out
    assert "WORSE than the base model" in text and "NOT written" in text and "1 held-out case(s)" in text
    assert not out.exists()
    scores = json.loads((tmp_path / "worse_finetune" / "scores.json").read_text())["last"]
    assert scores["worse"] and scores["cases"] == ["right"]
    assert scores["new_mean"]["dice"] < scores["base_mean"]["dice"]
    log_lines = len((tmp_path / "worse_finetune" / "log.csv").read_text().splitlines())

    assert main([*args, "--force"]) == EXIT_OK
    assert out.is_file() and "although it scores worse" in capsys.readouterr().out
    assert len((tmp_path / "worse_finetune" / "log.csv").read_text().splitlines()) == log_lines  # no new steps
    written = load_model(out)[1]
    assert written.card["installed_although_worse"] is True
    # the base's locator check (v2.4.0) travels with the fine-tuned model, unchanged
    base = load_model(default_model().path)[1]
    assert written.locator_check is not None and written.locator_check_rivals == base.locator_check_rivals == ("Kidney",)
    assert all(torch.equal(a, b) for a, b in zip(written.locator_check[0].state_dict().values(),
                                                 base.locator_check[0].state_dict().values()))


def _bad_input(kind: str, tmp_path: Path, model: Path) -> tuple[Path, Path, str]:
    """(data folder, base model, words the error must contain) for each kind of bad input."""
    data = tmp_path / "data"
    image, label = blob_case(shape=(32, 28, 20), centre=(14, 13, 10), radius=5.0)
    if kind == "no dataset.json":
        write_case(data, "blob", image, label, AFFINE_3MM)
        return data, model, "has no dataset.json"
    if kind == "mask off its image":
        shifted = AFFINE_3MM.copy()
        shifted[:3, 3] = [40.0, 0.0, 0.0]
        write_dataset(data, [write_case(data, "blob", image, label, AFFINE_3MM, label_affine=shifted)])
        return data, model, "grids differ by up to 40 mm"
    if kind == "not a model":
        write_dataset(data, [write_case(data, "blob", image, label, AFFINE_3MM)])
        fake = tmp_path / "notes.pt"
        fake.write_text("these are my notes, not a model")
        return data, fake, "is not a usable vnetseg model file"
    data.mkdir()
    write_dataset(data, [])
    return data, model, "lists no training cases"


@pytest.mark.parametrize("kind", ["no dataset.json", "mask off its image", "not a model", "no cases"])
def test_bad_input_gives_one_clear_error_and_writes_nothing(kind, tiny_model_file, tmp_path, capsys):
    data, model, words = _bad_input(kind, tmp_path, tiny_model_file)
    before = tree(tmp_path)
    out = tmp_path / "new.pt"
    assert main(["--model", str(model), "--data", str(data), "--out", str(out), "--steps", "2"]) == EXIT_ERROR
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune:")]
    assert len(err) == 1 and err[0].startswith("finetune: error: ") and words in err[0], err
    assert tree(tmp_path) == before  # no model, no work folder, nothing in the data folder


def test_base_model_is_never_the_output(tiny_model_file, tmp_path, capsys):
    data = blob_folder(tmp_path / "data")
    base = tmp_path / "base.pt"
    shutil.copyfile(tiny_model_file, base)
    sha = file_sha256(base)
    assert main(["--model", str(base), "--data", str(data), "--out", str(base), "--overwrite"]) == EXIT_ERROR
    assert "is the base model, which is never replaced" in capsys.readouterr().err
    assert file_sha256(base) == sha and not (tmp_path / "base_finetune").exists()


def test_a_changed_run_in_the_same_work_folder_is_refused(tiny_model_file, tmp_path):
    data = blob_folder(tmp_path / "data")
    opts = FinetuneOptions(tiny_model_file, data, tmp_path / "m.pt", steps=2, patch_size=(32, 32, 16), force=True,
                           device="cpu")
    finetune(opts)
    write_nifti(data / "labelsTr" / "blob_0.nii.gz", np.zeros((32, 28, 20), np.uint8), AFFINE_3MM, overwrite=True)
    changed = FinetuneOptions(tiny_model_file, data, tmp_path / "m.pt", steps=2, patch_size=(32, 32, 16),
                              overwrite=True, force=True, device="cpu")
    with pytest.raises(ValueError, match=r"other settings \(cases differ\); pass --restart"):
        finetune(changed)
    changed.restart_if_changed = True  # what the Slicer panel passes: a new export starts afresh
    result = finetune(changed)
    assert result.installed and result.resumed_at == 0
    settings = json.loads((tmp_path / "m_finetune" / "settings.json").read_text())
    assert settings["cases"]["blob_0"][1][0] == (data / "labelsTr" / "blob_0.nii.gz").stat().st_size  # the new label


def test_a_multi_organ_locator_is_fine_tuned_on_spleen_masks_without_unlearning_its_other_organs(tmp_path):
    """The user's masks name the spleen only: the locator's liver channel must not be trained away as background."""
    from vnetseg.checkpoint import Label, ModelInfo, Preprocessing, save_model
    from vnetseg.model import VNetConfig, build_model

    torch.manual_seed(0)
    cfg = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="instance")
    loc_cfg = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="batch", out_channels=3)
    locator = build_model(loc_cfg)
    with torch.no_grad():
        locator.head.weight.mul_(0.1)
        locator.head.bias.copy_(torch.tensor([0.0, -2.0, 1.0]))  # "liver" likelier than background everywhere
    info = ModelInfo(cfg, Preprocessing(target_spacing=(3.0, 3.0, 3.0), patch_size=(32, 32, 32)),
                     card={"name": "tiny model with a multi-organ locator", "trained": False})
    labels = (Label(1, "Spleen"), Label(2, "Liver"))
    loc_info = ModelInfo(loc_cfg, Preprocessing(target_spacing=(6.0, 6.0, 6.0), patch_size=(32, 32, 32)), labels)
    base = tmp_path / "base.pt"
    save_model(base, build_model(cfg), info, locator=(locator, loc_info))
    data = blob_folder(tmp_path / "data")
    opts = FinetuneOptions(base, data, tmp_path / "new.pt", steps=2, locator_steps=12, patch_size=(32, 32, 16),
                           checkpoint_every=4, lr=1e-2, force=True, device="cpu")
    finetune(opts)
    new_loc, new_info = load_model(tmp_path / "new.pt")[1].locator
    assert [lab.name for lab in new_info.labels] == ["Spleen", "Liver"]

    def liver_share(net) -> float:
        x = torch.full((1, 1, 16, 16, 16), 0.35)  # the blobs' background intensity (20 HU), no spleen
        with torch.no_grad():
            p = torch.softmax(net.eval()(x), 1)[0]
        return float((p[2] / (p[0] + p[2])).mean())

    before = liver_share(load_model(base)[1].locator[0])
    assert before > 0.6
    # spleen masks say "not spleen" there, not "background": the liver's share of it is not trained away
    # (trained with their zeros as background, the same run leaves it at 0.05)
    assert liver_share(new_loc) > 0.5
