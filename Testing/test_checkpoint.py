"""Model files: round trip, checksums, tampering, foreign and newer formats, pickled code."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from vnetseg.checkpoint import (
    FORMAT_VERSION,
    ModelFileError,
    ModelInfo,
    Preprocessing,
    describe,
    file_sha256,
    load_model,
    read_model_info,
    save_model,
)
from vnetseg.model import VNet, VNetConfig

CFG = VNetConfig(widths=(4, 8, 16, 32, 64), kernel_size=3, norm="batch")


def _model(seed: int = 0) -> VNet:
    torch.manual_seed(seed)
    net = VNet(CFG)
    for m in net.modules():  # non-trivial running stats must survive too
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return net.eval()


def _info() -> ModelInfo:
    return ModelInfo(
        CFG,
        Preprocessing(target_spacing=(1.5, 1.5, 2.0), hu_window=(-57, 164), patch_size=(64, 64, 32)),
        card={"data": "synthetic", "fold": 0, "epochs": 3, "val_dice": {"case_1": 0.91}, "date": "2026-11-28"},
    )


def test_round_trip_rebuilds_the_same_model_from_the_file_alone(tmp_path: Path) -> None:
    net, info = _model(), _info()
    sha = save_model(tmp_path / "m.pt", net, info)
    assert sha == file_sha256(tmp_path / "m.pt")
    loaded, info2 = load_model(tmp_path / "m.pt", sha256=sha)
    assert info2.config == CFG
    assert info2.preprocessing == info.preprocessing
    assert info2.labels == info.labels and info2.labels[0].name == "Spleen" and info2.labels[0].color == (157, 108, 162)
    # a file without locator members is written at version 1, readable by every vnetseg
    assert info2.card == info.card and info2.format_version == 1 and info2.sha256 == sha
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    text = describe(info2)
    assert "widths=[4, 8, 16, 32, 64]" in text and "1.5 x 1.5 x 2" in text and "val_dice" in text


def test_half_precision_file_is_smaller_and_close(tmp_path: Path) -> None:
    net, info = _model(), _info()
    save_model(tmp_path / "f32.pt", net, info)
    save_model(tmp_path / "f16.pt", net, info, half=True)
    assert (tmp_path / "f16.pt").stat().st_size < 0.7 * (tmp_path / "f32.pt").stat().st_size
    loaded, info16 = load_model(tmp_path / "f16.pt")
    assert info16.weights_dtype == "float16"
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        a, b = torch.softmax(net(x), 1), torch.softmax(loaded(x), 1)
    assert (a - b).abs().max() < 1e-2


def test_wrong_sha256_is_refused(tmp_path: Path) -> None:
    save_model(tmp_path / "m.pt", _model(), _info())
    with pytest.raises(ModelFileError, match="SHA-256"):
        load_model(tmp_path / "m.pt", sha256="0" * 64)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    save_model(tmp_path / "m.pt", _model(), _info())
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or damaged"):
        load_model(tmp_path / "cut.pt")


def _rewrite_payload(src: Path, dest: Path, change) -> None:
    payload = torch.load(src, weights_only=True)
    change(payload)
    torch.save(payload, dest)


def test_tampered_weights_are_refused_without_a_file_checksum(tmp_path: Path) -> None:
    save_model(tmp_path / "m.pt", _model(), _info())

    def tamper(p: dict) -> None:
        key = next(k for k in p["state_dict"] if k.endswith("weight"))
        p["state_dict"][key] = p["state_dict"][key] + 1e-3

    _rewrite_payload(tmp_path / "m.pt", tmp_path / "t.pt", tamper)
    with pytest.raises(ModelFileError, match="modified or damaged"):
        load_model(tmp_path / "t.pt")


def test_newer_and_foreign_formats_are_refused(tmp_path: Path) -> None:
    save_model(tmp_path / "m.pt", _model(), _info())
    _rewrite_payload(tmp_path / "m.pt", tmp_path / "new.pt", lambda p: p.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match="newer than this vnetseg reads"):
        load_model(tmp_path / "new.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")  # a plain torch file, not ours
    with pytest.raises(ModelFileError, match="not a vnetseg model file"):
        load_model(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ModelFileError, match="not a PyTorch archive"):
        load_model(tmp_path / "text.pt")
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


class _Exploit:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "vnetseg-model", "format_version": 1, "metadata": _Exploit(marker)}, evil)
    with zipfile.ZipFile(evil) as z:  # really a torch archive carrying a code-running pickle
        assert any(name.endswith("data.pkl") for name in z.namelist())
    with pytest.raises(ModelFileError, match="other than plain data"):
        load_model(evil)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Exploit(marker)))  # the same object, unpickled normally, does run code
    assert marker.exists()


def test_inconsistent_save_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="differs from info.config"):
        save_model(tmp_path / "m.pt", VNet(VNetConfig(widths=(4, 8, 16, 32, 64))), _info())
    assert not (tmp_path / "m.pt").exists()


def test_read_info_without_building(tmp_path: Path) -> None:
    save_model(tmp_path / "m.pt", _model(), _info())
    info, state = read_model_info(tmp_path / "m.pt")
    assert info.card["fold"] == 0 and all(isinstance(v, torch.Tensor) for v in state.values())


def test_post_processing_calibration_travels_with_the_weights(tmp_path: Path) -> None:
    """A file may declare post-processing measured for its weights (the native-CT growth); one
    without it, like every file written before it existed, declares none."""
    from dataclasses import replace

    net = _model()
    save_model(tmp_path / "plain.pt", net, _info())
    assert load_model(tmp_path / "plain.pt")[1].postprocessing == {}
    save_model(tmp_path / "grow.pt", net, replace(_info(), postprocessing={"native_grow_probability": 0.3}))
    assert load_model(tmp_path / "grow.pt")[1].postprocessing == {"native_grow_probability": 0.3}
    assert '"postprocessing"' not in _info().to_json()  # older readers see exactly what they did


def _locator_info(spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)) -> ModelInfo:
    return ModelInfo(CFG, Preprocessing(target_spacing=spacing, patch_size=(64, 64, 48)), card={"role": "locator"})


def _nudge_a_weight(packed: dict) -> None:
    """Change one weight of a packed network in place (its recorded digest no longer matches)."""
    state = packed["state_dict"]
    key = next(k for k in state if k.endswith("weight"))
    state[key] = state[key] + 1e-3


def test_locator_members_round_trip_in_a_version_2_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bagging: the locator's members travel in the file, each verified, and make it version 2, which a
    version-1 reader refuses instead of running the first locator alone."""
    import vnetseg.checkpoint as ckpt

    net, info = _model(0), _info()
    locator, members = (_model(1), _locator_info()), [(_model(2), _locator_info()), (_model(3), _locator_info())]
    sha = save_model(tmp_path / "bag.pt", net, info, half=True, locator=locator, locator_members=members)
    _loaded, info2 = load_model(tmp_path / "bag.pt", sha256=sha)
    assert info2.format_version == 2 == FORMAT_VERSION and len(info2.locator_members) == 2
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        for (want, _), (got, got_info) in zip(members, info2.locator_members):
            assert got_info.preprocessing.target_spacing == (4.0, 4.0, 4.0)
            assert (torch.softmax(want(x), 1) - torch.softmax(got(x), 1)).abs().max() < 1e-2  # float16 in the file
    assert "with 2 more beside it (the whole-CT view is the mean of 3)" in describe(info2)
    # the same networks without members: version 1, as before
    save_model(tmp_path / "one.pt", net, info, locator=locator)
    assert load_model(tmp_path / "one.pt")[1].format_version == 1
    monkeypatch.setattr(ckpt, "FORMAT_VERSION", 1)  # a reader from before members
    with pytest.raises(ModelFileError, match="uses model format version 2, newer than this vnetseg reads"):
        load_model(tmp_path / "bag.pt")


def test_inconsistent_locator_members_are_refused(tmp_path: Path) -> None:
    net, info, locator = _model(0), _info(), (_model(1), _locator_info())
    with pytest.raises(ValueError, match="locator members go beside a locator"):
        save_model(tmp_path / "m.pt", net, info, locator_members=[(_model(2), _locator_info())])
    with pytest.raises(ValueError, match=r"works at \(6.0, 6.0, 6.0\) mm, the locator at \(4.0, 4.0, 4.0\) mm"):
        save_model(tmp_path / "m.pt", net, info, locator=locator, locator_members=[(_model(2), _locator_info((6.0, 6.0, 6.0)))])
    assert not (tmp_path / "m.pt").exists()  # nothing written
    save_model(tmp_path / "bag.pt", net, info, locator=locator, locator_members=[(_model(2), _locator_info())])

    _rewrite_payload(tmp_path / "bag.pt", tmp_path / "t.pt", lambda p: _nudge_a_weight(p["locator_members"][0]))
    with pytest.raises(ModelFileError, match="the locator member 1 weights do not match their recorded digest"):
        load_model(tmp_path / "t.pt")
    _rewrite_payload(tmp_path / "bag.pt", tmp_path / "v1.pt", lambda p: p.update(format_version=1))
    with pytest.raises(ModelFileError, match="lists locator members in a version 1 file"):
        load_model(tmp_path / "v1.pt")
    _rewrite_payload(tmp_path / "bag.pt", tmp_path / "alone.pt", lambda p: p.pop("locator"))
    with pytest.raises(ModelFileError, match="without a locator"):
        load_model(tmp_path / "alone.pt")


def test_the_locator_rule_travels_with_the_members_and_is_checked(tmp_path: Path) -> None:
    """"max" is written beside the members and read back; "mean" (bagging) is what a file without the entry
    means, so files written before the rule existed read as they did; an unknown rule, or a rule without
    members, is refused on save and on load."""
    net, info, locator, member = _model(0), _info(), (_model(1), _locator_info()), (_model(2), _locator_info())
    save_model(tmp_path / "max.pt", net, info, locator=locator, locator_members=[member], locator_rule="max")
    loaded = load_model(tmp_path / "max.pt")[1]
    assert loaded.locator_rule == "max" and loaded.format_version == 2
    assert "with 1 more beside it (the whole-CT view is the voxel-wise maximum of 2)" in describe(loaded)
    save_model(tmp_path / "mean.pt", net, info, locator=locator, locator_members=[member])
    assert load_model(tmp_path / "mean.pt")[1].locator_rule == "mean"
    assert "locator_rule" not in torch.load(tmp_path / "mean.pt", weights_only=True)
    with pytest.raises(ValueError, match="locator_rule 'median': expected one of mean, max"):
        save_model(tmp_path / "bad.pt", net, info, locator=locator, locator_members=[member], locator_rule="median")
    with pytest.raises(ValueError, match="combines a locator with its members: pass locator_members="):
        save_model(tmp_path / "bad.pt", net, info, locator=locator, locator_rule="max")
    assert not (tmp_path / "bad.pt").exists()
    _rewrite_payload(tmp_path / "max.pt", tmp_path / "odd.pt", lambda p: p.update(locator_rule="median"))
    with pytest.raises(ModelFileError, match="has locator rule 'median': expected one of mean, max"):
        load_model(tmp_path / "odd.pt")
    _rewrite_payload(tmp_path / "max.pt", tmp_path / "alone.pt", lambda p: p.pop("locator_members"))
    with pytest.raises(ModelFileError, match="has locator rule 'max' without locator members"):
        load_model(tmp_path / "alone.pt")


def test_a_locator_check_round_trips_in_a_version_2_file_and_is_checked(tmp_path: Path) -> None:
    """The locator check travels with its smallest mean probability, verified like the locator; a file with
    it is version 2, and an inconsistent one is refused with what to do."""
    net, info, locator, check = _model(0), _info(), (_model(1), _locator_info()), _model(2)
    sha = save_model(tmp_path / "check.pt", net, info, half=True, locator=locator, locator_check=(check, _locator_info(), 0.1))
    _loaded, info2 = load_model(tmp_path / "check.pt", sha256=sha)
    assert info2.format_version == 2 and info2.locator_check is not None and info2.locator_check_min == 0.1
    assert info2.locator_members == [] and info2.thin_locator is None
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert (torch.softmax(check(x), 1) - torch.softmax(info2.locator_check[0](x), 1)).abs().max() < 1e-2
    assert "checked by a second network (a located part needs its mean probability 0.1 or more)" in describe(info2)
    assert load_model(tmp_path / "check.pt")[1].locator_check is not None
    with pytest.raises(ValueError, match="a locator check goes beside a locator"):
        save_model(tmp_path / "bad.pt", net, info, locator_check=(check, _locator_info(), 0.1))
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"needs a smallest mean probability in \(0, 1\)"):
            save_model(tmp_path / "bad.pt", net, info, locator=locator, locator_check=(check, _locator_info(), bad))
    with pytest.raises(ValueError, match=r"works at \(6.0, 6.0, 6.0\) mm"):
        save_model(tmp_path / "bad.pt", net, info, locator=locator, locator_check=(check, _locator_info((6.0, 6.0, 6.0)), 0.1))
    assert not (tmp_path / "bad.pt").exists()
    _rewrite_payload(tmp_path / "check.pt", tmp_path / "t.pt", lambda p: _nudge_a_weight(p["locator_check"]))
    with pytest.raises(ModelFileError, match="the locator check weights do not match their recorded digest"):
        load_model(tmp_path / "t.pt")
    _rewrite_payload(tmp_path / "check.pt", tmp_path / "v1.pt", lambda p: p.update(format_version=1))
    with pytest.raises(ModelFileError, match="has a locator check in a version 1 file"):
        load_model(tmp_path / "v1.pt")
    _rewrite_payload(tmp_path / "check.pt", tmp_path / "nomin.pt", lambda p: p["locator_check"].pop("min_probability"))
    with pytest.raises(ModelFileError, match="without its smallest mean probability"):
        load_model(tmp_path / "nomin.pt")


def test_a_locator_checks_rival_classes_travel_with_it_and_must_be_its_classes(tmp_path: Path) -> None:
    from vnetseg.checkpoint import Label

    net, info, locator = _model(0), _info(), (_model(1), _locator_info())
    cfg3 = VNetConfig(widths=CFG.widths, out_channels=3)
    organ = ModelInfo(cfg3, _locator_info().preprocessing, (Label(1, "Spleen"), Label(2, "Kidney")))
    save_model(tmp_path / "r.pt", net, info, locator=locator, locator_check=(VNet(cfg3), organ, 0.0),
               locator_check_rivals=("Kidney",))
    loaded = load_model(tmp_path / "r.pt")[1]
    assert loaded.locator_check_rivals == ("Kidney",) and loaded.locator_check_min == 0.0
    assert "checked by a second network (a located part needs no larger mean of Kidney than of spleen)" in describe(loaded)
    for rivals, match in (((), "in \\[0, 1\\) with rivals"), (("Liver",), "rival 'Liver' is not one of its other classes"),
                          (("Spleen",), "rival 'Spleen' is not one of its other classes")):
        with pytest.raises(ValueError, match=match):
            save_model(tmp_path / "bad.pt", net, info, locator=locator, locator_check=(VNet(cfg3), organ, 0.0),
                       locator_check_rivals=rivals)
    with pytest.raises(ValueError, match="are classes of a locator check: pass locator_check="):
        save_model(tmp_path / "bad.pt", net, info, locator=locator, locator_check_rivals=("Kidney",))
    assert not (tmp_path / "bad.pt").exists()
    _rewrite_payload(tmp_path / "r.pt", tmp_path / "odd.pt", lambda p: p["locator_check"].update(rivals=["Heart"]))
    with pytest.raises(ModelFileError, match="the locator check: a locator check's rival 'Heart' is not one of"):
        load_model(tmp_path / "odd.pt")


def test_a_thin_ct_locator_round_trips_in_a_version_2_file_and_is_checked(tmp_path: Path) -> None:
    """The thin-CT locator travels with its head-foot limit, verified like the locator; a file with it is
    version 2, and an inconsistent one is refused with what to do."""
    net, info, locator, thin = _model(0), _info(), (_model(1), _locator_info()), _model(2)
    sha = save_model(tmp_path / "thin.pt", net, info, half=True, locator=locator, thin_locator=(thin, _locator_info(), 100.0))
    _loaded, info2 = load_model(tmp_path / "thin.pt", sha256=sha)
    assert info2.format_version == 2 and info2.thin_locator is not None and info2.thin_locator_max_mm == 100.0
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert (torch.softmax(thin(x), 1) - torch.softmax(info2.thin_locator[0](x), 1)).abs().max() < 1e-2
    assert "a thin-CT locator on CTs of at most 100 mm head to foot" in describe(info2)
    assert load_model(tmp_path / "thin.pt")[1].locator_members == []  # the thin locator is not a member
    with pytest.raises(ValueError, match="a thin-CT locator goes beside a locator"):
        save_model(tmp_path / "bad.pt", net, info, thin_locator=(thin, _locator_info(), 100.0))
    with pytest.raises(ValueError, match="needs a positive head-foot limit"):
        save_model(tmp_path / "bad.pt", net, info, locator=locator, thin_locator=(thin, _locator_info(), 0.0))
    with pytest.raises(ValueError, match=r"works at \(6.0, 6.0, 6.0\) mm"):
        save_model(tmp_path / "bad.pt", net, info, locator=locator, thin_locator=(thin, _locator_info((6.0, 6.0, 6.0)), 100.0))
    assert not (tmp_path / "bad.pt").exists()

    _rewrite_payload(tmp_path / "thin.pt", tmp_path / "t.pt", lambda p: _nudge_a_weight(p["thin_locator"]))
    with pytest.raises(ModelFileError, match="the thin-CT locator weights do not match their recorded digest"):
        load_model(tmp_path / "t.pt")
    _rewrite_payload(tmp_path / "thin.pt", tmp_path / "v1.pt", lambda p: p.update(format_version=1))
    with pytest.raises(ModelFileError, match="has a thin-CT locator in a version 1 file"):
        load_model(tmp_path / "v1.pt")
    _rewrite_payload(tmp_path / "thin.pt", tmp_path / "nomm.pt", lambda p: p["thin_locator"].pop("max_mm"))
    with pytest.raises(ModelFileError, match="without its head-foot limit"):
        load_model(tmp_path / "nomm.pt")
