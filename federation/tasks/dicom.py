"""The ``dicom`` source: a folder of DICOM images of any modality, labelled by a CSV.

.. code-block:: yaml

    task:
      name: dicom
      data_dir: data/pacs-export/   # DICOM files, in any sub-folders, any file names
      options:
        labels: labels.csv          # relative to data_dir: columns file, label
        key: file                   # or sop_instance_uid
        classes: [normal, nodule]
        image_size: 64
    model: {arch: cnn}

Options (``task.options``):

- ``labels`` (required): the labels CSV (``.tsv``: tab-separated), relative to
  ``task.data_dir``; UTF-8, its first row names the columns.
- ``key`` (default ``file``): how a row names its image: ``file`` (the path relative to
  ``data_dir``, ``/`` separated; a bare file name is enough when one file has it) or
  ``sop_instance_uid`` (the image's SOP Instance UID).
- ``key_column`` (default: the ``key`` value) and ``label_column`` (default ``label``): the
  CSV's column names (case, spaces and underscores ignored: ``SOPInstanceUID`` matches
  ``sop_instance_uid``).
- ``classes`` (required): the label values, in order (class ``i`` is the ``i``-th); numbers
  match numerically (``1`` matches ``1.0``).
- ``image_size`` (required): ``[height, width]`` or one size; ``channels`` (default 1;
  3 for RGB, grayscale repeated), ``resample`` and ``fit`` as for :mod:`federation.tasks.images`.
- ``frame`` (default ``middle``): the frame of a multi-frame image (cine, enhanced CT/MR
  slices): ``first``, ``middle``, ``last`` or an index (negative counts from the end).
- ``intensity`` (default ``percentile``): ``percentile`` maps each image's 0.5-99.5
  percentile window to [0, 1] (as the angiography task does: scanners' exposure and bit
  depth do not leak into the data); ``rescaled`` keeps modality units (RescaleSlope and
  RescaleIntercept applied: Hounsfield units for CT); ``{center: c, width: w}`` maps the
  window ``[c - w/2, c + w/2]`` of modality units to [0, 1], clipped (e.g. a CT lung window).
- ``modalities`` (default: every one): the Modality values to use, e.g. ``[CT]``; files of
  other modalities are skipped with their reason.
- ``split_by`` (default ``patient``): the train/test split keeps each patient (PatientID,
  else StudyInstanceUID) on one side, so that no patient's images are in both; ``image``
  splits images independently. (A file with neither is a patient of its own.)
- ``test_fraction`` (default 0.2), ``normalise`` (default ``auto``), ``delimiter`` (default
  ``,``) as for the other sources.

Pixels are read as for angiography (:func:`federation.tasks.dicom_files.open_dicom` and
:func:`~federation.tasks.dicom_files.read_pixels`): compressed transfer syntaxes through
pydicom's decoders, rescale slope/intercept or the Modality LUT applied, MONOCHROME1 inverted.
Every file that cannot be used (not DICOM, truncated, no pixel data, an excluded modality,
undecodable pixels, no label row, a label not in ``classes``, rows that disagree, a second
copy of the same SOP Instance UID) is skipped and listed with its one-line reason in
``info["skipped"]``, as is every label row whose file is missing; fewer than two usable
images are refused with the first reasons.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import nn

from federation.tasks import models
from federation.tasks.base import TaskData, classification_split
from federation.tasks.dicom_files import open_dicom, read_pixels, select_frame
from federation.tasks.images import (
    FITS,
    RESAMPLE,
    check_unknown,
    class_names,
    option_error,
    parse_channels,
    parse_choice,
    parse_fraction,
    parse_image_size,
    refuse_unusable,
    resize,
)
from federation.tasks.stats import DataStats, FeatureStats, prepare, split_indices
from federation.tasks.tabular import data_path

PRIVATE_DATA_DIR = True
"""Real patient images: the seeded simulation key draws a warning on them."""

KEYS = ("file", "sop_instance_uid")
FRAMES = ("first", "middle", "last")
INTENSITIES = ("percentile", "rescaled")
SPLITS = ("patient", "image")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's "L"

DEFAULTS: dict[str, object] = {
    "key": "file",
    "key_column": None,
    "label_column": "label",
    "channels": 1,
    "resample": "bilinear",
    "fit": "stretch",
    "frame": "middle",
    "intensity": "percentile",
    "modalities": None,
    "split_by": "patient",
    "test_fraction": 0.2,
    "normalise": "auto",
    "delimiter": None,
}
"""Defaults of the optional options (``labels``, ``classes`` and ``image_size`` have none)."""

REQUIRED = ("labels", "classes", "image_size")
OPTIONS = frozenset({*REQUIRED, *DEFAULTS})


@dataclass(frozen=True)
class DicomSpec:
    """The parsed ``task.options`` (no data read)."""

    labels: str
    key: str
    key_column: str
    label_column: str
    classes: tuple[str, ...]
    image_size: tuple[int, int]
    channels: int
    resample: str
    fit: str
    frame: str | int
    intensity: str | tuple[float, float]
    modalities: tuple[str, ...] | None
    split_by: str
    test_fraction: float
    normalise: object
    delimiter: str | None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)


def _fail(name: str, expected: str, value: object) -> ValueError:
    return option_error("dicom", name, expected, value)


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(name, "a name", value)
    return value.strip()


def _intensity(value: object) -> str | tuple[float, float]:
    if isinstance(value, str) and value in INTENSITIES:
        return value
    expected = "percentile, rescaled or {center: c, width: w}"
    if not isinstance(value, Mapping) or set(value) != {"center", "width"}:
        raise _fail("intensity", expected, value)
    center, width = value["center"], value["width"]
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (center, width))
    if not numbers or not np.isfinite([center, width]).all() or width <= 0:
        raise _fail("intensity", "a window of finite center and positive width", value)
    return float(center), float(width)


def parse_options(options: Mapping[str, Any]) -> DicomSpec:
    """Validate ``task.options`` (without reading data); ``ValueError`` names the option."""
    check_unknown("dicom", options, OPTIONS)
    missing = [name for name in REQUIRED if options.get(name) is None]
    if missing:
        raise ValueError(f"dicom: task.options needs {', '.join(missing)}")
    o = {**DEFAULTS, **options}
    labels = o["labels"]
    if not isinstance(labels, str | Path) or not str(labels).strip():
        raise _fail("labels", "a CSV file name", labels)
    key = parse_choice("dicom", "key", o["key"], KEYS)
    frame = o["frame"]
    if isinstance(frame, bool) or not (isinstance(frame, int) or frame in FRAMES):
        raise _fail("frame", "first, middle, last or a frame index", frame)
    modalities = o["modalities"]
    if modalities is not None:
        items = [modalities] if isinstance(modalities, str) else modalities
        if not isinstance(items, Sequence) or not items:
            raise _fail("modalities", "a list of Modality values such as CT", modalities)
        modalities = tuple(_text("modalities", m).upper() for m in items)
    delimiter = o["delimiter"]
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1):
        raise _fail("delimiter", "one character", delimiter)
    return DicomSpec(
        labels=str(labels),
        key=key,
        key_column=_text("key_column", o["key_column"] or key),
        label_column=_text("label_column", o["label_column"]),
        classes=class_names("dicom", o["classes"]),
        image_size=parse_image_size("dicom", o["image_size"]),
        channels=parse_channels("dicom", o["channels"]),
        resample=parse_choice("dicom", "resample", o["resample"], tuple(RESAMPLE)),
        fit=parse_choice("dicom", "fit", o["fit"], FITS),
        frame=frame,
        intensity=_intensity(o["intensity"]),
        modalities=modalities,
        split_by=parse_choice("dicom", "split_by", o["split_by"], SPLITS),
        test_fraction=parse_fraction("dicom", o["test_fraction"]),
        normalise=o["normalise"],
        delimiter=delimiter,
    )


# -- the labels CSV ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    number: int  # as a spreadsheet numbers it: the header is row 1
    key: str
    label: str


def _column_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _read_labels(path: Path, spec: DicomSpec) -> tuple[list[_Row], list[tuple[str, str]]]:
    """The rows with a key, and the rows reported (no key)."""
    if not path.is_file():
        raise ValueError(f"{path}: labels CSV not found (task.options.labels)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    delimiter = spec.delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        table = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as exc:
        raise ValueError(f"{path}: not a readable CSV file: {exc}") from None
    numbered = [(i + 1, row) for i, row in enumerate(table) if any(c.strip() for c in row)]
    if not numbered:
        raise ValueError(
            f"{path}: empty; expected a header row naming the columns {spec.key_column} and "
            f"{spec.label_column}"
        )
    header_row, header = numbered[0]
    columns: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(header):
        columns[_column_key(name)].append(i)
    index = {}
    for option, name in (("key_column", spec.key_column), ("label_column", spec.label_column)):
        found = columns.get(_column_key(name), [])
        if not found:
            present = ", ".join(repr(c.strip()) for c in header[:20])
            raise ValueError(
                f"{path}: no column {name!r} (task.options.{option}); row {header_row} has "
                f"{present}"
            )
        if len(found) > 1:
            raise ValueError(
                f"{path}: row {header_row} names column {name!r} {len(found)} times "
                f"(columns {', '.join(str(i + 1) for i in found)})"
            )
        index[option] = found[0]
    rows: list[_Row] = []
    reported: list[tuple[str, str]] = []
    for number, cells in numbered[1:]:
        key = cells[index["key_column"]].strip() if index["key_column"] < len(cells) else ""
        label = cells[index["label_column"]].strip() if index["label_column"] < len(cells) else ""
        if not key:
            reported.append((str(path), f"row {number}: empty {spec.key_column} cell"))
            continue
        if spec.key == "file":
            key = PurePosixPath(key.replace("\\", "/")).as_posix()
        rows.append(_Row(number, key, label))
    return rows, reported


def _class_index(text: str, classes: Sequence[str]) -> int | None:
    if text in classes:
        return classes.index(text)
    try:
        value = float(text)
    except ValueError:
        return None
    for i, name in enumerate(classes):
        try:
            if float(name) == value:
                return i
        except ValueError:
            continue
    return None


def _label(rows: Sequence[_Row], spec: DicomSpec, csv_name: str, what: str) -> int | str:
    """The class index the rows give, or why they do not give one."""
    if not rows:
        return f"no row in {csv_name} for {what}"
    numbers = ", ".join(str(r.number) for r in rows)
    labels = sorted({r.label for r in rows})
    if len(labels) > 1:
        return f"{csv_name} rows {numbers} give it different labels: {', '.join(map(repr, labels))}"
    if not labels[0]:
        return f"{csv_name} row {numbers} has an empty {spec.label_column} cell"
    index = _class_index(labels[0], spec.classes)
    if index is None:
        return (
            f"label {labels[0]!r} ({csv_name} row {numbers}) is not one of task.options.classes "
            f"({', '.join(spec.classes)})"
        )
    return index


# -- the images ----------------------------------------------------------------------------


def _unusable(ds: Any, spec: DicomSpec) -> str | None:
    """Why the data set is not an image of a wanted modality, or None."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if spec.modalities is not None and modality not in spec.modalities:
        return (
            f"modality {modality or 'missing'} is not in task.options.modalities "
            f"({', '.join(spec.modalities)})"
        )
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        if sop is None and not modality:
            return "no pixel data (and no Modality or SOPClassUID: a cut or non-image file)"
        name = getattr(sop, "name", "") or str(sop or "")
        return f"no pixel data (not an image: {name or 'modality ' + modality})"
    return None


def _pixels(ds: Any, spec: DicomSpec) -> np.ndarray | str:
    """The chosen frame as float32 ``[channels, H, W]``, resized and mapped, or why not."""
    frames = read_pixels(ds, keep_samples=True)
    if isinstance(frames, str):
        return frames
    try:
        image = frames[select_frame(frames, spec.frame)]
    except ValueError as exc:  # an index beyond this image's frames
        return str(exc)
    samples = image.shape[0]
    if samples not in (1, 3):
        return f"{samples} samples per pixel: expected 1 (grayscale) or 3 (colour)"
    if samples == 3 and spec.channels == 1:
        image = np.tensordot(_LUMA, image, axes=1)[None]
    elif samples == 1 and spec.channels == 3:
        image = np.repeat(image, 3, axis=0)
    image = resize(image.astype(np.float32), spec.image_size, spec.resample, spec.fit)
    if spec.intensity == "percentile":
        lo, hi = np.percentile(image, [0.5, 99.5])
        image = np.clip((image - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    elif isinstance(spec.intensity, tuple):
        center, width = spec.intensity
        image = np.clip((image - (center - width / 2)) / width, 0.0, 1.0)
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        return "pixel values too large to map to finite numbers"
    return image


def _uid(ds: Any) -> str:
    uid = ds.get("SOPInstanceUID", "") or ds.file_meta.get("MediaStorageSOPInstanceUID", "")
    return str(uid or "").strip()


def _patient(ds: Any, fallback: str) -> str:
    for keyword in ("PatientID", "StudyInstanceUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            return f"{keyword} {value}"
    return fallback


def _root(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise ValueError("dicom: task.data_dir is required: the folder of DICOM files")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        what = "not a folder" if root.exists() else "folder not found"
        raise ValueError(f"{root}: {what} (task.data_dir)")
    return root


@dataclass
class _Read:
    images: list[np.ndarray]
    labels: list[int]
    patients: list[str]
    modalities: list[str]
    skipped: list[tuple[str, str]]


def _files(root: Path, csv_path: Path) -> list[Path]:
    """Every file under ``root`` but the labels CSV and hidden ones, in path order."""
    skip = csv_path.resolve()
    return [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.resolve() != skip
    ]


def _read_all(root: Path, spec: DicomSpec) -> _Read:
    csv_path = data_path(spec.labels, root)
    rows, reported = _read_labels(csv_path, spec)
    csv_name = csv_path.name
    files = _files(root, csv_path)
    if not files:
        raise ValueError(
            f"{root}: no files to read besides the labels CSV (expected DICOM files, in any "
            "sub-folders)"
        )
    rels = {p.relative_to(root).as_posix(): p for p in files}
    by_key: dict[str, list[_Row]] = defaultdict(list)
    file_reason: dict[str, str] = {}
    missing: list[_Row] = []
    if spec.key == "file":
        by_name: dict[str, list[str]] = defaultdict(list)
        for rel in rels:
            by_name[PurePosixPath(rel).name].append(rel)
        for row in rows:
            if row.key in rels:
                by_key[row.key].append(row)
            elif "/" not in row.key and len(by_name.get(row.key, ())) == 1:
                by_key[by_name[row.key][0]].append(row)
            elif "/" not in row.key and by_name.get(row.key):
                for rel in by_name[row.key]:
                    file_reason[rel] = (
                        f"{csv_name} row {row.number} names {row.key!r}, which matches "
                        f"{len(by_name[row.key])} files: give its path relative to {root}"
                    )
            else:
                missing.append(row)
    else:
        for row in rows:
            by_key[row.key].append(row)

    out = _Read([], [], [], [], [])
    seen_uids: dict[str, str] = {}
    for rel, path in rels.items():
        try:
            reason = _one(path, rel, spec, by_key, file_reason, seen_uids, csv_name, out)
        except Exception as exc:  # pydicom converts elements lazily: any of them can fail
            reason = f"unusable DICOM ({type(exc).__name__}: {exc})"
        if reason is not None:
            out.skipped.append((str(path), reason.replace("\n", " ")))
    for row in missing:
        out.skipped.append(
            (str(root / row.key), f"file not found, yet {csv_name} row {row.number} labels it")
        )
    if spec.key == "sop_instance_uid":
        for uid, uid_rows in by_key.items():
            if uid not in seen_uids:
                for row in uid_rows:
                    out.skipped.append(
                        (
                            str(csv_path),
                            f"row {row.number}: no DICOM file has SOP Instance UID {uid}",
                        )
                    )
    out.skipped.extend(reported)
    return out


def _one(
    path: Path,
    rel: str,
    spec: DicomSpec,
    by_key: Mapping[str, list[_Row]],
    file_reason: Mapping[str, str],
    seen_uids: dict[str, str],
    csv_name: str,
    out: _Read,
) -> str | None:
    """Read one file into ``out``; the reason it is unusable, or None."""
    ds = open_dicom(path)
    if isinstance(ds, str):
        return ds
    uid = _uid(ds)  # a label row naming it is the file's (its reason, if any, says why)
    if uid:
        if uid in seen_uids:
            return f"a copy of {seen_uids[uid]} (the same SOP Instance UID {uid})"
        seen_uids[uid] = rel
    unusable = _unusable(ds, spec)
    if unusable is not None:
        return unusable
    if rel in file_reason:
        return file_reason[rel]
    if spec.key == "file":
        label = _label(by_key.get(rel, ()), spec, csv_name, "this file")
    elif not uid:
        return "no SOP Instance UID to look its label up by (task.options.key)"
    else:
        label = _label(by_key.get(uid, ()), spec, csv_name, f"its SOP Instance UID {uid}")
    if isinstance(label, str):
        return label
    image = _pixels(ds, spec)
    if isinstance(image, str):
        return image
    patient = _patient(ds, rel)
    modality = str(ds.get("Modality", "") or "missing").strip().upper()
    out.images.append(image)  # all four or none: every element has been read by now
    out.labels.append(label)
    out.patients.append(patient)
    out.modalities.append(modality)
    return None


def _split(read: _Read, spec: DicomSpec, seed: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(read.labels)
    if spec.split_by == "image":
        return split_indices(n, spec.test_fraction, seed, where)
    patients = sorted(set(read.patients))
    if len(patients) < 2:
        raise ValueError(
            f"{where}: the {n} usable images are of one patient, and split_by: patient keeps a "
            "patient on one side; set task.options.split_by: image to split them"
        )
    _, test_p = split_indices(len(patients), spec.test_fraction, seed, where)
    test_set = {patients[i] for i in test_p}
    test = np.array([p in test_set for p in read.patients])
    return np.flatnonzero(~test), np.flatnonzero(test)


def load_raw(*, seed: int = 0, data_dir: str | Path | None = None, **options: Any) -> TaskData:
    """Every usable image read, resized, mapped (``intensity``) and split; not standardised."""
    spec = parse_options(options)
    root = _root(data_dir)
    read = _read_all(root, spec)
    if len(read.images) < 2:
        raise refuse_unusable(root, len(read.images), read.skipped, "DICOM image(s)")
    train, test = _split(read, spec, seed, str(root))
    x = torch.from_numpy(np.stack(read.images))
    y = torch.from_numpy(np.array(read.labels, dtype=np.int64))
    counts = np.bincount(np.array(read.labels), minlength=len(spec.classes))
    modalities = {m: read.modalities.count(m) for m in sorted(set(read.modalities))}
    info: dict[str, object] = {
        "source": "dicom",
        "data_dir": str(root),
        "labels": str(data_path(spec.labels, root)),
        "input_shape": spec.input_shape,
        "class_counts": {name: int(n) for name, n in zip(spec.classes, counts, strict=True)},
        "modalities": modalities,
        "split_by": spec.split_by,
        "patients": len(set(read.patients)),
        "skipped": read.skipped,
    }
    return classification_split("dicom", x, y, train, test, spec.classes, info)


def load_task_data(
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    stats: DataStats | FeatureStats | None = None,
    **options: Any,
) -> TaskData:
    """The images, ready to train: standardised (``normalise`` option) with ``stats`` (the
    federation's; :mod:`federation.tasks.stats`) or the loaded data's own."""
    spec = parse_options(options)
    raw = load_raw(seed=seed, data_dir=data_dir, **options)
    return prepare(raw, stats, declared=spec.normalise, where=str(_root(data_dir)))


def model_io(options: Mapping[str, Any]) -> dict[str, Any]:
    """``input_shape`` ``(C, H, W)`` and ``num_outputs``, from the options alone."""
    spec = parse_options({k: v for k, v in options.items() if k not in ("data_dir", "seed")})
    return {"input_shape": spec.input_shape, "num_outputs": len(spec.classes)}


def split_sizes(options: Mapping[str, Any]) -> tuple[int, int] | None:
    """(train, test) image counts, from reading every file; None where the folder is not
    here (an aggregator)."""
    opts = dict(options)
    data_dir = opts.pop("data_dir", None)
    seed = opts.pop("seed", 0)
    parse_options(opts)
    if data_dir is None or not Path(data_dir).expanduser().is_dir():
        return None
    raw = load_raw(seed=seed, data_dir=data_dir, **opts)
    return len(raw.y_train), len(raw.y_test)


def build_model(arch: str = "cnn", **options: Any) -> nn.Module:
    """A generic model (:mod:`federation.tasks.models`; ``cnn`` by default); the engine
    passes ``input_shape`` and ``num_outputs`` from :func:`model_io`."""
    return models.build_model(arch, **options)
