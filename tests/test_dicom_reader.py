"""DICOM reader regressions: Enhanced XA per-frame angles, legacy files without the "DICM"
prefix, truncated files, and view-box gap messages that never print an outside angle as the
box edge. Every file is a small synthetic one written with pydicom under tmp_path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import EnhancedXAImageStorage

from federation.tasks import angio
from federation.tasks.angio import dicom as angio_dicom
from federation.tasks.angio.render import AngioSet
from federation.tasks.angio.views import (
    ARTERIES,
    VIEW_BOXES,
    VIEW_CLASSES,
    angle_name,
    view_class,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on cut UID values

_LAO_CRANIAL = VIEW_CLASSES.index("LCA LAO cranial")


def _xa(path: Path, frames: int = 1, **overrides: object) -> Path:
    """A small XA run (LCA, LAO 30 CRA 25 unless overridden), single- or multi-frame."""
    rng = np.random.default_rng(len(path.name))
    pixels = rng.random((frames, 12, 16) if frames > 1 else (16, 16))
    options: dict[str, object] = {
        "primary": 30.0,
        "secondary": 25.0,
        "series_description": "LCA injection",
        "patient_id": "P1",
        **overrides,
    }
    return angio_dicom.write_xa(path, pixels, **options)  # type: ignore[arg-type]


def _positioner(primary: float, secondary: float) -> Dataset:
    """A functional-group item holding the X-Ray Positioner macro."""
    position = Dataset()
    position.PositionerPrimaryAngle = f"{primary:.2f}"
    position.PositionerSecondaryAngle = f"{secondary:.2f}"
    group = Dataset()
    group.PositionerPositionSequence = [position]
    return group


def _enhanced(
    path: Path,
    per_frame: list[tuple[float, float]] | None = None,
    shared: tuple[float, float] | None = None,
    top: tuple[float, float] | None = None,
    undefined_length: bool = False,
) -> Path:
    """An Enhanced XA run of len(per_frame) (or 3) frames, its angles only where given;
    ``undefined_length`` writes the sequences and items delimited, as many modalities do."""
    frames = len(per_frame) if per_frame else 3
    top_angles = {"primary": top[0], "secondary": top[1]} if top else {}
    _xa(path, frames, **{"primary": None, "secondary": None, **top_angles})
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedXAImageStorage
    if shared is not None:
        ds.SharedFunctionalGroupsSequence = [_positioner(*shared)]
    if per_frame is not None:
        ds.PerFrameFunctionalGroupsSequence = [_positioner(*angles) for angles in per_frame]
    if undefined_length:
        for element in ds.iterall():
            if element.VR == "SQ":
                element.is_undefined_length = True
                for item in element.value:
                    item.is_undefined_length_sequence_item = True
    ds.save_as(path, enforce_file_format=True)
    return path


def _reasons(folder: Path, **options: object) -> tuple[AngioSet, dict[str, str]]:
    data, skipped = angio_dicom.read_folder(folder, image_size=8, **options)  # type: ignore[arg-type]
    for path, reason in skipped:  # every refusal: one line, naming the file
        line = f"{path.name}: {reason}"
        assert reason and "\n" not in line
    return data, {path.name: reason for path, reason in skipped}


# --- 1. Enhanced XA: angles in the shared or per-frame functional groups -----------------------


@pytest.mark.parametrize(
    ("angles", "expected"),
    [
        ({"per_frame": [(30.0, 25.0)] * 3}, (30.0, 25.0)),
        ({"shared": (-30.0, -25.0)}, (-30.0, -25.0)),  # LCA RAO caudal
        ({"per_frame": [(30.0, 25.0), (30.4, 25.3), (29.7, 24.8)]}, (30.0, 25.0)),  # jitter
        ({"shared": (30.0, 25.0), "per_frame": [(30.5, 25.5)] * 3}, (30.0, 25.0)),  # shared 1st
        ({"top": (30.0, 25.0), "per_frame": [(30.5, 25.5)] * 3}, (30.0, 25.0)),
        ({"per_frame": [(30.0, 25.0)] * 3, "undefined_length": True}, (30.0, 25.0)),
    ],
    ids=[
        "per-frame",
        "shared",
        "per-frame-jitter",
        "shared-first",
        "top-level-first",
        "per-frame-delimited",
    ],
)
def test_enhanced_xa_angles_from_functional_groups(
    tmp_path: Path, angles: dict[str, object], expected: tuple[float, float]
) -> None:
    _enhanced(tmp_path / "run.dcm", **angles)  # type: ignore[arg-type]
    data, reasons = _reasons(tmp_path)
    assert reasons == {}
    assert (float(data.primary[0]), float(data.secondary[0])) == pytest.approx(expected)
    assert data.view[0] == view_class("LCA", *expected)


def test_enhanced_xa_refuses_frames_that_disagree(tmp_path: Path) -> None:
    """A C-arm that moves during the run has no single view: refused like a rotational run,
    naming the angle and its spread (and the same whether or not the view is wanted)."""
    _enhanced(tmp_path / "swing.dcm", per_frame=[(30.0, 25.0), (36.0, 25.0), (42.0, 25.0)])
    _enhanced(tmp_path / "tilt.dcm", per_frame=[(30.0, 25.0), (30.0, 27.5), (30.0, 25.0)])
    _enhanced(tmp_path / "conflict.dcm", shared=(30.0, 25.0), per_frame=[(45.0, 25.0)] * 3)
    _enhanced(tmp_path / "none.dcm")
    for label in ("view", "artery"):
        _, reasons = _reasons(tmp_path, label=label)
        assert reasons.pop("swing.dcm") == (
            "rotational run (per-frame PositionerPrimaryAngle spans 30.00 to 42.00 degrees "
            "over 3 frames)"
        )
        assert reasons.pop("tilt.dcm").startswith(
            "rotational run (per-frame PositionerSecondaryAngle spans 25.00 to 27.50"
        )
        assert reasons.pop("conflict.dcm") == (
            "conflicting PositionerPrimaryAngle: 30.00 at the top level or in the shared "
            "functional groups, 45.00 in the per-frame functional groups"
        )
        if label == "view":
            assert "no positioner angles" in reasons.pop("none.dcm")
        assert reasons == {}


# --- 2. Legacy files: no 128-byte preamble, no "DICM", maybe no file meta ---------------------


def _legacy(source: Path, target: Path, how: str) -> Path:
    ds = pydicom.dcmread(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    if how == "meta, no preamble":  # the file meta group, but not the 132 bytes before it
        out = DicomBytesIO()
        ds.save_as(out, enforce_file_format=True)
        target.write_bytes(out.getvalue()[132:])
        return target
    del ds.file_meta
    ds.preamble = None
    ds.save_as(target, implicit_vr=how == "implicit", little_endian=True)
    return target


@pytest.mark.parametrize("how", ["implicit", "explicit", "meta, no preamble"])
def test_legacy_file_without_dicm_prefix_is_read(tmp_path: Path, how: str) -> None:
    source = _xa(tmp_path / "src" / "run.dcm", frames=3)
    legacy = _legacy(source, tmp_path / "data" / "legacy.dcm", how)
    assert legacy.read_bytes()[128:132] != b"DICM"
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(legacy)  # what the reader used to stop at
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "labels.csv").write_text("file,artery\nlegacy.dcm,LCA\n")
    (tmp_path / "data" / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp_path / "data" / "empty.dcm").write_bytes(b"")
    data, reasons = _reasons(tmp_path / "data")
    assert reasons == dict.fromkeys(
        ["notes.txt", "labels.csv", "figure.png", "empty.dcm"], "not a DICOM file"
    )
    reference, _ = _reasons(tmp_path / "src")
    assert [Path(p).name for p in data.paths] == ["legacy.dcm"]
    assert np.array_equal(data.images, reference.images)  # pixels decode as in the original
    assert data.view.tolist() == [_LAO_CRANIAL]
    assert (data.primary[0], data.secondary[0]) == (30.0, 25.0)


# --- 3. Truncated files --------------------------------------------------------------------------


def test_300_byte_cut_is_reported_as_truncated(tmp_path: Path) -> None:
    whole = _xa(tmp_path / "whole" / "run.dcm").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "cut.dcm").write_bytes(whole[:300])
    _, reasons = _reasons(tmp_path / "cut")
    reason = reasons["cut.dcm"]
    assert reason.startswith("truncated DICOM file (300 bytes: ")
    assert "not XA" not in reason and "modality" not in reason
    # as the task reports it when too few files are usable: one line naming the file
    with pytest.raises(ValueError, match=r"cut\.dcm: truncated DICOM file \(300 bytes"):
        angio.load_task_data(data_dir=tmp_path / "cut", image_size=8)


@pytest.mark.parametrize("kind", ["single", "legacy", "enhanced", "delimited"])
def test_every_cut_reads_as_truncated_unless_it_falls_between_elements(
    tmp_path: Path, kind: str
) -> None:
    """Cut at every byte past the preamble up to the pixel data (and at every 61st byte in
    it): "truncated", except where the cut falls exactly between two elements (nothing shows
    it) and the file is refused for what it lacks."""
    folder = tmp_path / "src"
    if kind in ("enhanced", "delimited"):
        per_frame = [(30.0, 25.0)] * 2
        source = _enhanced(folder / "run.dcm", per_frame, undefined_length=kind == "delimited")
    else:
        source = _xa(folder / "run.dcm")
    if kind == "legacy":
        source = _legacy(source, folder / "legacy.dcm", "implicit")
    blob = source.read_bytes()
    ds = pydicom.dcmread(source, force=True)
    elements = len(ds.file_meta) + sum(1 for _ in ds.iterall())
    run = tmp_path / "cut.dcm"
    others: list[str] = []
    start = 8 if kind == "legacy" else 129
    pixels = blob.rindex(b"\xe0\x7f\x10\x00") + 16  # past the PixelData header
    for size in [*range(start, pixels), *range(pixels, len(blob), 61), len(blob) - 1]:
        run.write_bytes(blob[:size])
        reason = angio_dicom._read_one(run, run.name, {}, image_size=8, label="view", frame=0)
        assert isinstance(reason, str), f"a {size}-byte cut of a {len(blob)}-byte file was read"
        if not reason.startswith(f"truncated DICOM file ({size} bytes: "):
            others.append(reason)
    assert set(others) <= {
        "no pixel data",
        "not XA (no Modality, SOPClassUID or pixel data: a cut or non-image file)",
    }
    assert len(others) <= elements


def test_whole_file_with_stray_trailing_bytes_is_still_read(tmp_path: Path) -> None:
    run = _xa(tmp_path / "run.dcm")
    run.write_bytes(run.read_bytes() + b"\0\0\0")
    data, reasons = _reasons(tmp_path)
    assert reasons == {} and len(data) == 1


# --- 4. Gap messages: angles outside every box never print as a box edge --------------------


def test_gap_message_does_not_round_onto_the_box_edge(tmp_path: Path) -> None:
    # LCA RAO caudal spans RAO 45..20, CAU 35..15: RAO 19.99 lies just outside it
    _xa(tmp_path / "edge.dcm", primary=-19.99, secondary=-25.0)
    _, reasons = _reasons(tmp_path)
    assert reasons["edge.dcm"] == (
        "RAO 19.99 CAU 25 lies outside every LCA view box "
        "(nearest: LCA RAO caudal, RAO 45 to RAO 20, CAU 35 to CAU 15)"
    )
    assert angle_name(-19.99, -25.0) == "RAO 20 CAU 25"  # the rounding this avoids


def _printed(message: str) -> tuple[float, float]:
    side, primary, tilt, secondary = message.split(" lies outside")[0].split()
    return (
        float(primary) * (1 if side == "LAO" else -1),
        float(secondary) * (1 if tilt == "CRA" else -1),
    )


@pytest.mark.parametrize("artery", [0, 1])
def test_printed_gap_angles_stay_outside_every_box(artery: int) -> None:
    """Read back, the printed angles lie outside every box too, for points a hair, a
    rounding step or half a degree beyond each edge; far from edges no decimals are shown."""
    edges = sorted({e for a, p, s in VIEW_BOXES if a == artery for e in (*p, *s)})
    offsets = (-0.5, -0.01, -0.004, -0.0004, -1e-9, 1e-9, 0.0004, 0.004, 0.01, 0.5)
    checked = 0
    for edge in edges:
        for offset in offsets:
            for point in ((edge + offset, 0.0), (0.0, edge + offset), (edge + offset, -40.0)):
                if view_class(artery, *point) is not None:
                    continue
                message = angio_dicom._outside_boxes(artery, *point)
                assert view_class(artery, *_printed(message)) is None, message
                assert f"every {ARTERIES[artery]} view box (nearest: " in message
                checked += 1
    assert checked > 50
    far = angio_dicom._outside_boxes(0, 80.2, 60.7)
    assert far.startswith("LAO 80 CRA 61 lies outside every LCA view box")
    exact = angio_dicom._outside_boxes(0, -19.9999999999, -25.0)
    assert re.match(r"RAO 19\.9999999999\d* CAU 25 ", exact), exact
