"""XA DICOM for the angiography task: write synthetic runs, read a hospital's PACS export.

A site points the task at a folder of X-ray angiography files. Labels come from the C-arm
angles stored with every run (PositionerPrimaryAngle, LAO > 0; PositionerSecondaryAngle,
cranial > 0), but angles alone cannot tell a left from a right coronary injection, so the
artery comes from an optional labels CSV (``file`` plus ``artery`` and/or ``view``) or from
SeriesDescription / ProtocolName words such as "LCA", "RCA", "left", "right". Files that
cannot be used (not DICOM, truncated, not XA, no pixel data, no angles, no label, a rotational
run) are skipped and reported with a one-line reason, never silently dropped.

Where the angles are looked for, first found wins: the top level (XA), then the shared
functional groups, then the per-frame functional groups (Enhanced XA, PositionerPosition
Sequence of each frame).

Files are opened (legacy files without the 128-byte preamble and "DICM" prefix included) and
their pixels decoded by :mod:`federation.tasks.dicom_files`, which the generic ``dicom``
source (:mod:`federation.tasks.dicom`) shares.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    EnhancedXAImageStorage,
    XRayAngiographicImageStorage,
    generate_uid,
)

from federation.atomic import atomic_write
from federation.tasks.angio.render import AngioSet, generate, normalize_image
from federation.tasks.angio.views import ARTERIES, VIEW_BOXES, VIEW_CLASSES, view_class
from federation.tasks.dicom_files import (
    FRAME_CHOICES,
    grayscale_dataset,
    open_dicom,
    read_pixels,
    select_frame,
)

XA_SOP_CLASSES = (XRayAngiographicImageStorage, EnhancedXAImageStorage)
_BITS = 12  # stored bits of written images (typical of XA detectors)
_TEXT_TAGS = ("SeriesDescription", "ProtocolName")
_ANGLES = ("PositionerPrimaryAngle", "PositionerSecondaryAngle")
_FRAME_ANGLE_TOLERANCE = 1.0  # degrees per-frame angles may drift and still be one view
_ARTERY_WORDS = (  # (left, right) words, strongest first
    (frozenset({"lca"}), frozenset({"rca"})),
    (frozenset({"left"}), frozenset({"right"})),
)


def write_xa(
    path: str | Path,
    pixels: np.ndarray,
    *,
    primary: float | None,
    secondary: float | None,
    sid: float = 1000.0,
    sod: float = 750.0,
    pixel_spacing: float = 0.3,
    patient_id: str = "ANON",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_description: str = "",
    protocol_name: str = "",
    station_name: str = "",
    model_name: str = "",
    instance_number: int = 1,
) -> Path:
    """Write one X-Ray Angiographic Image (single- or multi-frame) atomically.

    ``pixels`` is ``[H, W]`` or ``[frames, H, W]``: floats in [0, 1] are stored as 12-bit
    values, integer arrays as they are (uint16). ``primary``/``secondary`` of None leave the
    positioner angles out (a run the reader must reject). The file appears complete or not
    at all: it is written to a temporary file in the same folder and moved into place.
    """
    path = Path(path)
    frames = np.asarray(pixels)
    if frames.ndim not in (2, 3):
        raise ValueError(f"pixels must be [H, W] or [frames, H, W], got shape {frames.shape}")
    if np.issubdtype(frames.dtype, np.floating):
        stored = np.rint(np.clip(frames, 0.0, 1.0) * (2**_BITS - 1)).astype(np.uint16)
    else:
        stored = frames.astype(np.uint16)
    study_uid = study_uid or generate_uid(entropy_srcs=[patient_id, "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[study_uid, str(instance_number)])
    sop_uid = generate_uid(entropy_srcs=[series_uid, str(instance_number), "image"])

    ds = grayscale_dataset(
        stored,
        sop_class=XRayAngiographicImageStorage,
        sop_uid=sop_uid,
        modality="XA",
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        bits_stored=_BITS if np.issubdtype(frames.dtype, np.floating) else 16,
    )
    ds.PatientName = patient_id
    ds.StudyID = "1"
    ds.SeriesNumber = instance_number
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = series_description
    ds.ProtocolName = protocol_name
    ds.Manufacturer = "more-fl"
    ds.ManufacturerModelName = model_name
    ds.StationName = station_name
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.PositionerMotion = "STATIC"
    if primary is not None and secondary is not None:
        ds.PositionerPrimaryAngle = f"{primary:.2f}"
        ds.PositionerSecondaryAngle = f"{secondary:.2f}"
    ds.DistanceSourceToDetector = f"{sid:.1f}"
    ds.DistanceSourceToPatient = f"{sod:.1f}"
    ds.ImagerPixelSpacing = [f"{pixel_spacing:.6g}", f"{pixel_spacing:.6g}"]
    iso = pixel_spacing * sod / sid  # spacing at the isocentre (magnification removed)
    ds.PixelSpacing = [f"{iso:.6g}", f"{iso:.6g}"]
    if stored.ndim == 3:
        ds.FrameTime = "66.7"
        ds.FrameIncrementPointer = Tag("FrameTime")

    return atomic_write(path, lambda fh: ds.save_as(fh, enforce_file_format=True))


def export_synthetic(
    folder: str | Path,
    *,
    n: int = 64,
    seed: int = 0,
    image_size: int = 64,
    num_scanners: int = 3,
    images_per_patient: int = 8,
) -> list[Path]:
    """Write ``n`` synthetic angiograms as an XA PACS export: ``<patient>/<run>.dcm``.

    Each run's SeriesDescription is its view name (e.g. "LCA LAO cranial"), so the folder
    reads back through :func:`read_folder` without a labels CSV.
    """
    data = generate(
        n,
        seed=seed,
        image_size=image_size,
        num_scanners=num_scanners,
        images_per_patient=images_per_patient,
    )
    paths = []
    for i in range(len(data)):
        patient_id = data.patient_ids[data.patient[i]]
        scanner = int(data.scanner[i])
        paths.append(
            write_xa(
                Path(folder) / patient_id / f"run{i:05d}.dcm",
                data.images[i],
                primary=float(data.primary[i]),
                secondary=float(data.secondary[i]),
                sid=float(data.sid[i]),
                sod=float(data.sod[i]),
                pixel_spacing=float(data.pixel_spacing[i]),
                patient_id=patient_id,
                series_description=VIEW_CLASSES[data.view[i]],
                protocol_name="Coronary angiography",
                station_name=f"CATHLAB{scanner}",
                model_name=data.scanner_names[scanner],
                instance_number=i + 1,
            )
        )
    return paths


@dataclass(frozen=True)
class _Labels:
    """One labels-CSV row: either entry may be missing."""

    artery: int | None
    view: int | None


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def parse_artery(text: str) -> int | None:
    """Artery index of a free-text label ("LCA", "left", "RCA", "right", ...), else None.

    "LCA"/"RCA" outrank "left"/"right", so "LCA via right radial" is still a left injection;
    a text naming both sides at the same rank is ambiguous (None).
    """
    words = set(re.split(r"[^a-z]+", text.lower()))
    for left_words, right_words in _ARTERY_WORDS:
        left, right = bool(words & left_words), bool(words & right_words)
        if left != right:
            return ARTERIES.index("LCA" if left else "RCA")
    return None


def parse_view(text: str) -> int | None:
    """View index of a class name (case, spaces and punctuation ignored) or of its index."""
    text = text.strip()
    if text.isdigit() and int(text) < len(VIEW_CLASSES):
        return int(text)
    names = {_key(name): i for i, name in enumerate(VIEW_CLASSES)}
    return names.get(_key(text))


def _parse_row(artery_text: str, view_text: str) -> _Labels | str:
    """Labels of one CSV row, or why they are unusable (a view implies its artery)."""
    artery = parse_artery(artery_text) if artery_text else None
    view = parse_view(view_text) if view_text else None
    if artery_text and artery is None:
        return f"unrecognised artery {artery_text!r} in labels CSV"
    if view_text and view is None:
        return f"unrecognised view {view_text!r} in labels CSV"
    if view is not None:
        implied = VIEW_BOXES[view][0]
        if artery is not None and artery != implied:
            return f"labels CSV artery {artery_text!r} contradicts view {view_text!r}"
        artery = implied
    return _Labels(artery, view)


def read_labels_csv(path: str | Path) -> dict[str, _Labels | str]:
    """Labels keyed by the ``file`` column (a path relative to the folder, or a bare name).

    Values are ``_Labels`` or the reason the row cannot label its file. A bare file name
    also matches files in sub-folders, as long as it names one row only.
    """
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [
            {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]
    if rows and "file" not in rows[0]:
        raise ValueError(f"{path}: the labels CSV needs a 'file' column")
    out: dict[str, _Labels | str] = {}
    for row in rows:
        if row["file"]:
            out[Path(row["file"]).as_posix()] = _parse_row(
                row.get("artery", ""), row.get("view", "")
            )
    names: dict[str, list[str]] = {}
    for key in out:
        names.setdefault(Path(key).name, []).append(key)
    for name, keys in names.items():
        if name not in out and len(keys) == 1:
            out[name] = out[keys[0]]
    return out


def _in_group(group: Dataset, keyword: str) -> object | None:
    """A value in a functional-group item: directly, or in one of its macro sequences."""
    if keyword in group:
        return group.get(keyword)
    for element in group:
        if element.VR == "SQ":
            for item in element.value:
                if keyword in item:
                    return item.get(keyword)
    return None


def _find(ds: Dataset, keyword: str) -> object | None:
    """A value at the top level or in the shared functional groups (enhanced XA)."""
    if keyword in ds:
        return ds.get(keyword)
    for group in ds.get("SharedFunctionalGroupsSequence", None) or []:
        value = _in_group(group, keyword)
        if value is not None:
            return value
    return None


def _as_number(value: object | None) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if not value:
            return None
        value = value[0]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _number(ds: Dataset, keyword: str) -> float | None:
    return _as_number(_find(ds, keyword))


def _frame_numbers(ds: Dataset, keyword: str) -> list[float]:
    """``keyword`` of each frame that carries it in the per-frame functional groups."""
    numbers = []
    for group in ds.get("PerFrameFunctionalGroupsSequence", None) or []:
        number = _as_number(_in_group(group, keyword))
        if number is not None:
            numbers.append(number)
    return numbers


def _angles(ds: Dataset) -> tuple[float | None, float | None] | str:
    """(primary, secondary) positioner angles in degrees (None where absent), or why not.

    Each angle is taken from the top level, else the shared functional groups, else the
    per-frame functional groups (Enhanced XA). Per-frame angles are one view only while they
    stay within ``_FRAME_ANGLE_TOLERANCE`` degrees of each other (encoder jitter); then the
    first frame's value is used. Frames that spread further are a rotational run, refused
    like one, since no single view label fits it; per-frame angles that contradict a top-level
    or shared value by more than the tolerance are refused too, rather than guessing which is
    right. Either refusal prints the angles found.
    """
    found: list[float | None] = []
    for keyword in _ANGLES:
        frames = _frame_numbers(ds, keyword)
        if frames and max(frames) - min(frames) > _FRAME_ANGLE_TOLERANCE:
            return (
                f"rotational run (per-frame {keyword} spans {min(frames):.2f} to "
                f"{max(frames):.2f} degrees over {len(frames)} frames)"
            )
        value = _number(ds, keyword)
        if value is not None and frames and abs(value - frames[0]) > _FRAME_ANGLE_TOLERANCE:
            return (
                f"conflicting {keyword}: {value:.2f} at the top level or in the shared "
                f"functional groups, {frames[0]:.2f} in the per-frame functional groups"
            )
        found.append(value if value is not None else (frames[0] if frames else None))
    return found[0], found[1]


def _shown(value: float, edges: list[float]) -> str:
    """``abs(value)`` with the fewest decimals that keep it on its side of every box edge.

    A plain ``:.0f`` would print -19.99 as 20, the edge of a box it lies outside of.
    """
    for digits in range(7):
        text = f"{value:.{digits}f}"
        if all(np.sign(float(text) - edge) == np.sign(value - edge) for edge in edges):
            return text.lstrip("-")
    return repr(abs(value))  # closer than 1e-6 to an edge: the exact value


def _side(value: float, positive: str, negative: str, edges: list[float]) -> str:
    """Clinical spelling of one angle, e.g. ``RAO 19.99`` (LAO / cranial > 0)."""
    return f"{positive if value >= 0 else negative} {_shown(value, edges)}"


def _outside_boxes(artery: int, primary: float, secondary: float) -> str:
    """Why (primary, secondary) has no view: the angles, exact enough, and the nearest box."""
    boxes = [(VIEW_CLASSES[v], p, s) for v, (a, p, s) in enumerate(VIEW_BOXES) if a == artery]
    p_edges = [edge for _, p, _ in boxes for edge in p]
    s_edges = [edge for _, _, s in boxes for edge in s]

    def distance(box: tuple[str, tuple[float, float], tuple[float, float]]) -> float:
        _, (p_lo, p_hi), (s_lo, s_hi) = box
        dp = max(p_lo - primary, 0.0, primary - p_hi)
        return float(np.hypot(dp, max(s_lo - secondary, 0.0, secondary - s_hi)))

    name, (p_lo, p_hi), (s_lo, s_hi) = min(boxes, key=distance)
    angles = f"{_side(primary, 'LAO', 'RAO', p_edges)} {_side(secondary, 'CRA', 'CAU', s_edges)}"
    box = (
        f"{_side(p_lo, 'LAO', 'RAO', [])} to {_side(p_hi, 'LAO', 'RAO', [])}, "
        f"{_side(s_lo, 'CRA', 'CAU', [])} to {_side(s_hi, 'CRA', 'CAU', [])}"
    )
    return f"{angles} lies outside every {ARTERIES[artery]} view box (nearest: {name}, {box})"


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square (angles assume the central ray) and resample, antialiased."""
    h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = torch.from_numpy(np.ascontiguousarray(image[top : top + side, left : left + side]))
    out = F.interpolate(
        square.float()[None, None],
        size=(size, size),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return out[0, 0].numpy()


@dataclass
class _Record:
    image: np.ndarray
    view: int
    artery: int
    primary: float
    secondary: float
    sid: float
    sod: float
    spacing: float
    scanner: str
    patient: str
    path: str


def _read_one(
    path: Path,
    rel: str,
    labels: dict[str, _Labels | str],
    *,
    image_size: int,
    label: str,
    frame: str | int,
) -> _Record | str:
    """One usable image, or the reason the file is unusable."""
    ds = open_dicom(path)
    if isinstance(ds, str):
        return ds
    modality, sop = str(ds.get("Modality", "")), ds.get("SOPClassUID")
    if modality != "XA" and sop not in XA_SOP_CLASSES:
        if not modality and sop is None and "PixelData" not in ds:
            return "not XA (no Modality, SOPClassUID or pixel data: a cut or non-image file)"
        return f"not XA (modality {modality or 'missing'})"
    if "PixelData" not in ds:
        return "no pixel data"
    for keyword in ("PositionerPrimaryAngleIncrement", "PositionerSecondaryAngleIncrement"):
        steps = _find(ds, keyword)
        if steps is not None and np.any(np.abs(np.atleast_1d(np.asarray(steps, float))) > 0):
            return "rotational run (positioner angles change between frames)"
    angles = _angles(ds)
    if isinstance(angles, str):
        return angles
    primary, secondary = angles

    row = labels.get(rel, labels.get(path.name))
    if isinstance(row, str):
        return row
    artery = row.artery if row else None
    view = row.view if row else None
    if artery is None:
        for tag in _TEXT_TAGS:
            artery = parse_artery(str(ds.get(tag, "")))
            if artery is not None:
                break
    if label == "view" and view is None:
        if primary is None or secondary is None:
            return "no positioner angles (PositionerPrimaryAngle/SecondaryAngle)"
        if artery is None:
            return "no artery label (labels CSV, SeriesDescription or ProtocolName)"
        view = view_class(artery, primary, secondary)
        if view is None:
            return _outside_boxes(artery, primary, secondary)
    if artery is None:
        return "no artery label (labels CSV, SeriesDescription or ProtocolName)"
    if view is None and primary is not None and secondary is not None:
        view = view_class(artery, primary, secondary)

    frames = read_pixels(ds)
    if isinstance(frames, str):
        return frames
    try:
        chosen = frames[select_frame(frames, frame)]
    except ValueError as exc:  # an index beyond this run's frames
        return str(exc)
    image = normalize_image(resize_square(chosen, image_size))
    if not np.isfinite(image).all():
        return "pixel values too large to normalise"
    scanner = " / ".join(
        str(ds.get(tag, "")).strip()
        for tag in ("Manufacturer", "ManufacturerModelName", "StationName")
        if str(ds.get(tag, "")).strip()
    )
    return _Record(
        image=image,
        view=-1 if view is None else view,
        artery=artery,
        primary=np.nan if primary is None else primary,
        secondary=np.nan if secondary is None else secondary,
        sid=_number(ds, "DistanceSourceToDetector") or np.nan,
        sod=_number(ds, "DistanceSourceToPatient") or np.nan,
        spacing=_number(ds, "ImagerPixelSpacing") or _number(ds, "PixelSpacing") or np.nan,
        scanner=scanner or "unknown scanner",
        patient=str(ds.get("PatientID", "") or ds.get("StudyInstanceUID", "") or "unknown"),
        path=str(path),
    )


def read_folder(
    folder: str | Path,
    *,
    image_size: int = 64,
    labels_csv: str | Path | None = None,
    label: str = "view",
    frame: str | int = "max-contrast",
) -> tuple[AngioSet, list[tuple[Path, str]]]:
    """Every usable XA image under ``folder`` (recursively), and each skipped file's reason.

    ``label="view"`` needs a view: from the labels CSV, or from the angles and the artery;
    ``label="artery"`` needs only the artery. Multi-frame runs contribute one frame, chosen
    by ``frame`` (see :func:`select_frame`). Images are centre-cropped, resized to
    ``image_size`` and normalised like the synthetic ones.
    """
    if label not in ("view", "artery"):
        raise ValueError(f"label must be 'view' or 'artery', got {label!r}")
    if isinstance(frame, str) and frame not in FRAME_CHOICES:
        raise ValueError(f"frame must be an index or one of {FRAME_CHOICES}, got {frame!r}")
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM folder {root} does not exist")
    labels = read_labels_csv(labels_csv) if labels_csv is not None else {}
    csv_path = Path(labels_csv).resolve() if labels_csv is not None else None
    records: list[_Record] = []
    skipped: list[tuple[Path, str]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.resolve() == csv_path or path.name.startswith("."):
            continue
        try:
            result = _read_one(
                path,
                path.relative_to(root).as_posix(),
                labels,
                image_size=image_size,
                label=label,
                frame=frame,
            )
        except Exception as exc:  # pydicom converts elements lazily: any of them can fail
            result = f"unusable DICOM ({type(exc).__name__}: {exc})"
        if isinstance(result, str):
            skipped.append((path, result))
        else:
            records.append(result)
    scanners = tuple(sorted({r.scanner for r in records}))
    patients = tuple(sorted({r.patient for r in records}))

    def column(name: str, dtype: type) -> np.ndarray:
        return np.array([getattr(r, name) for r in records], dtype=dtype)

    data = AngioSet(
        images=(
            np.stack([r.image for r in records])
            if records
            else np.zeros((0, image_size, image_size), np.float32)
        ),
        view=column("view", np.int64),
        artery=column("artery", np.int64),
        primary=column("primary", np.float64),
        secondary=column("secondary", np.float64),
        sid=column("sid", np.float64),
        sod=column("sod", np.float64),
        pixel_spacing=column("spacing", np.float64),
        scanner=np.array([scanners.index(r.scanner) for r in records], dtype=np.int64),
        patient=np.array([patients.index(r.patient) for r in records], dtype=np.int64),
        scanner_names=scanners,
        patient_ids=patients,
        paths=tuple(r.path for r in records),
    )
    return data, skipped
