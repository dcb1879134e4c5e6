"""Opening DICOM files of any modality and reading their pixels, robustly.

:func:`open_dicom` reads a file or says in one line why it cannot (not DICOM, truncated,
unreadable); legacy files without the 128-byte preamble and "DICM" prefix (no file meta) are
read too, when the bytes parse as a DICOM data set. :func:`read_pixels` decodes the pixel
data (compressed transfer syntaxes through pydicom's decoders, rescale slope/intercept or the
Modality LUT, MONOCHROME1, frames) and :func:`select_frame` picks one frame of a run. The
generic ``dicom`` source (:mod:`federation.tasks.dicom`) and the angiography task's XA reader
(:mod:`federation.tasks.angio.dicom`) both read with them, so nothing here knows of XA, a
modality or labels. :func:`grayscale_dataset` builds the minimal data set of a 16-bit
grayscale image that the writers (test exports, sample studies) fill in.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

FRAME_CHOICES = ("max-contrast", "first", "middle", "last")
# tags whose presence shows that bytes read without the "DICM" prefix are a DICOM data set
_DICOM_MARKERS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality", "PixelData")
# first bytes of a data set without preamble: group 0002 or 0008, little or big endian
_FIRST_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def select_frame(frames: np.ndarray, how: str | int = "max-contrast") -> int:
    """Index of the frame of a cine run ``[F, H, W]`` to use.

    ``"max-contrast"`` takes the frame of peak opacification: after dividing each frame by
    its median (exposure control changes the gain between frames), the frame that lies
    furthest below the run's per-pixel maximum (the least-filled state of every pixel).
    """
    count = len(frames)
    if isinstance(how, (int, np.integer)):
        if not -count <= how < count:
            raise ValueError(f"frame {how} out of range for a {count}-frame run")
        return int(how) % count
    if how == "first":
        return 0
    if how == "middle":
        return count // 2
    if how == "last":
        return count - 1
    if how != "max-contrast":
        raise ValueError(f"frame must be an index or one of {FRAME_CHOICES}, got {how!r}")
    gain = np.median(frames.reshape(count, -1), axis=1)
    scaled = frames / np.maximum(gain, 1e-6)[:, None, None]
    return int(np.argmax((scaled.max(axis=0) - scaled).reshape(count, -1).mean(axis=1)))


def _looks_like_dicom(ds: Dataset) -> bool:
    """Whether bytes read with ``force=True`` (no "DICM" prefix) parsed as a DICOM data set:
    it holds an identifying element, or it starts, as data sets do, with group 0008."""
    if any(keyword in ds for keyword in _DICOM_MARKERS):
        return True
    first = next(iter(ds.keys()), None)
    return first is not None and Tag(first).group == 0x0008


def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(144)


def _cut_meta(head: bytes, size: int) -> str | None:
    """How the first bytes of a file show it is a DICOM file cut in its preamble, "DICM"
    prefix or file meta header (which pydicom refuses or fails on), or None."""
    if 128 < size < 132 and head[128:] == b"DICM"[: size - 128]:
        return 'it ends inside the "DICM" prefix'
    if head[128:132] != b"DICM":
        return None
    if size < 144:
        return "it ends inside the file meta header"
    if head[132:140] == b"\x02\x00\x00\x00UL\x04\x00":  # (0002,0000) group length, UL
        end = 144 + int.from_bytes(head[140:144], "little")
        if size < end:
            return f"the file meta header alone declares {end} bytes"
    return None


_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


def _cut_header(tail: bytes, implicit: bool, little: bool) -> int | None:
    """Bytes left at the end of ``tail`` (whole elements, then a cut) too few for an element
    header, or None when the elements fill it or one of undefined length stops the walk."""
    order = "little" if little else "big"
    pos = 0
    while pos < len(tail):
        header = 12 if not implicit and tail[pos + 4 : pos + 6] in _LONG_VRS else 8
        if len(tail) - pos < header:
            return len(tail) - pos
        if implicit:
            length = int.from_bytes(tail[pos + 4 : pos + 8], order)
        elif header == 12:
            length = int.from_bytes(tail[pos + 8 : pos + 12], order)
        else:
            length = int.from_bytes(tail[pos + 6 : pos + 8], order)
        if length == 0xFFFFFFFF:
            return None
        pos += header + length
    return None


def _truncation(path: Path, ds: FileDataset, size: int) -> str | None:
    """How ``ds``, read from ``path`` of ``size`` bytes, shows the file was cut short, or None.

    pydicom reads a cut file without complaint: the element the cut falls in keeps the bytes
    that remain, and the elements after it are missing. The signs looked for: a file meta
    header declared longer than the whole file; an element holding fewer bytes than its
    length; nothing after the "DICM" prefix and file meta; a file ending inside an element
    header (1 to 11 bytes left over) before any pixel data. (A file with whole pixel data and
    a few stray bytes after it is still read.) A cut that falls exactly between two elements
    leaves no trace: such a file is refused for what it lacks (modality, pixel data, ...).
    """
    meta_length = ds.file_meta.get("FileMetaInformationGroupLength")
    if isinstance(meta_length, int):
        end = (132 if ds.preamble is not None else 0) + 12 + meta_length
        if size < end:
            return f"the file meta header alone declares {end} bytes"
    end = None
    for dataset in (ds.file_meta, ds):
        for elem in dataset.elements():
            if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
                continue
            if isinstance(elem.value, bytes) and len(elem.value) < elem.length:
                name = keyword_for_tag(elem.tag) or "element"
                return f"{name} {elem.tag} holds {len(elem.value)} of its {elem.length} bytes"
            if dataset is ds and elem.value_tell is not None:
                end = max(end or 0, elem.value_tell + elem.length)
    if ds.preamble is not None and len(ds) == 0:
        return 'no data set after the "DICM" prefix and file meta header'
    implicit, little = ds.original_encoding
    deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    if "PixelData" in ds or deflated or end is None or implicit is None or little is None:
        return None
    # elements pydicom converted while reading (empty values, sequences) lie past ``end``
    with open(path, "rb") as handle:
        handle.seek(end)
        left = _cut_header(handle.read(), implicit, little)
    if left:
        return f"it ends {left} bytes into an element header"
    return None


def open_dicom(path: Path) -> FileDataset | str:
    """The data set in ``path``, or why it cannot be read (any modality).

    Files without the 128-byte preamble and "DICM" prefix (legacy writers, some PACS exports)
    that start with a group 0002 (file meta) or 0008 element, as data sets do, are read with
    ``force=True`` and kept when they parse as DICOM (:func:`_looks_like_dicom`); anything
    else is "not a DICOM file". A file without a TransferSyntaxUID gets the encoding
    pydicom read it with, so that its pixel data can be decoded.
    """
    size = path.stat().st_size
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        head = _head(path)
        cut = _cut_meta(head, size)
        if cut is not None:
            return f"truncated DICOM file ({size} bytes: {cut})"
        if head[:2] not in _FIRST_GROUPS:  # spare a forced parse of, say, a video
            return "not a DICOM file"
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:  # garbage fails in as many ways as it likes: it is not DICOM
            return "not a DICOM file"
        if not _looks_like_dicom(ds):
            return "not a DICOM file"
    except Exception as exc:  # corrupt files surface as many exception types
        cut = _cut_meta(_head(path), size)
        if cut is None and isinstance(exc, struct.error):  # a header read short: at the end
            cut = "it ends inside an element header"
        if cut is None and isinstance(exc, OSError) and str(exc).startswith("No tag to read"):
            cut = "it ends inside a sequence"  # pydicom's words for an item header read short
        if cut is not None:
            return f"truncated DICOM file ({size} bytes: {cut})"
        return f"unreadable DICOM ({type(exc).__name__}: {exc})"
    cut = _truncation(path, ds, size)
    if cut is not None:
        return f"truncated DICOM file ({size} bytes: {cut})"
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        if implicit is not None and little is not None:
            ds.file_meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian
                if implicit
                else ExplicitVRLittleEndian
                if little
                else ExplicitVRBigEndian
            )
    return ds


def read_pixels(ds: Dataset, *, keep_samples: bool = False) -> np.ndarray | str:
    """The pixel data of ``ds`` (any modality) as float32 frames, or why it is unusable.

    Values are in modality units (RescaleSlope/RescaleIntercept or the Modality LUT applied:
    Hounsfield units for CT), MONOCHROME1 images are inverted (``max - value``) so that high
    values are bright as in MONOCHROME2. The frames are counted from the decoded pixel data
    (pydicom counts them when NumberOfFrames is missing, invalid or too small); a single
    image is one frame. Shape ``[frames, H, W]`` with colour samples averaged, or, with
    ``keep_samples``, ``[frames, samples, H, W]`` (RGB for colour images: pydicom converts
    YBR to RGB).
    """
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # missing decoder plugins, malformed encapsulation, ...
        return f"cannot decode pixel data ({type(exc).__name__}: {exc})"
    samples = int(ds.get("SamplesPerPixel", 1))
    if keep_samples:
        decoded = pixels.shape
        if samples > 1:
            if pixels.ndim not in (3, 4) or pixels.shape[-1] != samples:
                return (
                    f"pixel data of shape {decoded} is neither [H, W, {samples}] nor "
                    f"[frames, H, W, {samples}]"
                )
            pixels = np.moveaxis(pixels, -1, 0)
        elif pixels.ndim not in (2, 3):
            return f"pixel data of shape {decoded} is neither [H, W] nor [frames, H, W]"
        else:
            pixels = pixels[None]
    else:
        if samples > 1:
            pixels = pixels.mean(axis=-1)
        if pixels.ndim not in (2, 3):
            return f"pixel data of shape {pixels.shape} is neither [H, W] nor [frames, H, W]"
    pixels = apply_modality_lut(pixels, ds).astype(np.float32)
    if not np.isfinite(pixels).all():
        return "RescaleSlope/RescaleIntercept make pixel values non-finite"
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() - pixels  # contrast-filled vessels dark, as in MONOCHROME2
    if keep_samples:  # [samples, (frames,) H, W] -> [frames, samples, H, W]
        return pixels[None] if pixels.ndim == 3 else np.moveaxis(pixels, 0, 1)
    return pixels if pixels.ndim == 3 else pixels[None]


def grayscale_dataset(
    pixels: np.ndarray,
    *,
    sop_class: str,
    sop_uid: str,
    modality: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    bits_stored: int = 16,
) -> Dataset:
    """A DICOM data set (explicit VR little endian, with its file meta) holding ``pixels``, a
    ``[H, W]`` or ``[frames, H, W]`` array of unsigned values below ``2**bits_stored``, as
    16-bit MONOCHROME2 under the given identity. Callers add their modality's attributes,
    then save it with ``enforce_file_format=True``."""
    stored = np.asarray(pixels)
    if stored.ndim not in (2, 3):
        raise ValueError(f"pixels must be [H, W] or [frames, H, W], got shape {stored.shape}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds
