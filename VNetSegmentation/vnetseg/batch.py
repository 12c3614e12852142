"""Archive-scale batches: sharding a case list, resuming (skip complete outputs), and batch reports.

A cluster job array (SLURM, torchrun, a plain loop over GPUs) runs ``vnetseg predict ... --shard K/N``
in every task with the same inputs: task K takes cases K, K+N, K+2N, ... of the same stable order,
so no coordinator is needed. Each task writes its own report; ``vnetseg report merge`` joins them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import io as vio

SEG_STORAGE_UID = "1.2.840.10008.5.1.4.1.1.66.4"


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 0 <= K < N (K counts from 0, like SLURM_ARRAY_TASK_ID with --array=0-(N-1)).

    Raises:
        ValueError: not two integers ``K/N`` with 0 <= K < N.
    """
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ValueError(f"--shard expects K/N (e.g. 0/4: the first of 4 shards), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard {text}: need N >= 1 and 0 <= K < N (K counts from 0), got K={k}, N={n}")
    return k, n


def shard_of(count: int, shard: tuple[int, int] | None) -> list[int]:
    """Indices (into the full, stably ordered case list of ``count`` cases) that ``shard`` runs."""
    if shard is None:
        return list(range(count))
    k, n = shard
    return list(range(k, count, n))


def output_complete(path: str | os.PathLike[str]) -> tuple[bool, str]:
    """Whether ``path`` is a complete mask file (it reads back in full); and why not.

    Outputs are written to a temporary file and renamed, so a file at the final name was finished;
    this still reads it, so that a damaged or foreign file is not mistaken for a result.
    """
    p = Path(path)
    if not p.is_file():
        return False, "missing"
    if vio.suffix_of(p) in vio.DICOM_SEG_SUFFIXES:
        try:
            import pydicom

            ds = pydicom.dcmread(str(p))
            ok = ds.get("SOPClassUID") == SEG_STORAGE_UID and "PixelData" in ds
            return ok, "" if ok else "not a DICOM Segmentation"
        except ImportError:
            return p.stat().st_size > 0, ""
        except Exception as exc:
            return False, f"unreadable ({type(exc).__name__})"
    try:
        vio.read_image(p, allow_uniform=True)
    except (vio.ImageError, OSError, ValueError) as exc:
        return False, str(exc)
    return True, ""


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Write ``report`` as JSON, atomically (a reader never sees half a report); replaces the old one."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2)
    return vio._write_atomically(dest, lambda tmp: Path(tmp).write_text(text), overwrite=True)


def merge_reports(paths: Sequence[str | os.PathLike[str]]) -> tuple[dict[str, Any], list[str]]:
    """Join per-shard reports into one report, cases in their original order; plus warnings.

    Raises:
        ValueError: unreadable reports, reports of different models or shard counts, or one case
            reported twice.
    """
    if not paths:
        raise ValueError("report merge needs at least one report file")
    reports = []
    for p in paths:
        try:
            reports.append((Path(p), json.loads(Path(p).read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"report {p} is not readable JSON ({exc})") from None
    first = reports[0][1]
    for p, r in reports[1:]:
        if r.get("model_sha256") != first.get("model_sha256"):
            raise ValueError(f"report {p} was made with another model ({r.get('model_sha256')}) than {reports[0][0]}; not merged")
        if (r.get("shard") or {}).get("count") != (first.get("shard") or {}).get("count"):
            raise ValueError(f"report {p} has another shard count than {reports[0][0]}; were they one job?")
    cases: dict[int, dict[str, Any]] = {}
    for p, r in reports:
        for case in r.get("cases", []):
            index = case.get("index")
            if index is None:
                raise ValueError(f"report {p} has a case without an index (made by an older vnetseg?); not merged")
            if index in cases and cases[index] != case:
                raise ValueError(f"case {index} ({case.get('input')}) is in two reports with different results; not merged")
            cases[index] = case
    warnings = []
    count = (first.get("shard") or {}).get("count") or 1
    seen = {(r.get("shard") or {}).get("index", 0) for _, r in reports}
    absent = sorted(set(range(count)) - seen)
    if absent:
        warnings.append(f"no report for shard(s) {', '.join(f'{k}/{count}' for k in absent)}: their cases are missing")
    total = first.get("total_cases")
    if total is not None and len(cases) < total:
        warnings.append(f"{total - len(cases)} of {total} cases have no result in these reports")
    ordered = [cases[i] for i in sorted(cases)]
    merged = {
        **{k: v for k, v in first.items() if k not in ("cases", "shard", "summary")},
        "merged_from": [str(p) for p, _ in reports],
        "summary": summarize(ordered),
        "cases": ordered,
    }
    return merged, warnings


def summarize(cases: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many cases were done, skipped (output already complete) and failed."""
    counts = {"done": 0, "skipped": 0, "error": 0}
    for case in cases:
        status = case.get("status") or ("error" if case.get("error") else "done")
        counts[status] = counts.get(status, 0) + 1
    return counts
