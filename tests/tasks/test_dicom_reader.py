"""DICOM reader regressions: Enhanced XA per-frame angles, legacy files without the "DICM"
prefix, truncated files, and view-box gap messages that never print an outside angle as the
box edge. Every file is a small synthetic one written with pydicom under tmp_path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
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
from tests.hostile import FUZZ, mutate, no_temporaries, quiet, scratch, tried

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


# --- Hostile DICOM folders (fuzzed: see tests/hostile.py) -----------------------------------------


class _XaFiles(dict[str, bytes]):
    """Real XA files by name; a short repr keeps hypothesis reports readable."""

    def __repr__(self) -> str:
        return f"<XA files {', '.join(f'{k}: {len(v)} bytes' for k, v in self.items())}>"


@pytest.fixture(scope="module")
def xa_files(tmp_path_factory: pytest.TempPathFactory) -> _XaFiles:
    """Files written by the project's writer: a single-frame run and a 3-frame cine run."""
    folder = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(0)
    common = {"primary": 30.0, "secondary": 25.0, "series_description": "LCA LAO cranial"}
    single = angio_dicom.write_xa(folder / "single.dcm", rng.random((16, 16)), **common)
    cine = angio_dicom.write_xa(folder / "cine.dcm", rng.random((3, 12, 20)), **common)
    return _XaFiles(single=single.read_bytes(), cine=cine.read_bytes())


_PIXEL_BYTES = {"single": 16 * 16 * 2, "cine": 3 * 12 * 20 * 2}


def _read_dicom_folder(folder: Path, count: int) -> tuple[Any, list[tuple[Path, str]]]:
    """read_folder never raises on bad files: each is read or skipped with a reason."""
    data, skipped = angio_dicom.read_folder(folder, image_size=8)
    assert len(data) + len(skipped) == count
    assert all(isinstance(reason, str) and reason for _, reason in skipped)
    assert data.images.shape == (len(data), 8, 8)
    assert np.isfinite(data.images).all()
    return data, skipped


def _unconvertible_element(blob: bytes) -> bool:
    """Whether pydicom reads ``blob`` but cannot convert one of its elements."""
    try:
        ds = pydicom.dcmread(DicomBytesIO(blob))
    except Exception:  # refused at dcmread: the reader's own guard covers that
        return False
    try:
        for _ in ds.iterall():
            pass
    except Exception:
        return True
    return False


def _declares_fewer_frames(blob: bytes) -> bool:
    """Whether ``blob`` declares (or pydicom assumes) one frame but its pixel data holds at
    least two."""
    try:
        ds = pydicom.dcmread(DicomBytesIO(blob), force=True)
        frame = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        frame = frame * int(ds.BitsAllocated) // 8
        pixels = len(ds.PixelData)
    except Exception:  # unparseable here: the reader must skip it, which the caller checks
        return False
    try:
        declared = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        declared = 1  # pydicom's own fallback for an invalid value
    return declared == 1 and frame > 0 and pixels >= 2 * frame


def _read_xa_blob(blob: bytes) -> None:
    """Write one (hostile) file and check it is read or skipped, never raised on."""
    tried("dicom")
    with scratch() as folder:
        (folder / "run.dcm").write_bytes(blob)
        _read_dicom_folder(folder, 1)


@quiet
@FUZZ
@given(blobs=st.lists(st.binary(max_size=400), min_size=1, max_size=3), preamble=st.booleans())
def test_dicom_reader_skips_random_bytes(blobs: list[bytes], preamble: bool) -> None:
    tried("dicom")
    with scratch() as folder:
        for i, blob in enumerate(blobs):
            head = b"\0" * 128 + b"DICM" if preamble else b""
            (folder / f"f{i}.dcm").write_bytes(head + blob)
        _read_dicom_folder(folder, len(blobs))


@quiet
@FUZZ
@given(which=st.sampled_from(["single", "cine"]), cut=st.floats(0.0, 1.0))
def test_dicom_reader_skips_truncated_files(xa_files: _XaFiles, which: str, cut: float) -> None:
    tried("dicom")
    blob = xa_files[which]
    with scratch() as folder:
        (folder / "run.dcm").write_bytes(blob[: int(cut * (len(blob) - 1))])
        data, skipped = angio_dicom.read_folder(folder, image_size=8)
        assert len(data) == 0 and len(skipped) == 1 and skipped[0][1]


@quiet
@settings(FUZZ, max_examples=120)
@given(which=st.sampled_from(["single", "cine"]), header_only=st.booleans(), data=st.data())
def test_dicom_reader_skips_mutated_files(
    xa_files: _XaFiles, which: str, header_only: bool, data: st.DataObject
) -> None:
    """Mutations anywhere (or only in the header, where they hit tags and lengths)."""
    blob = xa_files[which]
    pixels = len(blob) - _PIXEL_BYTES[which]
    mutated = mutate(blob[:pixels], data) + blob[pixels:] if header_only else mutate(blob, data)
    _read_xa_blob(mutated)


_HOSTILE_ELEMENTS: dict[str, list[Any]] = {
    "NumberOfFrames": ["0", "-1", "2", "99"],
    "Rows": [0, 1, 65535],
    "Columns": [0, 1, 65535],
    "BitsAllocated": [0, 1, 8, 32],
    "BitsStored": [0, 17],
    "SamplesPerPixel": [0, 3],
    "PixelRepresentation": [1, 7],
    "PhotometricInterpretation": ["MONOCHROME1", "RGB", "PALETTE COLOR", ""],
    "PositionerPrimaryAngleIncrement": [["0", "5"], ["nan"], "0"],
    "RescaleSlope": ["0", "-1", "2.5", "nan", "1e300"],
    "RescaleIntercept": ["-1000", "1e4", "inf", "1e308"],
    "Modality": ["", "CT", ["XA", "CT"]],
    "SeriesDescription": ["left right", "RCA", ""],
    "PixelData": [b"", b"\0" * 2, b"\0" * 2048],  # the last: more frames than declared
}
_TEXT_PATCHES: dict[str, list[bytes]] = {
    "PositionerPrimaryAngle": [b"x", b"nan", b"inf", b"1e400", b"", b"-720", b"1\\2"],
    "PositionerSecondaryAngle": [b"-inf", b"", b"90", b"\xff\xfe"],
    "NumberOfFrames": [b"abc", b"", b"1e9", b"-3", b"0", b"4294967296"],
    "DistanceSourceToDetector": [b"x", b"0", b"-1", b"nan"],
    "ImagerPixelSpacing": [b"x\\y", b"\\", b"0\\0", b"inf"],
    "Modality": [b"", b"\x00\x00", b"XA\\XA"],
    "SeriesDescription": [b"\xc3\x28", b"LCA" * 30],
}


def _patch_text(blob: bytes, keyword: str, value: bytes) -> bytes | None:
    """Replace the raw value of a short explicit-VR element (None if the file lacks it)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    at = blob.find(head + dictionary_VR(tag).encode(), 132)
    if at < 0:
        return None
    length = int.from_bytes(blob[at + 6 : at + 8], "little")
    value += b" " * (len(value) % 2)
    return blob[: at + 6] + len(value).to_bytes(2, "little") + value + blob[at + 8 + length :]


@quiet
@settings(FUZZ, max_examples=80)
@given(
    which=st.sampled_from(["single", "cine"]),
    changes=st.dictionaries(
        st.sampled_from(sorted(_HOSTILE_ELEMENTS)), st.integers(0, 4), max_size=4
    ),
    patches=st.dictionaries(st.sampled_from(sorted(_TEXT_PATCHES)), st.integers(0, 6), max_size=3),
)
def test_dicom_reader_skips_hostile_elements(
    xa_files: _XaFiles, which: str, changes: dict[str, int], patches: dict[str, int]
) -> None:
    """Well-formed files whose tags lie (zero rows, NaN angles, wrong bit depths, ...)."""
    assume(changes or patches)
    ds = pydicom.dcmread(DicomBytesIO(xa_files[which]))
    for keyword, index in changes.items():
        values = _HOSTILE_ELEMENTS[keyword]
        setattr(ds, keyword, values[index % len(values)])
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=False)
    blob: bytes | None = out.getvalue()
    for keyword, index in patches.items():
        values = _TEXT_PATCHES[keyword]
        assert blob is not None
        blob = _patch_text(blob, keyword, values[index % len(values)])
        assume(blob is not None)
    assert blob is not None
    _read_xa_blob(blob)


@quiet
@pytest.mark.parametrize(
    ("which", "keyword", "value"),
    [
        ("single", "PixelData", None),  # twice the declared pixel data, 1 frame declared
        ("cine", "NumberOfFrames", "1"),  # 3 frames stored
        ("cine", "NumberOfFrames", ""),  # empty: pydicom assumes 1
    ],
)
def test_dicom_reader_counts_frames_in_pixel_data_longer_than_declared(
    xa_files: _XaFiles, tmp_path: Path, which: str, keyword: str, value: str | None
) -> None:
    """pydicom decodes every frame the pixel data holds; the reader picks one of them."""
    tried("dicom")
    ds = pydicom.dcmread(DicomBytesIO(xa_files[which]))
    setattr(ds, keyword, ds.PixelData * 2 if value is None else value)
    ds.save_as(tmp_path / "run.dcm", enforce_file_format=False)
    assert _declares_fewer_frames((tmp_path / "run.dcm").read_bytes())
    data, _ = _read_dicom_folder(tmp_path, 1)
    assert len(data) == 1


@quiet
def test_dicom_reader_skips_unconvertible_elements(xa_files: _XaFiles, tmp_path: Path) -> None:
    tried("dicom")
    station = b"\x08\x00\x10\x10SH"  # (0008,1010) StationName, VR SH
    blob = xa_files["single"]
    assert blob.count(station) == 1
    hostile = blob.replace(station, station[:4] + b"RH")
    assert _unconvertible_element(hostile)
    (tmp_path / "run.dcm").write_bytes(hostile)
    _, skipped = _read_dicom_folder(tmp_path, 1)
    assert skipped[0][1].startswith("unusable DICOM (NotImplementedError")


@quiet
@pytest.mark.parametrize(("slope", "intercept"), [("nan", "0"), ("1e300", "0"), ("1", "inf")])
def test_dicom_reader_skips_non_finite_rescaled_pixels(
    xa_files: _XaFiles, tmp_path: Path, slope: str, intercept: str
) -> None:
    tried("dicom")
    ds = pydicom.dcmread(DicomBytesIO(xa_files["single"]))
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(tmp_path / "run.dcm", enforce_file_format=False)
    _, skipped = _read_dicom_folder(tmp_path, 1)
    assert skipped[0][1] == "RescaleSlope/RescaleIntercept make pixel values non-finite"


@quiet
def test_failed_dicom_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried("atomic writes")
    original = pydicom.dataset.Dataset.save_as

    def save_half_then_fail(self: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        whole = DicomBytesIO()
        original(self, whole, *args, **kwargs)
        target.write(whole.getvalue()[:100])  # the writer hands save_as its temporary file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", save_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        angio_dicom.write_xa(tmp_path / "p" / "run.dcm", np.zeros((8, 8)), primary=0, secondary=0)
    no_temporaries(tmp_path, keep=set())
    tried("atomic writes")
    with pytest.raises(ValueError, match="pixels"):
        angio_dicom.write_xa(tmp_path / "bad.dcm", np.zeros(8), primary=0, secondary=0)
    no_temporaries(tmp_path, keep=set())
