"""Evaluate predicted masks against reference labels: per-case CSV, summary table, box plot.

Two ways in::

    python -m training.evaluate --pred PRED_DIR --labels LABELS_DIR --out OUT
    python -m training.evaluate --model model_best.pt --data MSD_DIR [--fold 0 --splits splits.json] --out OUT

With ``--pred``, each reference ``<case>.nii.gz`` in ``--labels`` is matched with
``<case>.nii.gz`` or ``<case>_spleen.nii.gz`` (the name ``vnetseg predict`` gives) in ``--pred``.
With ``--model``, the cases of the MSD folder (or only the validation cases of ``--fold``) are
segmented with the core's ``predict_file`` into ``OUT/predictions`` first.

Writes ``OUT/metrics.csv`` (one row per case), ``OUT/summary.csv`` and ``OUT/boxplot.png``, and
prints the summary table.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

from vnetseg import io as vio
from vnetseg.checkpoint import ModelFileError, load_model
from vnetseg.inference import InferenceOptions, predict_file

from .data import CaseError, DatasetError, case_name, check_same_grid, fold_cases, is_junk, load_or_make_folds, read_msd
from .metrics import METRIC_NAMES, CaseMetrics, case_metrics, summarise


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")) and not is_junk(p))


def match_predictions(pred_dir: Path, labels_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case, prediction file, reference file) for every reference in ``labels_dir``.

    Raises:
        DatasetError: a folder is missing or empty; :class:`CaseError` when a case has no prediction.
    """
    for what, folder in (("--pred", pred_dir), ("--labels", labels_dir)):
        if not folder.is_dir():
            raise DatasetError(f"{what} folder {folder} does not exist")
    refs = _nifti_files(labels_dir)
    if not refs:
        raise DatasetError(f"--labels folder {labels_dir} holds no .nii/.nii.gz label files")
    out = []
    for ref in refs:
        name = case_name(ref)
        candidates = [pred_dir / ref.name, pred_dir / f"{name}_spleen.nii.gz", pred_dir / f"{name}.nii.gz"]
        pred = next((c for c in candidates if c.is_file()), None)
        if pred is None:
            raise CaseError(name, f"no prediction in {pred_dir} (looked for {ref.name} and {name}_spleen.nii.gz)")
        out.append((name, pred, ref))
    return out


def _read_mask(path: Path) -> vio.Image:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        return vio.Image(np.asarray(img.dataobj), np.asarray(img.affine, dtype=float))
    except Exception as exc:
        raise CaseError(case_name(path), f"{path} is not a readable NIfTI mask ({type(exc).__name__}: {exc})") from None


def evaluate_pairs(pairs: list[tuple[str, Path, Path]], label: int = 1, tolerance_mm: float = 2.0) -> list[CaseMetrics]:
    """Metrics of each (case, prediction, reference); ``label`` selects the structure in both."""
    rows = []
    for name, pred_path, ref_path in pairs:
        pred, ref = _read_mask(pred_path), _read_mask(ref_path)
        check_same_grid(name, ref, pred)
        rows.append(case_metrics(name, pred.array == label, ref.array == label, tuple(ref.spacing), tolerance_mm))
    return rows


def predict_cases(model_path: Path, data: Path, out: Path, fold: int | None, splits: Path | None,
                  device: str = "auto") -> list[tuple[str, Path, Path]]:
    """Segment the MSD cases (all, or the validation cases of ``fold``) into ``out/predictions``."""
    dataset = read_msd(data)
    names = dataset.case_names
    if fold is not None:
        if splits is None or not splits.is_file():
            raise DatasetError("--fold needs --splits FILE (the run's splits.json)")
        _, names = fold_cases(load_or_make_folds(splits, dataset.case_names, 2, 0, write=False), fold)
    net, info = load_model(model_path)
    pred_dir = out / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for name in names:
        case = dataset.case(name)
        dest = pred_dir / f"{name}.nii.gz"
        predict_file(case.image, dest, (net, info), InferenceOptions(device=device), overwrite=True)
        pairs.append((name, dest, case.label))
        print(f"predicted {name}", file=sys.stderr, flush=True)
    return pairs


def write_outputs(rows: list[CaseMetrics], out: Path) -> str:
    """Write metrics.csv, summary.csv and boxplot.png into ``out``; return the summary table text."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", *METRIC_NAMES])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.as_row().items()})
    summary = summarise(rows)
    stats = ["mean", "std", "median", "min", "max", "n_inf"]
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", *stats])
        for name, values in summary.items():
            writer.writerow([name, *(f"{values[s]:.6g}" for s in stats)])
    lines = [f"{'metric':<18}" + "".join(f"{s:>10}" for s in stats)]
    for name, values in summary.items():
        lines.append(f"{name:<18}" + "".join(f"{values[s]:>10.4g}" for s in stats))
    boxplot(rows, out / "boxplot.png")
    return f"{len(rows)} case(s)\n" + "\n".join(lines)


def boxplot(rows: list[CaseMetrics], path: Path) -> Path:
    """Box plots of Dice, surface Dice, HD95 and volume error (finite values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("dice", "Dice"), ("surface_dice", "surface Dice"), ("hd95_mm", "HD95 (mm)"),
              ("volume_error_pct", "volume error (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        values = [v for v in (getattr(r, key) for r in rows) if math.isfinite(v)]
        if values:
            ax.boxplot(values)
            ax.plot(np.ones(len(values)) + np.linspace(-0.08, 0.08, len(values)), values, "k.", alpha=0.5)
        ax.set_title(title)
        ax.set_xticks([])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate",
                                description="Dice, HD95, surface Dice and volume error per case.")
    p.add_argument("--pred", type=Path, help="folder of predicted masks (.nii.gz)")
    p.add_argument("--labels", type=Path, help="folder of reference label maps (.nii.gz), e.g. MSD labelsTr")
    p.add_argument("--model", type=Path, help="model file to segment the cases of --data with")
    p.add_argument("--data", type=Path, help="MSD task folder (with --model)")
    p.add_argument("--fold", type=int, help="with --model: only the validation cases of this fold (needs --splits)")
    p.add_argument("--splits", type=Path, help="the run's splits.json (with --fold)")
    p.add_argument("--out", type=Path, help="output folder for metrics.csv, summary.csv, boxplot.png "
                   "(default: PRED_eval next to --pred, or eval_DATA next to --model)")
    p.add_argument("--label", type=int, default=1, help="label value of the structure (default 1 = spleen)")
    p.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance in mm (default 2)")
    p.add_argument("--device", default="auto", help="device for --model inference (auto, cpu, cuda, mps)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.pred is None) == (args.model is None):
        parser.error("give either --pred DIR with --labels DIR, or --model FILE with --data DIR")
    if args.out is None:
        args.out = (args.pred.parent / f"{args.pred.name}_eval") if args.pred is not None else \
            args.model.parent / f"eval_{Path(args.data or 'data').name}"
    try:
        if args.model is not None:
            if args.data is None:
                parser.error("--model needs --data MSD_DIR")
            pairs = predict_cases(args.model, args.data, args.out, args.fold, args.splits, args.device)
        else:
            if args.labels is None:
                parser.error("--pred needs --labels DIR")
            pairs = match_predictions(args.pred, args.labels)
        rows = evaluate_pairs(pairs, args.label, args.tolerance)
        print(write_outputs(rows, args.out))
    except (DatasetError, ModelFileError, vio.ImageError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
