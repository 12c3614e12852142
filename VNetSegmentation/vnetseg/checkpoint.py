"""Self-describing model files.

A model file is a ``torch.save`` archive of plain data only (strings, numbers, tensors), so it is
read with ``torch.load(weights_only=True)``: loading never executes pickled code. It holds:

* ``format`` / ``format_version``: what the file is, so a newer or foreign file is refused;
* ``metadata``: a JSON string with the architecture config, preprocessing, labels and colours,
  and the model card (training provenance and metrics);
* ``weights_sha256``: a digest of every tensor's name, dtype, shape and bytes, checked on load,
  so a tampered or damaged file is refused even when the caller knows no file checksum;
* ``state_dict``: the weights (float32 or float16);
* optionally ``locator``: a small network that finds the organ in the whole CT (fast mode, and the
  anatomical decision of both modes), packed like the model (its own metadata, digest and weights);
* optionally ``locator_members`` (format version 2): more locators on the locator's grid, packed the
  same way; the whole-CT view is then the mean of all their organ probabilities (bagging), or with
  ``locator_rule`` "max" their voxel-wise maximum (a second locator that sees what the first misses);
* optionally ``locator_check`` (format version 2): a second network on the locator's grid, packed the
  same way with ``min_probability``; a part the locator finds is the organ only where the check's mean
  probability of the organ over it is at least that, and, with ``rivals`` (class names), no rival class
  has a larger mean there (a multi-organ network that takes it for a kidney says no);
* optionally ``thin_locator`` (format version 2): a locator trained on thin axial slabs, packed the same
  way with ``max_mm``; it replaces the locator (and its members) on a CT that reaches at most that
  many mm head to foot.

A file is written at the lowest format version that holds it: one without locator members or a
thin-CT locator is version 1, readable by every vnetseg; one with them is version 2, which older
readers refuse instead of silently running its first locator alone.

The caller may also pass the SHA-256 of the whole file (as published next to a download).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .model import VNet, VNetConfig

FORMAT_NAME = "vnetseg-model"
FORMAT_VERSION = 2
# the format version that introduced locator members
MEMBERS_VERSION = 2
# how the whole-CT view combines a locator with its members: their mean (bagging) or their maximum
LOCATOR_RULES = ("mean", "max")


class ModelFileError(ValueError):
    """A model file that cannot be used: missing, damaged, tampered, foreign or too new."""


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for the network.

    Attributes:
        target_spacing: voxel size in mm the network works at, (x, y, z) in RAS order.
        orientation: axis codes of the network's grid (always "RAS": the closest RAS axes).
        hu_window: HU values mapped to ``scale`` (values outside are clipped).
        scale: output range of the intensity window.
        patch_size: sliding-window size in voxels; each a multiple of the model's size multiple.
        coarse_spacing: voxel size in mm at which the model was also trained to find the organ,
            for the coarse pass of fast mode; None when the model does not support fast mode.
    """

    target_spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    orientation: str = "RAS"
    hu_window: tuple[float, float] = (-57.0, 164.0)
    scale: tuple[float, float] = (0.0, 1.0)
    patch_size: tuple[int, int, int] = (96, 96, 96)
    coarse_spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_spacing", tuple(float(s) for s in self.target_spacing))
        object.__setattr__(self, "hu_window", tuple(float(s) for s in self.hu_window))
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        object.__setattr__(self, "patch_size", tuple(int(s) for s in self.patch_size))
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ValueError(f"target_spacing must be 3 positive mm values, got {self.target_spacing}")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive integers, got {self.patch_size}")
        if self.coarse_spacing is not None:
            object.__setattr__(self, "coarse_spacing", tuple(float(c) for c in self.coarse_spacing))
            if len(self.coarse_spacing) != 3 or min(self.coarse_spacing) <= 0:
                raise ValueError(f"coarse_spacing must be 3 positive mm values or None, got {self.coarse_spacing}")
        if self.orientation != "RAS":
            raise ValueError(f"only orientation 'RAS' is supported, got {self.orientation!r}")


@dataclass(frozen=True)
class Label:
    """One class of the model's output."""

    value: int
    name: str
    color: tuple[int, int, int] = (128, 128, 128)
    terminology: str = ""


SPLEEN_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^123037004^Anatomical Structure~SCT^78961009^Spleen~^^~Anatomic codes - DICOM master list~^^~^^"
)
SPLEEN_LABELS: tuple[Label, ...] = (Label(1, "Spleen", (157, 108, 162), SPLEEN_TERMINOLOGY),)


@dataclass
class ModelInfo:
    """Everything in a model file except the weights."""

    config: VNetConfig
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    labels: tuple[Label, ...] = SPLEEN_LABELS
    card: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # post-processing calibrated for these weights, e.g. {"native_grow_probability": 0.3}
    # (:func:`vnetseg.postprocess.grow_native`); files without it (older ones too) get none
    postprocessing: dict[str, float] = field(default_factory=dict)
    sha256: str = ""  # of the file it was read from, when read from a file
    weights_dtype: str = "float32"
    # a small network carried in the same file that finds the organ at low resolution (fast mode);
    # filled by load_model, never serialised as part of this metadata
    locator: tuple[VNet, ModelInfo] | None = field(default=None, repr=False, compare=False)
    # more locators like ``locator`` (on its grid, trained on other patients or with other seeds): the
    # whole-CT view is the mean of all their organ probabilities. Read from a version-2 file by
    # load_model (``save_model(locator_members=...)``), or attached in memory by an experiment
    locator_members: list[tuple[VNet, ModelInfo]] = field(default_factory=list, repr=False, compare=False)
    # how the locator and its members are combined (LOCATOR_RULES): "mean", or "max", the voxel-wise
    # maximum of their organ probabilities; written to the file only with members and only when "max"
    locator_rule: str = field(default="mean", compare=False)
    # a locator for thin CTs (format version 2): trained on axial slabs only, it replaces ``locator``
    # (and its members) on a CT whose field of view reaches at most ``thin_locator_max_mm`` head to foot
    thin_locator: tuple[VNet, ModelInfo] | None = field(default=None, repr=False, compare=False)
    thin_locator_max_mm: float = 0.0
    # the locator check (format version 2): a second network on the locator's grid (a multi-organ locator);
    # a located part counts only where its mean probability of the organ is at least locator_check_min
    locator_check: tuple[VNet, ModelInfo] | None = field(default=None, repr=False, compare=False)
    locator_check_min: float = 0.0
    # classes of the check that the organ is not: a part where one of them has a larger mean than the organ is
    # not confirmed ("Kidney": the part a multi-organ check takes for a kidney is not the spleen)
    locator_check_rivals: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "config": self.config.to_dict(),
                "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.preprocessing).items()},
                "labels": [{**asdict(lab), "color": list(lab.color)} for lab in self.labels],
                "card": self.card,
                **({"postprocessing": self.postprocessing} if self.postprocessing else {}),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        data = json.loads(text)
        labels = tuple(
            Label(int(d["value"]), str(d["name"]), tuple(int(c) for c in d["color"]), str(d.get("terminology", "")))  # type: ignore[arg-type]
            for d in data["labels"]
        )
        return cls(
            config=VNetConfig.from_dict(data["config"]),
            preprocessing=Preprocessing(**data["preprocessing"]),
            labels=labels,
            card=dict(data.get("card", {})),
            postprocessing={str(k): float(v) for k, v in dict(data.get("postprocessing", {})).items()},
        )

    @property
    def label_values(self) -> tuple[int, ...]:
        return tuple(lab.value for lab in self.labels)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of all tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pack(model: VNet, info: ModelInfo, half: bool) -> dict[str, Any]:
    if model.config != info.config:
        raise ValueError("model.config differs from info.config; pass the model's own config")
    if len(info.labels) + 1 != info.config.out_channels:
        raise ValueError(
            f"{len(info.labels)} foreground label(s) need out_channels={len(info.labels) + 1}, "
            f"the model has {info.config.out_channels}"
        )
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().clone()
        state[k] = v.half() if half and v.is_floating_point() else v
    return {"metadata": info.to_json(), "weights_sha256": weights_digest(state), "state_dict": state}


def save_model(
    path: str | os.PathLike[str],
    model: VNet,
    info: ModelInfo,
    *,
    half: bool = False,
    locator: tuple[VNet, ModelInfo] | None = None,
    locator_members: list[tuple[VNet, ModelInfo]] | None = None,
    thin_locator: tuple[VNet, ModelInfo, float] | None = None,
    locator_rule: str = "mean",
    locator_check: tuple[VNet, ModelInfo, float] | None = None,
    locator_check_rivals: tuple[str, ...] = (),
) -> str:
    """Write ``model`` and ``info`` to ``path`` atomically and return the file's SHA-256.

    Args:
        path: destination file (conventionally ``*.pt``).
        model: the network; its config must equal ``info.config``.
        info: preprocessing, labels and card.
        half: store floating-point weights as float16 (half the size).
        locator: optional (network, info) that finds the organ at a coarse spacing (its
            ``info.preprocessing.target_spacing``) for fast mode; stored in the same file.
        locator_members: more locators beside ``locator`` (each on its spacing and naming the model's
            organ); the whole-CT view becomes the mean of all of them. A file with members is format
            version 2, one without is version 1.
        locator_rule: "mean" (the default) or "max": the whole-CT view is the voxel-wise maximum of the
            locator's and its members' probabilities instead of their mean (needs members).
        locator_check: (network, info, min_probability): a network on ``locator``'s grid naming the
            model's organ; a located part counts only where its mean probability of the organ over the
            part is at least ``min_probability`` (in [0, 1); 0 needs rivals); version 2 as well.
        locator_check_rivals: class names of the check (not the organ) that must not have a larger mean
            probability over a located part than the organ.
        thin_locator: (network, info, max_mm): a locator on ``locator``'s grid that replaces it on CTs
            reaching at most ``max_mm`` (> 0) head to foot; version 2 as well.

    Raises:
        ValueError: inconsistent parts (a config or labels that do not match, members without a
            locator, a member on another grid or without the model's organ).
    """
    members = list(locator_members or [])
    if locator_rule not in LOCATOR_RULES:
        raise ValueError(f"locator_rule {locator_rule!r}: expected one of {', '.join(LOCATOR_RULES)}")
    if locator_rule != "mean" and not members:
        raise ValueError(f"locator_rule {locator_rule!r} combines a locator with its members: pass locator_members= as well")
    if members:
        if locator is None:
            raise ValueError("locator members go beside a locator: pass locator= as well")
        for _net, m_info in members:
            check_member(m_info, locator[1], info)
    if thin_locator is not None:
        if locator is None:
            raise ValueError("a thin-CT locator goes beside a locator: pass locator= as well")
        check_member(thin_locator[1], locator[1], info)
        if not float(thin_locator[2]) > 0:
            raise ValueError(f"a thin-CT locator needs a positive head-foot limit in mm, got {thin_locator[2]!r}")
    if locator_check is not None:
        if locator is None:
            raise ValueError("a locator check goes beside a locator: pass locator= as well")
        check_member(locator_check[1], locator[1], info)
        _check_rule(float(locator_check[2]), tuple(locator_check_rivals), locator_check[1], info)
    elif locator_check_rivals:
        raise ValueError("locator_check_rivals are classes of a locator check: pass locator_check= as well")
    version = MEMBERS_VERSION if members or thin_locator is not None or locator_check is not None else 1
    payload = {"format": FORMAT_NAME, "format_version": version, **_pack(model, info, half)}
    if locator is not None:
        payload["locator"] = _pack(locator[0], locator[1], half)
    if members:
        payload["locator_members"] = [_pack(m_net, m_info, half) for m_net, m_info in members]
        if locator_rule != "mean":
            payload["locator_rule"] = locator_rule
    if locator_check is not None:
        payload["locator_check"] = {**_pack(locator_check[0], locator_check[1], half),
                                    "min_probability": float(locator_check[2]), "rivals": list(locator_check_rivals)}
    if thin_locator is not None:
        payload["thin_locator"] = {**_pack(thin_locator[0], thin_locator[1], half), "max_mm": float(thin_locator[2])}
    dest = Path(path)
    save_atomically(payload, dest)
    return file_sha256(dest)


def _check_rule(least: float, rivals: tuple[str, ...], check: ModelInfo, info: ModelInfo) -> None:
    """Refuse a locator check's rule that cannot work: a floor outside [0, 1), no rule at all, or a rival
    that is not one of the check's classes (or is the organ itself)."""
    if not 0.0 <= least < 1.0 or not (least > 0.0 or rivals):
        raise ValueError(f"a locator check needs a smallest mean probability in (0, 1), or in [0, 1) with rivals; "
                         f"got {least!r} with rivals {list(rivals)}")
    names = [lab.name.lower() for lab in check.labels]
    organ = info.labels[0].name.lower()
    for rival in rivals:
        if rival.lower() not in names or rival.lower() == organ:
            raise ValueError(f"a locator check's rival {rival!r} is not one of its other classes {names}")


def check_member(member: ModelInfo, locator: ModelInfo, info: ModelInfo) -> None:
    """Refuse a locator member that cannot be averaged with ``locator`` for the model ``info``.

    Raises:
        ValueError: the member works on another grid (spacing) than the locator, or has no class
            for the model's organ.
    """
    if tuple(member.preprocessing.target_spacing) != tuple(locator.preprocessing.target_spacing):
        raise ValueError(
            f"a locator member works at {member.preprocessing.target_spacing} mm, the locator at "
            f"{locator.preprocessing.target_spacing} mm: the members of a whole-CT view must share its grid"
        )
    organ = info.labels[0].name.lower()
    if len(member.labels) > 1 and organ not in [lab.name.lower() for lab in member.labels]:
        raise ValueError(f"a locator member's classes {[lab.name for lab in member.labels]} do not include '{organ}'")


def save_atomically(payload: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename: never a half-written file."""
    dest = Path(path)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _read_payload(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError ...
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        if not is_zip:
            kind = "is not a PyTorch archive at all"
        elif "Unpickl" in type(exc).__name__:
            kind = "contains objects other than plain data"
        else:
            kind = "is truncated or damaged"
        raise ModelFileError(
            f"{path} is not a usable vnetseg model file: it {kind} ({type(exc).__name__}); "
            f"code in model files is never run. Use a model file made by vnetseg's training"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is not a vnetseg model file (no '{FORMAT_NAME}' format marker)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{path} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} uses model format version {version}, newer than this vnetseg reads ({FORMAT_VERSION}); "
            f"update vnetseg"
        )
    return payload


def _unpack(entry: Any, p: Path, what: str) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    state = entry.get("state_dict") if isinstance(entry, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{p} holds no {what} weights")
    if weights_digest(state) != entry.get("weights_sha256"):
        raise ModelFileError(f"{p}: the {what} weights do not match their recorded digest; the file was modified or damaged")
    try:
        info = ModelInfo.from_json(str(entry["metadata"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelFileError(f"{p} has unreadable {what} metadata: {exc}") from None
    info.weights_dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
    return info, state


def read_model_info(path: str | os.PathLike[str], sha256: str | None = None) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    """Read and verify a model file; return its info and state dict (not yet in a network).

    A locator carried in the file is verified too and built into ``info.locator``, and its members
    (format version 2) into ``info.locator_members``.

    Raises:
        ModelFileError: missing, truncated, tampered, wrong-format or newer-format file, or
            file SHA-256 different from ``sha256``.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file {p} does not exist")
    actual = file_sha256(p)
    if sha256 is not None and actual.lower() != sha256.strip().lower():
        raise ModelFileError(
            f"{p} has SHA-256 {actual}, expected {sha256.strip()}: the file is damaged or not the expected model; "
            f"download or copy it again"
        )
    payload = _read_payload(p)
    info, state = _unpack(payload, p, "model")
    if payload.get("locator") is not None:
        loc_info, loc_state = _unpack(payload["locator"], p, "locator")
        info.locator = (_build(loc_info, loc_state, p), loc_info)
    members = payload.get("locator_members")
    if members is not None:
        if payload["format_version"] < MEMBERS_VERSION or info.locator is None or not isinstance(members, list) or not members:
            raise ModelFileError(
                f"{p} lists locator members in a version {payload['format_version']} file"
                f"{'' if info.locator is not None else ' without a locator'}; the file is inconsistent: re-export it"
            )
        for i, entry in enumerate(members, 1):
            m_info, m_state = _unpack(entry, p, f"locator member {i}")
            try:
                check_member(m_info, info.locator[1], info)
            except ValueError as exc:
                raise ModelFileError(f"{p}: {exc}") from None
            info.locator_members.append((_build(m_info, m_state, p), m_info))
    rule = payload.get("locator_rule")
    if rule is not None:
        if rule not in LOCATOR_RULES or not info.locator_members:
            raise ModelFileError(
                f"{p} has locator rule {rule!r}"
                f"{'' if info.locator_members else ' without locator members'}: expected one of "
                f"{', '.join(LOCATOR_RULES)} beside members; the file is inconsistent: re-export it"
            )
        info.locator_rule = rule
    thin = payload.get("thin_locator")
    if thin is not None:
        max_mm = thin.get("max_mm") if isinstance(thin, dict) else None
        if payload["format_version"] < MEMBERS_VERSION or info.locator is None or not isinstance(max_mm, float) or not max_mm > 0:
            raise ModelFileError(
                f"{p} has a thin-CT locator in a version {payload['format_version']} file, without a locator or "
                f"without its head-foot limit; the file is inconsistent: re-export it"
            )
        info.thin_locator, info.thin_locator_max_mm = _read_beside(thin, p, "thin-CT locator", info), max_mm
    check = payload.get("locator_check")
    if check is not None:
        least = check.get("min_probability") if isinstance(check, dict) else None
        rivals = check.get("rivals", []) if isinstance(check, dict) else None
        if (payload["format_version"] < MEMBERS_VERSION or info.locator is None or not isinstance(least, float)
                or not isinstance(rivals, list)):
            raise ModelFileError(
                f"{p} has a locator check in a version {payload['format_version']} file, without a locator or "
                f"without its smallest mean probability; the file is inconsistent: re-export it"
            )
        info.locator_check = _read_beside(check, p, "locator check", info,
                                          lambda c_info: _check_rule(least, tuple(rivals), c_info, info))
        info.locator_check_min = least
        info.locator_check_rivals = tuple(rivals)
    info.format_version = int(payload["format_version"])
    info.sha256 = actual
    return info, state


def _read_beside(entry: dict, path: Path, what: str, info: ModelInfo, also=None) -> tuple[VNet, ModelInfo]:
    """A network packed beside the locator (thin-CT locator, locator check): verified, on the locator's grid
    and naming the model's organ (``also``: one more check of its info), built."""
    e_info, e_state = _unpack(entry, path, what)
    try:
        check_member(e_info, info.locator[1], info)  # type: ignore[index]
        if also is not None:
            also(e_info)
    except ValueError as exc:
        raise ModelFileError(f"{path}: the {what}: {exc}") from None
    return _build(e_info, e_state, path), e_info


def _build(info: ModelInfo, state: dict[str, torch.Tensor], path: Path) -> VNet:
    model = VNet(info.config)
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: the weights do not fit the recorded architecture ({str(exc)[:200]})") from None
    return model.eval()


def load_model(
    path: str | os.PathLike[str], sha256: str | None = None, device: str | torch.device = "cpu"
) -> tuple[VNet, ModelInfo]:
    """Rebuild the network (and its locator, if any) from the file alone, in eval mode, float32."""
    info, state = read_model_info(path, sha256)
    if info.locator is not None:
        info.locator[0].to(device)
    for m_net, _m_info in info.locator_members:
        m_net.to(device)
    if info.thin_locator is not None:
        info.thin_locator[0].to(device)
    if info.locator_check is not None:
        info.locator_check[0].to(device)
    return _build(info, state, Path(path)).to(device), info


def _fast_mode_text(info: ModelInfo) -> str:
    if info.locator is not None:
        loc = info.locator[1]
        spacing = " x ".join(f"{s:g}" for s in loc.preprocessing.target_spacing)
        text = f"locator V-Net widths={list(loc.config.widths)} at {spacing} mm"
        if len(loc.labels) > 1:  # multi-organ: its other classes say what the organ is not
            text += f" (classes {', '.join(lab.name for lab in loc.labels)}; the decision reads {info.labels[0].name})"
        if info.locator_members:
            how = "the voxel-wise maximum" if info.locator_rule == "max" else "the mean"
            text += f", with {len(info.locator_members)} more beside it (the whole-CT view is {how} of {len(info.locator_members) + 1})"
        if info.locator_check is not None:
            needs = [f"its mean probability {info.locator_check_min:g} or more"] if info.locator_check_min > 0 else []
            if info.locator_check_rivals:
                needs.append(f"no larger mean of {', '.join(info.locator_check_rivals)} than of {info.labels[0].name.lower()}")
            text += f"; checked by a second network (a located part needs {' and '.join(needs)})"
        if info.thin_locator is not None:
            text += f"; a thin-CT locator on CTs of at most {info.thin_locator_max_mm:g} mm head to foot"
        return text
    if info.preprocessing.coarse_spacing:
        return f"coarse pass at {' x '.join(f'{s:g}' for s in info.preprocessing.coarse_spacing)} mm"
    return "not supported (full pass only)"


def describe(info: ModelInfo) -> str:
    """A human-readable summary of a model file (for ``vnetseg info``)."""
    cfg, pre = info.config, info.preprocessing
    lines = [
        f"format version : {info.format_version}",
        f"sha256         : {info.sha256}",
        (
            f"architecture   : V-Net widths={list(cfg.widths)} kernel={cfg.kernel_size} norm={cfg.norm} "
            f"skip={cfg.skip} dropout={cfg.dropout} classes={cfg.out_channels}"
        ),
        f"weights        : {info.weights_dtype}",
        f"spacing (mm)   : {' x '.join(f'{s:g}' for s in pre.target_spacing)} ({pre.orientation})",
        f"HU window      : {pre.hu_window[0]:g} .. {pre.hu_window[1]:g} -> {pre.scale[0]:g} .. {pre.scale[1]:g}",
        f"patch (voxels) : {' x '.join(str(s) for s in pre.patch_size)}",
        f"fast mode      : {_fast_mode_text(info)}",
        "labels         : " + ", ".join(f"{lab.value}={lab.name} rgb{lab.color}" for lab in info.labels),
    ]
    for key, value in info.card.items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        lines.append(f"{key:<15}: {text}")
    return "\n".join(lines)
