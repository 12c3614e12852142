"""The ``vnetseg`` command: ``vnetseg predict`` for one or many CTs, ``vnetseg info`` for model files,
``vnetseg report merge`` to join the reports of a sharded batch.

Errors are one line on stderr (``vnetseg: error: ...``) and a non-zero exit status, never a
traceback; no partial output is left behind and no existing file is replaced without
``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import __version__

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
EXIT_ERROR = 2
EXIT_CANCELLED = 130


class CliError(Exception):
    """A user-facing error: printed as one line."""


# vnetseg.fast.MIN_LOCATED_ML, for --help without importing the core (a test keeps them equal)
DEFAULT_MIN_LOCATED_ML = 10.0


@dataclass
class PredictArgs:
    inputs: list[str]
    output: str | None = None
    output_dir: str | None = None
    model: str | None = None
    sha256: str | None = None
    device: str = "auto"
    overlap: float = 0.25
    batch_size: int | None = None
    postprocess: bool = True
    hu_trim: bool = True
    native_grow: bool = True
    appendages: bool = True
    min_located_ml: float | None = None  # None: the core's default (vnetseg.fast.MIN_LOCATED_ML)
    threshold: float = 0.5
    overwrite: bool = False
    report: str | None = None
    progress: str = "auto"
    format: str = "nii.gz"
    overlay_dir: str | None = None
    mode: str = "auto"
    series: str | None = None
    allow_gaps: bool = False
    skip_existing: bool = False
    shard: str | None = None
    probabilities: str | None = None  # issue 14: the probability map of a single input
    probability_dir: str | None = None  # ... or of every input, in this folder
    probability_type: str = "float32"


@dataclass
class CaseResult:
    input: str
    output: str | None = None
    volume_ml: float | None = None
    seconds: float | None = None
    device: str | None = None
    mode: str | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    spleen_found: bool | None = None  # False: "no spleen found in the field of view" (an empty mask, not an error)
    message: str | None = None  # that answer in one line
    status: str = "done"  # "done", "skipped" (its output was complete already) or "error"
    index: int | None = None  # position in the whole (unsharded) case list
    series: dict[str, Any] | None = None  # the DICOM series that was read
    confidence: dict[str, Any] | None = None  # vnetseg.confidence.Confidence of the mask (None: no mask)
    probability: str | None = None  # the probability map written, if any
    probability_covers: str | None = None  # "volume", "box" (fast: 0 outside), "body" (full: 0 outside the body's box), "nothing"


# -------------------------------------------------------------------------- progress
class Progress:
    """Progress output: a bar on a terminal, JSON lines for programs (Slicer), or nothing."""

    def __init__(self, mode: str, stream: TextIO, events: TextIO) -> None:
        if mode == "auto":
            mode = "bar" if stream.isatty() else "none"
        self.mode, self.stream, self.events = mode, stream, events
        self.prefix = ""

    def emit(self, event: str, **data: Any) -> None:
        if self.mode == "json":
            self.events.write(json.dumps({"event": event, **data}) + "\n")
            self.events.flush()

    def __call__(self, fraction: float, message: str) -> None:
        if self.mode == "json":
            self.emit("progress", fraction=round(float(fraction), 4), message=message, case=self.prefix)
        elif self.mode == "bar":
            filled = int(30 * fraction)
            self.stream.write(f"\r{self.prefix} [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} {message:<24}")
            if fraction >= 1.0:
                self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------- inputs
def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith("._")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files stay; a folder of image files gives its images; a folder with DICOM files is one series;
    a folder holding only folders (an archive: one DICOM folder per case) gives those folders."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise CliError(f"input {p} does not exist")
        if p.is_dir():
            images = sorted(f for f in p.iterdir() if is_image_file(f))
            if not images:
                images = _case_folders(p)
            found.extend(images if images else [p])  # no image files: treat as a DICOM series folder
        else:
            found.append(p)
    return found


def _case_folders(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` when it holds no files of its own (hidden and ``._*`` files aside), else []."""
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    if not entries or any(not e.is_dir() for e in entries):
        return []
    return sorted(entries)


def output_for(case: Path, args: PredictArgs, many: bool) -> Path:
    from .inference import output_name

    if args.output and not many:
        return Path(args.output)
    if not args.output_dir:
        raise CliError("several inputs need --output-dir DIR (or give one input with -o FILE)")
    return Path(args.output_dir) / output_name(case, FORMAT_SUFFIXES.get(args.format, "." + args.format))


FORMAT_SUFFIXES = {"dicom-seg": ".dcm"}


def preflight(case: Path, dest: Path, args: PredictArgs, res: CaseResult) -> None:
    """Check one case before any work: output writable (or complete already, with --skip-existing),
    its DICOM series chosen, DICOM SEG only for DICOM input. Sets ``res.status`` to "skipped"."""
    from . import io as vio
    from .batch import output_complete

    if args.skip_existing and dest.exists():
        complete, why = output_complete(dest)
        if complete:
            res.status, res.output = "skipped", str(dest)
            return
        raise CliError(f"{dest} exists but is not a complete mask ({why}); remove it or pass --overwrite")
    vio.check_writable(dest, args.overwrite)
    series = None
    if case.is_dir():
        from .dicom import select_series

        series = select_series(case, args.series, args.allow_gaps)
        res.series = series.as_dict()
    if vio.suffix_of(dest) in vio.DICOM_SEG_SUFFIXES:
        from .dicom_seg import check_references

        vio.check_source_for(dest, series)
        check_references(series)


def probability_for(case: Path, args: PredictArgs, many: bool) -> Path | None:
    """Where the probability map of ``case`` goes (None: not asked for)."""
    from .inference import output_name

    if args.probabilities:
        if many:
            raise CliError("several inputs need --probability-dir DIR for their probability maps (or give one input)")
        return Path(args.probabilities)
    if not args.probability_dir:
        return None
    if not Path(args.probability_dir).is_dir():
        raise CliError(f"probability folder {args.probability_dir} does not exist")
    suffix = ".nrrd" if args.format == "seg.nrrd" else "." + args.format
    return Path(args.probability_dir) / output_name(case, "_probability" + suffix)


def resolve_model(args: PredictArgs) -> tuple[str, str | None]:
    if args.model:
        return args.model, args.sha256
    from .registry import default_model

    entry = default_model()
    if entry is None:
        raise CliError("no model given and no default model is installed; pass --model MODEL.pt (see README)")
    return str(entry.path), entry.sha256


# ---------------------------------------------------------------------------- commands
def run_predict(args: PredictArgs, out: TextIO, err: TextIO) -> int:
    from . import io as vio
    from .batch import parse_shard, shard_of, summarize, write_report
    from .checkpoint import load_model
    from .inference import Cancelled, InferenceOptions, predict_file

    progress = Progress(args.progress, err, out)
    if args.skip_existing and args.overwrite:
        raise CliError("--skip-existing and --overwrite contradict each other; pass one")
    shard = parse_shard(args.shard) if args.shard else None
    all_cases = expand_inputs(args.inputs)
    indices = shard_of(len(all_cases), shard)
    cases = [all_cases[i] for i in indices]
    many = len(all_cases) > 1 or args.output_dir is not None
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    elif not args.output:
        raise CliError("give -o OUTPUT (or --output-dir DIR)")
    destinations = [output_for(c, args, many) for c in cases]
    planned = [CaseResult(str(c), index=i) for c, i in zip(cases, indices)]
    for case, dest, res in zip(cases, destinations, planned):  # output problems are reported before any work
        try:
            preflight(case, dest, args, res)
        except (vio.ImageError, ValueError, CliError) as exc:
            if not many:
                raise
            res.status, res.error = "error", str(exc)
    prob_paths = [probability_for(c, args, many) for c in cases]
    for prob in prob_paths:
        if prob is not None:
            vio.check_writable_volume(prob, args.overwrite)
    options = InferenceOptions(
        args.device, args.overlap, args.batch_size, args.postprocess, args.threshold, mode=args.mode,
        probability=args.probability_type if any(prob_paths) else None, hu_trim=args.hu_trim,
        native_grow=args.native_grow, appendages=args.appendages,
        **({} if args.min_located_ml is None else {"min_located_ml": args.min_located_ml}),
    )
    model_path, sha = resolve_model(args)
    net, info = load_model(model_path, sha256=sha)
    model_name = info.card.get("name", Path(model_path).name)
    progress.emit("model", path=model_path, name=model_name, sha256=info.sha256)
    results: list[CaseResult] = []

    def report() -> None:
        if args.report:  # rewritten after every case: an interrupted batch still leaves its report
            data = {"version": __version__, "model": model_path, "model_sha256": info.sha256, "total_cases": len(all_cases),
                    "shard": {"index": shard[0], "count": shard[1]} if shard else None,
                    "summary": summarize([r.__dict__ for r in results]), "cases": [r.__dict__ for r in results]}
            write_report(args.report, data)

    for case, dest, res, prob in zip(cases, destinations, planned, prob_paths):
        progress.prefix = case.name
        if res.status != "done":
            results.append(res)
            _say_not_run(res, case, progress, out, err)
            report()
            continue
        try:
            pred = predict_file(case, dest, (net, info), options, overwrite=args.overwrite, progress=progress,
                                read=vio.ReadOptions(args.series, args.allow_gaps), probability_path=prob)
        except Cancelled:
            raise
        except (vio.ImageError, ValueError, OSError, MemoryError) as exc:
            if not many:
                raise
            res.error, res.status = str(exc), "error"
            err.write(f"vnetseg: {case.name}: error: {exc}\n")
            results.append(res)
            report()
            continue
        res.output, res.volume_ml, res.seconds = str(dest), round(pred.volume_ml, 2), round(pred.seconds, 2)
        res.device, res.mode, res.warnings = pred.device, pred.mode, pred.report.warnings + pred.notes
        res.spleen_found, res.message = pred.report.found, pred.report.message or None
        res.confidence = pred.confidence.as_dict() if pred.confidence is not None else None
        if prob is not None:
            res.probability, res.probability_covers = str(prob), pred.probability_covers
        results.append(res)
        if args.overlay_dir:
            _write_overlay(case, pred, Path(args.overlay_dir), err, vio.ReadOptions(args.series, args.allow_gaps))
        if progress.mode == "json":
            progress.emit("done", **res.__dict__)
        elif not res.spleen_found:
            out.write(f"{case.name}: {res.message} (empty mask), {res.seconds:.1f} s on {res.device} ({res.mode}) -> {dest}\n")
            out.writelines(f"  warning: {w}\n" for w in pred.report.warnings)  # e.g. too thin a CT to be sure
            out.writelines(f"  note: {w}\n" for w in pred.notes)
        else:
            out.write(f"{case.name}: spleen {res.volume_ml:.1f} mL, {res.seconds:.1f} s on {res.device} ({res.mode}) -> {dest}\n")
            if res.series and (many or args.series):
                out.write(f"  series: {res.series['uid'] or '(no UID)'} \"{res.series['description']}\" ({res.series['slices']} slices)\n")
            if pred.confidence is not None:
                out.write(f"  confidence: {pred.confidence.summary()}\n")
            out.writelines(f"  warning: {w}\n" for w in res.warnings)
        if prob is not None and progress.mode != "json":
            out.write(f"  probability map -> {prob} ({pred.probability_note})\n")
        report()
    report()
    failed = [r for r in results if r.error]
    return EXIT_ERROR if failed else 0


def _say_not_run(res: CaseResult, case: Path, progress: Progress, out: TextIO, err: TextIO) -> None:
    if progress.mode == "json":
        progress.emit("skipped" if res.status == "skipped" else "error", **res.__dict__)
    elif res.status == "skipped":
        out.write(f"{case.name}: skipped, its output {res.output} is complete already (--skip-existing)\n")
    else:
        err.write(f"vnetseg: {case.name}: error: {res.error}\n")


def run_report_merge(reports: list[str], output: str, out: TextIO, err: TextIO) -> int:
    from .batch import merge_reports, write_report

    merged, warnings = merge_reports(reports)
    write_report(output, merged)
    s = merged["summary"]
    out.write(f"merged {len(reports)} report(s) into {output}: {len(merged['cases'])} cases "
              f"({s['done']} done, {s['skipped']} skipped, {s['error']} failed)\n")
    err.writelines(f"vnetseg: warning: {w}\n" for w in warnings)
    return 0


def _write_overlay(case: Path, pred: Any, folder: Path, err: TextIO, read: Any = None) -> None:
    try:
        from .overlay import save_overlay
    except ImportError as exc:
        err.write(f"vnetseg: warning: no overlay written ({exc})\n")
        return
    from .io import read_image

    folder.mkdir(parents=True, exist_ok=True)
    name = case.name.split(".")[0] + "_overlay.png"
    image = read_image(case, series=read.series, allow_gaps=read.allow_gaps) if read else read_image(case)
    save_overlay(image, pred.labelmap, folder / name, title=f"{case.name}: spleen {pred.volume_ml:.0f} mL")


def run_info(model: str, sha256: str | None, out: TextIO) -> int:
    from .checkpoint import describe, read_model_info

    info, _ = read_model_info(model, sha256)
    out.write(describe(info) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vnetseg", description="Spleen segmentation in abdominal CT with a V-Net.")
    parser.add_argument("--version", action="version", version=f"vnetseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment the spleen in one or more CT images")
    p.add_argument("inputs", nargs="+", help="CT image(s) (.nii.gz, .nii, .nrrd, .mha), DICOM series folder(s), or folder(s) of images")
    p.add_argument("-o", "--output", help="output mask for a single input (.nii.gz, .nii or .seg.nrrd)")
    p.add_argument("--output-dir", help="folder for the masks of several inputs (named <case>_spleen.<format>)")
    p.add_argument("--format", default="nii.gz", choices=["nii.gz", "nii", "seg.nrrd", "dicom-seg"],
                   help="mask format with --output-dir (default nii.gz; dicom-seg: a DICOM Segmentation <case>_spleen.dcm, DICOM inputs only)")
    p.add_argument("--model", help="model file (.pt); default: the model shipped with vnetseg")
    p.add_argument("--sha256", help="expected SHA-256 of the model file; refuse it if it differs")
    p.add_argument("--device", default="auto", help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap fraction in [0, 1) (default 0.25)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: chosen from free memory)")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground probability threshold (default 0.5)")
    p.add_argument(
        "--mode", default="auto", choices=["auto", "fast", "full"],
        help="fast: locate the spleen at low resolution, then segment its box at full resolution; full: whole volume "
        "at full resolution; auto (default): fast on CPU when the model supports it, else full",
    )
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                   help="keep the network's raw mask: all components, holes, no HU trim, no appendage cut")
    p.add_argument("--no-hu-trim", dest="hu_trim", action="store_false",
                   help="keep the network's boundary: do not remove mask voxels outside the spleen's own HU range "
                   "(median +- 4 robust SD of its core); a dark lesion at the spleen's surface stays in the mask; "
                   "also stops the native-CT growth and the check that answers 'no spleen' when the part found is "
                   "mostly bone or contrast-filled blood (over 10 %% of its core denser than 300 HU)")
    p.add_argument("--no-native-grow", dest="native_grow", action="store_false",
                   help="on native (unenhanced) CT, do not grow the mask into connected voxels of probability over 0.3 "
                   "in the spleen's HU range (the network under-segments the spleen of native CT)")
    p.add_argument("--no-appendage-cut", dest="appendages", action="store_false",
                   help="keep parts of the mask that lie more than 10 mm from the spleen's thick body (its interior "
                   "over 5 mm from its surface); by default such thin pieces, e.g. a kidney's rim joined to the spleen "
                   "through a thin bridge, are cut off")
    p.add_argument("--min-located-ml", type=float, default=None, metavar="ML",
                   help="the smallest part (mL) that the whole-CT view takes for a spleen in view (default "
                   f"{DEFAULT_MIN_LOCATED_ML:g}); 5 finds more spleens cut by a short scan range (a chest CT ending in the upper "
                   "abdomen) and more false ones: measured in the README ('The smallest located part')")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--report", help="write a JSON report of all cases to this file")
    p.add_argument("--overlay-dir", help="write a PNG overlay (axial/coronal/sagittal) per case to this folder (needs matplotlib)")
    p.add_argument("--probabilities", metavar="OUT", help="also write the spleen probability map of a single input to OUT "
                   "(.nii.gz, .nii or .nrrd) on the input's grid; in fast mode it is 0 outside the segmented box")
    p.add_argument("--probability-dir", metavar="DIR", help="write the probability map of every input to DIR "
                   "(<case>_spleen_probability.<format>, .nrrd for --format seg.nrrd)")
    p.add_argument("--probability-type", default="float32", choices=["float32", "uint8"],
                   help="probability map values: float32 0-1 (default) or uint8 0-255 (= probability x 255, a quarter the size)")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"], help="progress display (json: one event per line on stdout)")
    p.add_argument("--series", help="the DICOM series to read from a folder holding several: its number in the listing (1, 2, ...) or its Series Instance UID")
    p.add_argument("--allow-gaps", action="store_true", help="read a DICOM series with missing slices on its regular grid (missing slices interpolated, with a warning) instead of refusing it")
    p.add_argument("--skip-existing", action="store_true", help="resume a batch: skip cases whose output exists and is complete (listed as skipped in the report)")
    p.add_argument("--shard", metavar="K/N", help="run only cases K, K+N, K+2N, ... of the inputs (0 <= K < N), e.g. --shard $SLURM_ARRAY_TASK_ID/8")
    r = sub.add_parser("report", help="batch reports: 'report merge' joins the per-shard reports of a sharded batch")
    rsub = r.add_subparsers(dest="report_command", required=True)
    m = rsub.add_parser("merge", help="join per-shard JSON reports into one (cases in input order)")
    m.add_argument("reports", nargs="+", help="the per-shard report files")
    m.add_argument("-o", "--output", required=True, help="the merged report file (JSON)")
    i = sub.add_parser("info", help="print what a model file contains")
    i.add_argument("model", help="model file (.pt)")
    i.add_argument("--sha256", help="expected SHA-256 of the file")
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    ns = build_parser().parse_args(argv)
    json_mode = getattr(ns, "progress", "") == "json"
    started = time.perf_counter()
    try:
        if ns.command == "info":
            return run_info(ns.model, ns.sha256, out)
        if ns.command == "report":
            return run_report_merge(ns.reports, ns.output, out, err)
        fields = {k: v for k, v in vars(ns).items() if k in PredictArgs.__dataclass_fields__}
        return run_predict(PredictArgs(**fields), out, err)
    except KeyboardInterrupt:
        err.write("vnetseg: cancelled\n")
        return EXIT_CANCELLED
    except Exception as exc:  # every failure becomes one line, never a traceback
        from .inference import Cancelled

        if isinstance(exc, Cancelled):
            err.write("vnetseg: cancelled\n")
            return EXIT_CANCELLED
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, (CliError, ValueError, OSError, MemoryError, ImportError)):
            message = f"unexpected {type(exc).__name__}: {message}"
        if json_mode:
            out.write(json.dumps({"event": "error", "message": message, "seconds": round(time.perf_counter() - started, 2)}) + "\n")
        err.write(f"vnetseg: error: {message}\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
