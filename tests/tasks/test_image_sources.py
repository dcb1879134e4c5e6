"""The image sources: ``images`` (PNG/JPEG, a folder per class) and ``dicom`` (any modality,
labels from a CSV).

Small data is generated per test in ``tmp_path``: PNG and JPEG files with Pillow (8- and
16-bit, grayscale, RGB, palette, alpha), DICOM files with pydicom (CT with rescale slope and
intercept, MR, CR in MONOCHROME1, RGB ultrasound, a multi-frame XA run, a text report). Each
source loads them, its generic CNN trains encrypted exactly as in plaintext (float64, 1e-9),
every malformed input is refused or skipped with one line naming the file and why, and the
statistics of site shares add up to the pooled ones.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
    XRayAngiographicImageStorage,
    generate_uid,
)
from torch import nn

from federation import protocol
from federation.config import experiment_from_dict
from federation.experiment import initial_model, site_data
from federation.nn.check import FLOAT64_ABS_TOL, compare_training
from federation.nn.session import SessionConfig
from federation.tasks import dicom, images, models
from federation.tasks.base import default_site_partition
from federation.tasks.stats import DataStats, data_stats, prepare
from sites import client_app
from tests.flower.flower_grid import (
    LocalGrid,
    assert_decrypts_to_plaintext,
    serve,
    server_run_config,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom on cut files
    pytest.mark.usefixtures("one_torch_thread"),  # tiny tensors: threads only contend
]


def _one_line(message: str) -> str:
    assert message and "\n" not in message
    return message


def _refused(load, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        load(**kwargs)
    return _one_line(str(info.value))


def _train_check(key, data) -> None:
    """Two epochs of SGD with momentum of the generic CNN, encrypted and plaintext."""
    torch.manual_seed(0)
    model = models.build_model(
        "cnn",
        input_shape=tuple(data.x_train.shape[1:]),
        num_outputs=data.num_classes,
        channels=[3, 4],
    )
    cmp = compare_training(
        model,
        data.x_train[:24],
        data.y_train[:24],
        key=key,
        loss="cross_entropy",
        config=SessionConfig("sgd", {"lr": 0.1, "momentum": 0.9}, batch_size=8, epochs=2, seed=3),
        num_classes=data.num_classes,
        feature_range=data.feature_range,
        x_eval=data.x_test,
    )
    assert cmp.state.abs <= FLOAT64_ABS_TOL and cmp.outputs.abs <= FLOAT64_ABS_TOL, cmp
    assert cmp.passed


# -- images: generated folders -------------------------------------------------------------

CLASSES = ["normal", "benign", "malignant"]
OPTIONS = {"classes": CLASSES, "image_size": [8, 10], "channels": 1}


def _picture(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """Values in [0, 1]: brighter for higher classes, a class-dependent stripe, noise."""
    image = 0.2 + 0.25 * cls + 0.1 * rng.random((h, w))
    image[:, (cls * 3) % w] += 0.2
    return np.clip(image, 0.0, 1.0)


def _save(path: Path, pixels: np.ndarray, kind: str) -> Path:
    """``pixels`` ([H, W] in [0, 1]) as an 8-bit gray/RGB/palette/RGBA PNG, a JPEG or a
    16-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = np.rint(pixels * 255).astype(np.uint8)
    if kind == "png16":
        Image.fromarray(np.rint(pixels * 65535).astype(np.uint16)).save(path)
    elif kind == "rgb":
        Image.fromarray(np.stack([gray, gray // 2, 255 - gray], axis=-1)).save(path)
    elif kind == "palette":
        Image.fromarray(gray).convert("P").save(path)
    elif kind == "rgba":
        Image.fromarray(np.stack([gray] * 4, axis=-1)).save(path)
    elif kind == "jpeg":
        Image.fromarray(gray).save(path, quality=95)
    else:
        Image.fromarray(gray).save(path)
    return path


KINDS = ["gray", "rgb", "png16", "jpeg", "palette", "rgba"]


@pytest.fixture
def png_dir(tmp_path: Path) -> Path:
    """10 images per class of every kind and size, one class with a sub-folder, plus files
    that are not inputs (a README, notes, hidden files)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls, name in enumerate(CLASSES):
        for i in range(10):
            kind = KINDS[(i + cls) % len(KINDS)]
            h, w = (16, 20) if i % 2 else (20, 16)
            ending = "jpg" if kind == "jpeg" else "png"
            folder = root / name / ("scanner-b" if i >= 7 and cls == 1 else "")
            _save(folder / f"{name}{i}.{ending}", _picture(rng, cls, h, w), kind)
    (root / "README.txt").write_text("one folder per class\n")
    (root / "benign" / "notes.txt").write_text("annotator notes\n")
    (root / "normal" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"")
    return root


def test_images_load_every_kind_converted_resized_and_standardised(png_dir: Path) -> None:
    raw = images.load_raw(seed=0, data_dir=png_dir, **OPTIONS)
    assert raw.x_train.shape == (24, 1, 8, 10) and raw.x_test.shape == (6, 1, 8, 10)
    assert raw.x_train.dtype == torch.float32
    assert raw.num_classes == 3 and raw.class_names == tuple(CLASSES)
    assert raw.info["class_counts"] == {"normal": 10, "benign": 10, "malignant": 10}
    assert raw.info["skipped"] == []
    assert raw.info["ignored"] == [
        (str(png_dir / "README.txt"), "not in a class folder"),
        (str(png_dir / "benign" / "notes.txt"), ".txt is not in task.options.extensions"),
    ]
    x = torch.cat([raw.x_train, raw.x_test])
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    y = torch.cat([raw.y_train, raw.y_test])
    means = [float(x[y == c].mean()) for c in range(3)]
    assert means[0] < means[1] < means[2]  # every kind read on the same [0, 1] scale
    assert raw.feature_range == (float(x.min()), float(x.max()))

    data = images.load_task_data(seed=0, data_dir=png_dir, **OPTIONS)
    z = torch.cat([data.x_train, data.x_test]).double()
    assert abs(float(z.mean())) < 1e-6 and float(z.std(unbiased=False)) == pytest.approx(1, 1e-6)
    assert data.info["normalisation"]["features"]["method"] == "standardised"
    assert images.model_io(OPTIONS) == {"input_shape": (1, 8, 10), "num_outputs": 3}
    assert images.split_sizes({**OPTIONS, "data_dir": png_dir}) == (24, 6)
    assert images.split_sizes({**OPTIONS, "data_dir": png_dir / "absent"}) is None
    assert images.split_sizes(OPTIONS) is None  # an aggregator has no data_dir
    model = images.build_model(**images.model_io(OPTIONS))
    assert isinstance(model[0], nn.Conv2d) and model[0].in_channels == 1

    rgb = images.load_raw(seed=0, data_dir=png_dir, **{**OPTIONS, "channels": 3})
    assert rgb.x_train.shape == (24, 3, 8, 10)
    png_only = images.load_raw(seed=0, data_dir=png_dir, **OPTIONS, extensions=[".PNG"])
    assert len(png_only.y_train) + len(png_only.y_test) == 24
    jpegs = [p for p, why in png_only.info["ignored"] if why.startswith(".jpg is not in")]
    assert len(jpegs) == 6 and all(p.endswith(".jpg") for p in jpegs)
    declared = images.load_task_data(
        seed=0, data_dir=png_dir, **{**OPTIONS, "normalise": {"mean": 0.5, "std": 0.25}}
    )
    torch.testing.assert_close(declared.x_train, (raw.x_train - 0.5) / 0.25)


def test_images_conversion_is_exact(tmp_path: Path) -> None:
    """8-bit /255, 16-bit /65535, colour to ITU-R 601 luma or RGB, EXIF orientation."""
    root = tmp_path / "exact"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(np.full((4, 6), 51, np.uint8)).save(root / "a" / "gray.png")
    Image.fromarray(np.full((4, 6), 32768, np.uint16)).save(root / "a" / "deep.png")
    red = np.zeros((4, 6, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(root / "b" / "red.png")
    half = np.zeros((2, 4), np.uint8)
    half[:, 2:] = 255  # left half dark, right half bright
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(half).save(root / "b" / "turned.png", exif=exif)

    def load(**change):
        raw = images.load_raw(
            seed=0,
            data_dir=root,
            **{"classes": ["a", "b"], "image_size": [4, 2], "resample": "nearest", **change},
        )
        x, y = torch.cat([raw.x_train, raw.x_test]), torch.cat([raw.y_train, raw.y_test])
        order = torch.argsort(y * 10 + x.flatten(1).mean(1))  # deterministic order
        return x[order].numpy(), y[order].numpy()

    x, y = load(channels=1)
    assert y.tolist() == [0, 0, 1, 1]
    assert np.all(x[0] == np.float32(51 / 255)) and np.all(x[1] == np.float32(32768 / 65535))
    turned = next(im for im in x[2:] if im.min() != im.max())
    red_gray = next(im for im in x[2:] if im.min() == im.max())
    assert red_gray[0, 0, 0] == np.float32(76 / 255)  # Pillow's L: 0.299 * 255, rounded
    # turned 90 degrees clockwise as displayed: the dark left half on top (not stretched)
    np.testing.assert_array_equal(turned[0, :2], 0.0)
    np.testing.assert_array_equal(turned[0, 2:], 1.0)
    x3, _ = load(channels=3)
    colour = next(im for im in x3 if im[0].max() == 1.0 and im[1].max() == 0.0)
    assert colour.shape == (3, 4, 2) and np.all(colour[2] == 0.0)
    np.testing.assert_array_equal(x3[1][0], x3[1][2])  # gray repeated in R, G and B


def test_resize_fit_and_filters() -> None:
    columns = np.tile(np.arange(8, dtype=np.float32), (4, 1))[None]  # [1, 4, 8]: x = column
    crop = images.resize(columns, (4, 4), "box", "crop")
    np.testing.assert_array_equal(crop[0], np.tile([2, 3, 4, 5], (4, 1)))
    pad = images.resize(columns + 1, (4, 4), "box", "pad")
    np.testing.assert_array_equal(pad[0, [0, 3]], 1.0)  # padded with the minimum
    np.testing.assert_allclose(pad[0, 1:3], [[1.5, 3.5, 5.5, 7.5]] * 2)
    stretch = images.resize(columns, (2, 4), "bilinear", "stretch")
    assert stretch.shape == (1, 2, 4) and stretch.dtype == np.float32
    assert not np.array_equal(
        images.resize(columns, (3, 3), "nearest"), images.resize(columns, (3, 3), "lanczos")
    )
    np.testing.assert_array_equal(images.resize(columns, (4, 8)), columns)


def test_images_and_dicom_train_encrypted_like_plaintext(
    key, png_dir: Path, dicom_dir: Path
) -> None:
    _train_check(key, images.load_task_data(seed=0, data_dir=png_dir, **OPTIONS))
    _train_check(key, dicom.load_task_data(seed=0, data_dir=dicom_dir, **DICOM_OPTIONS))


# -- images: malformed input ---------------------------------------------------------------


def _spoil(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "corrupt":
        spoiled = bytearray(data)
        for i in range(60, min(len(data) - 12, 90)):
            spoiled[i] ^= 0x5A  # inside the compressed pixel data
        path.write_bytes(bytes(spoiled))
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("patient list, not an image\n")


BAD_IMAGES = {
    "corrupt": ("normal/normal0.png", "corrupt image (OSError: broken data stream"),
    "truncated": ("malignant/malignant1.jpg", "truncated image ("),
    "empty": ("benign/scanner-b/benign7.png", "empty file (0 bytes)"),
    "not-an-image": ("benign/benign1.png", "not an image Pillow can read (27 bytes)"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_unreadable_image_refused_by_default_skipped_on_request(png_dir: Path, case) -> None:
    name, reason = BAD_IMAGES[case]
    path = png_dir / name
    assert path.is_file()
    _spoil(path, case)
    message = _refused(images.load_raw, seed=0, data_dir=png_dir, **OPTIONS)
    assert message.startswith(f"{path}: {reason}"), message
    assert message.endswith("set task.options.on_error: skip to leave unreadable images out "
                            "(each is then listed with its reason)")  # fmt: skip
    raw = images.load_raw(seed=0, data_dir=png_dir, **OPTIONS, on_error="skip")
    assert len(raw.y_train) + len(raw.y_test) == 29
    [(skipped, why)] = raw.info["skipped"]
    assert skipped == str(path) and why.startswith(reason) and "\n" not in why
    assert images.split_sizes({**OPTIONS, "on_error": "skip", "data_dir": png_dir}) == (23, 6)


def test_malformed_image_folders_are_refused_naming_the_folder(png_dir: Path) -> None:
    (png_dir / "Lesion").mkdir()
    message = _refused(images.load_raw, data_dir=png_dir, **OPTIONS)
    assert message.startswith(f"{png_dir / 'Lesion'}: folder 'Lesion' is not a class")
    assert "task.options.classes: normal, benign, malignant" in message
    (png_dir / "Lesion").rmdir()

    (png_dir / "Normal").mkdir()  # on a case-sensitive file system: a second folder
    message = _refused(images.load_raw, data_dir=png_dir, **OPTIONS)
    assert "folder 'Normal' is not a class" in message and "did you mean 'normal'?" in message
    (png_dir / "Normal").rmdir()

    message = _refused(
        images.load_raw, data_dir=png_dir, **{**OPTIONS, "classes": [*CLASSES, "cyst"]}
    )
    assert message.startswith(f"{png_dir / 'cyst'}: no folder for class 'cyst'")
    assert "keeps an empty folder of that name" in message

    stray = _save(png_dir / "stray.png", np.zeros((4, 4)), "gray")
    message = _refused(images.load_raw, data_dir=png_dir, **OPTIONS)
    assert message.startswith(f"{stray}: an image outside the class folders has no class")
    stray.unlink()

    empty = png_dir.parent / "empty"
    empty.mkdir()
    message = _refused(images.load_raw, data_dir=empty, **OPTIONS)
    assert message.startswith(f"{empty / 'normal'}: no folder for class 'normal'")
    for name in CLASSES:
        (empty / name).mkdir()
    message = _refused(images.load_raw, data_dir=empty, **OPTIONS)
    assert (
        message
        == f"{empty}: no images (png, jpg, jpeg) in the class folders normal, benign, malignant"
    )
    _save(empty / "benign" / "one.png", np.zeros((4, 4)), "gray")
    (empty / "normal" / "bad.png").write_bytes(b"")
    message = _refused(images.load_raw, data_dir=empty, **OPTIONS, on_error="skip")
    assert message == (
        f"{empty}: 1 usable image(s) (1 skipped: bad.png: empty file (0 bytes)): a site needs "
        "at least 2 (one train, one test)"
    )
    assert _refused(images.load_raw, data_dir=None, **OPTIONS).startswith(
        "images: task.data_dir is required"
    )
    assert _refused(images.load_raw, data_dir=empty / "none", **OPTIONS) == (
        f"{empty / 'none'}: folder not found (task.data_dir)"
    )


def test_image_option_errors_name_the_option() -> None:
    cases = [
        ({"classes": None}, "images: task.options needs classes"),
        ({"classes": ["a"]}, "classes must be a list of at least 2 class names"),
        ({"classes": ["a", "a"]}, "classes must be distinct names, got 'a twice'"),
        ({"classes": ["a", "b/c"]}, "classes must be folder names (no '/', not hidden)"),
        ({"image_size": [8, 0]}, "image_size must be positive integers"),
        ({"image_size": [8, 8, 8]}, "image_size must be [height, width] or one size"),
        ({"channels": 2}, "channels must be 1 (grayscale) or 3 (RGB), got 2"),
        ({"resample": "cubic"}, "resample must be one of nearest, box, bilinear"),
        ({"fit": "zoom"}, "fit must be one of stretch, crop, pad"),
        ({"on_error": "ignore"}, "on_error must be one of error, skip"),
        ({"extensions": []}, "extensions must be a file ending or a list of them"),
        ({"test_fraction": 0}, "test_fraction must be a number in (0, 1)"),
        ({"size": 8}, "images: unknown task.options size"),
    ]
    for change, expected in cases:
        with pytest.raises(ValueError) as info:
            images.model_io({**OPTIONS, **change})
        assert expected in _one_line(str(info.value)), (change, str(info.value))
    assert images.model_io({**OPTIONS, "image_size": 12, "channels": 3}) == {
        "input_shape": (3, 12, 12),
        "num_outputs": 3,
    }


# -- dicom: generated folders --------------------------------------------------------------


def _dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    modality: str = "CT",
    sop_class: str = CTImageStorage,
    patient: str = "P0",
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    uid: str | None = None,
) -> Path:
    """One DICOM file: ``pixels`` [H, W] or [frames, H, W] uint16, [H, W, 3] uint8 (RGB), or
    None (no pixel data, e.g. a report)."""
    uid = uid or generate_uid(entropy_srcs=[str(path)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(path), "series"])
    ds.Modality = modality
    ds.PatientID = patient
    if pixels is not None:
        rgb = pixels.ndim == 3 and pixels.shape[-1] == 3
        ds.SamplesPerPixel = 3 if rgb else 1
        ds.PhotometricInterpretation = "RGB" if rgb else photometric
        if rgb:
            ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = pixels.shape[:2] if rgb else pixels.shape[-2:]
        ds.BitsAllocated = ds.BitsStored = 8 if rgb else 16
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if pixels.ndim == 3 and not rgb:
            ds.NumberOfFrames = pixels.shape[0]
        if slope is not None:
            ds.RescaleSlope = f"{slope:g}"
            ds.RescaleIntercept = f"{intercept or 0:g}"
        dtype = np.uint8 if rgb else "<u2"
        ds.PixelData = np.ascontiguousarray(pixels).astype(dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


DICOM_CLASSES = ["normal", "nodule"]
DICOM_OPTIONS = {"labels": "labels.csv", "classes": DICOM_CLASSES, "image_size": 8}
MODALITIES = [
    ("CT", CTImageStorage),
    ("MR", MRImageStorage),
    ("CR", ComputedRadiographyImageStorage),
    ("US", UltrasoundImageStorage),
    ("XA", XRayAngiographicImageStorage),
]


def _labels(path: Path, rows: list[tuple[str, str]], header=("file", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def dicom_dir(tmp_path: Path) -> Path:
    """30 images of 6 patients, every modality (CT with slope/intercept, MR, CR in
    MONOCHROME1, RGB ultrasound, 3-frame XA), labelled by path or by bare file name."""
    rng = np.random.default_rng(1)
    root = tmp_path / "pacs"
    rows = []
    for i in range(30):
        cls = i % 2
        patient = f"P{i // 5}"
        modality, sop_class = MODALITIES[i % len(MODALITIES)]
        base = _picture(rng, 2 * cls, 12, 12)
        if modality == "US":
            pixels = np.rint(np.stack([base] * 3, axis=-1) * 255).astype(np.uint8)
        elif modality == "XA":
            pixels = np.rint(np.stack([base * 0.5, base, base * 0.7]) * 4000).astype(np.uint16)
        else:
            pixels = np.rint(base * 4000).astype(np.uint16)
        if modality == "CR":
            pixels = 4000 - pixels  # MONOCHROME1: high values dark
        rel = f"{patient}/IM{i:03d}"
        _dicom(
            root / rel,
            pixels,
            modality=modality,
            sop_class=sop_class,
            patient=patient,
            photometric="MONOCHROME1" if modality == "CR" else "MONOCHROME2",
            slope=2.0 if modality == "CT" else None,
            intercept=-1024.0 if modality == "CT" else None,
        )
        rows.append((rel if i % 3 else f"IM{i:03d}", DICOM_CLASSES[cls]))
    _labels(root / "labels.csv", rows)
    return root


def test_dicom_loads_every_modality_by_patient(dicom_dir: Path) -> None:
    raw = dicom.load_raw(seed=0, data_dir=dicom_dir, **DICOM_OPTIONS)
    assert raw.info["skipped"] == []
    assert raw.info["modalities"] == {"CR": 6, "CT": 6, "MR": 6, "US": 6, "XA": 6}
    assert raw.info["class_counts"] == {"normal": 15, "nodule": 15}
    assert raw.info["patients"] == 6 and raw.info["split_by"] == "patient"
    assert raw.x_train.shape == (25, 1, 8, 8) and raw.x_test.shape == (5, 1, 8, 8)  # 1 patient
    x = torch.cat([raw.x_train, raw.x_test])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # the percentile window
    assert dicom.model_io(DICOM_OPTIONS) == {"input_shape": (1, 8, 8), "num_outputs": 2}
    assert dicom.split_sizes({**DICOM_OPTIONS, "data_dir": dicom_dir}) == (25, 5)
    assert dicom.split_sizes(DICOM_OPTIONS) is None
    by_image = dicom.load_raw(seed=0, data_dir=dicom_dir, **DICOM_OPTIONS, split_by="image")
    assert len(by_image.y_test) == 6
    rgb = dicom.load_task_data(seed=0, data_dir=dicom_dir, **DICOM_OPTIONS, channels=3)
    assert rgb.x_train.shape[1:] == (3, 8, 8)
    z = torch.cat([rgb.x_train, rgb.x_test]).double()
    assert abs(float(z.mean())) < 1e-6


def test_dicom_pixels_rescaled_inverted_framed_exactly(tmp_path: Path) -> None:
    root = tmp_path / "exact"
    stored = np.full((4, 4), 1000, np.uint16)
    stored[0, 0] = 1100
    _dicom(root / "ct", stored, slope=2.0, intercept=-1024.0, patient="A")
    _dicom(root / "cr", stored, modality="CR", sop_class=ComputedRadiographyImageStorage,
           photometric="MONOCHROME1", patient="B")  # fmt: skip
    frames = np.stack([np.full((4, 4), v, np.uint16) for v in (10, 20, 30)])
    _dicom(root / "xa", frames, modality="XA", sop_class=XRayAngiographicImageStorage)
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[...] = (200, 100, 50)
    _dicom(root / "us", colour, modality="US", sop_class=UltrasoundImageStorage)
    _labels(root / "labels.csv", [(n, "normal") for n in ("ct", "cr", "xa", "us")])
    options = {**DICOM_OPTIONS, "image_size": 4, "intensity": "rescaled", "split_by": "image"}

    def images_of(**change) -> dict[str, np.ndarray]:
        """Each file's image, by name (the reader's list, in file order, before the split)."""
        read = dicom._read_all(root, dicom.parse_options({**options, **change}))
        assert read.skipped == [], read.skipped
        return dict(zip(("cr", "ct", "us", "xa"), read.images, strict=True))

    got = images_of()
    assert got["ct"].shape == (1, 4, 4) and got["ct"].dtype == np.float32
    assert got["ct"][0, 0, 0] == 2 * 1100 - 1024 and got["ct"][0, 1, 1] == 2 * 1000 - 1024
    assert got["cr"][0, 0, 0] == 0.0 and got["cr"][0, 1, 1] == 100.0  # max - value
    assert np.all(got["xa"] == 20.0)  # the middle frame
    assert got["us"][0, 0, 0] == pytest.approx(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert np.all(images_of(frame="first")["xa"] == 10.0)
    assert np.all(images_of(frame=-1)["xa"] == 30.0)
    np.testing.assert_array_equal(images_of(channels=3)["us"][:, 0, 0], [200, 100, 50])
    window = images_of(intensity={"center": 1000, "width": 400})  # [800, 1200] -> [0, 1]
    assert window["ct"][0, 0, 0] == pytest.approx(0.94) and window["ct"][0, 1, 1] == (
        pytest.approx(0.44)
    )
    assert np.all(window["cr"] == 0.0)  # below the window: clipped
    percentile = images_of(intensity="percentile")
    assert percentile["ct"].min() == 0.0 and percentile["ct"].max() == 1.0
    raw = dicom.load_raw(seed=0, data_dir=root, **options)
    assert len(raw.y_train) + len(raw.y_test) == 4
    read = dicom._read_all(root, dicom.parse_options({**options, "frame": 2}))
    assert len(read.images) == 1 and np.all(read.images[0] == 30.0)  # the XA run's third
    assert read.skipped == [
        (str(root / name), "frame 2 out of range for a 1-frame run") for name in ("cr", "ct", "us")
    ]


# -- dicom: unusable files and rows --------------------------------------------------------


def test_dicom_unusable_files_and_rows_are_skipped_with_their_reason(dicom_dir: Path) -> None:
    root = dicom_dir
    rows = list(csv.reader((root / "labels.csv").open(encoding="utf-8")))[1:]
    (root / "notes.txt").write_text("exported by PACS\n")
    _dicom(root / "unlabelled.dcm", np.zeros((6, 6), np.uint16))
    _dicom(root / "report.dcm", None, modality="SR", sop_class=BasicTextSRStorage)
    _dicom(root / "maybe.dcm", np.zeros((6, 6), np.uint16))
    _dicom(root / "conflict.dcm", np.zeros((6, 6), np.uint16))
    cut = _dicom(root / "cut.dcm", np.zeros((32, 32), np.uint16))
    cut.write_bytes(cut.read_bytes()[:1000])
    shutil.copy(root / "P0" / "IM000", root / "copy.dcm")
    rows += [
        ("report.dcm", "normal"),
        ("maybe.dcm", "unsure"),
        ("conflict.dcm", "normal"),
        ("conflict.dcm", "nodule"),
        ("cut.dcm", "normal"),
        ("copy.dcm", "normal"),
        ("P9/gone.dcm", "nodule"),
        ("", "normal"),
    ]
    _labels(root / "labels.csv", rows)
    raw = dicom.load_raw(seed=0, data_dir=root, **DICOM_OPTIONS)
    assert len(raw.y_train) + len(raw.y_test) == 30
    reasons = {Path(path).name: reason for path, reason in raw.info["skipped"]}
    for reason in reasons.values():
        _one_line(reason)
    assert reasons.pop("notes.txt") == "not a DICOM file"
    assert reasons.pop("unlabelled.dcm") == "no row in labels.csv for this file"
    assert reasons.pop("report.dcm") == "no pixel data (not an image: Basic Text SR Storage)"
    assert reasons.pop("maybe.dcm") == (
        "label 'unsure' (labels.csv row 33) is not one of task.options.classes (normal, nodule)"
    )
    assert reasons.pop("conflict.dcm") == (
        "labels.csv rows 34, 35 give it different labels: 'nodule', 'normal'"
    )
    assert reasons.pop("cut.dcm").startswith("truncated DICOM file (1000 bytes: PixelData")
    uid = generate_uid(entropy_srcs=[str(root / "P0" / "IM000")])
    assert reasons.pop("copy.dcm") == f"a copy of P0/IM000 (the same SOP Instance UID {uid})"
    assert reasons.pop("gone.dcm") == "file not found, yet labels.csv row 38 labels it"
    assert reasons.pop("labels.csv") == "row 39: empty file cell"
    assert reasons == {}

    ct_only = dicom.load_raw(seed=0, data_dir=root, **DICOM_OPTIONS, modalities=["ct"])
    assert ct_only.info["modalities"] == {"CT": 6}
    mr = str(root / "P0" / "IM001")
    assert (mr, "modality MR is not in task.options.modalities (CT)") in ct_only.info["skipped"]


def test_dicom_labels_by_sop_instance_uid(dicom_dir: Path) -> None:
    files = sorted(p for p in dicom_dir.rglob("IM*"))
    rows = [
        (generate_uid(entropy_srcs=[str(p)]), DICOM_CLASSES[int(p.name[2:]) % 2]) for p in files
    ]
    rows[4] = ("1.2.3.4", "nodule")  # IM004's row names an image no file holds
    _labels(dicom_dir / "uids.tsv", rows, header=("SOPInstanceUID", "Finding"))
    (dicom_dir / "uids.tsv").write_text((dicom_dir / "uids.tsv").read_text().replace(",", "\t"))
    options = {**DICOM_OPTIONS, "labels": "uids.tsv", "key": "sop_instance_uid"}
    options["label_column"] = "finding"
    raw = dicom.load_raw(seed=0, data_dir=dicom_dir, **options)
    assert len(raw.y_train) + len(raw.y_test) == 29
    by_file = dicom.load_raw(seed=0, data_dir=dicom_dir, **DICOM_OPTIONS)
    skipped = dict(raw.info["skipped"])
    uid = generate_uid(entropy_srcs=[str(files[4])])
    assert skipped.pop(str(files[4])) == f"no row in uids.tsv for its SOP Instance UID {uid}"
    assert skipped.pop(str(dicom_dir / "labels.csv")) == "not a DICOM file"
    assert skipped == {str(dicom_dir / "uids.tsv"): "row 6: no DICOM file has SOP Instance "
                       "UID 1.2.3.4"}  # fmt: skip
    assert by_file.info["class_counts"]["normal"] == raw.info["class_counts"]["normal"] + 1


def test_dicom_folders_without_usable_images_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "export"
    root.mkdir()
    options = {"seed": 0, "data_dir": root, **DICOM_OPTIONS}
    assert _refused(dicom.load_raw, **options) == (
        f"{root / 'labels.csv'}: labels CSV not found (task.options.labels)"
    )
    _labels(root / "labels.csv", [("a.dcm", "normal")], header=("file", "diagnosis"))
    assert _refused(dicom.load_raw, **options) == (
        f"{root / 'labels.csv'}: no column 'label' (task.options.label_column); row 1 has "
        "'file', 'diagnosis'"
    )
    _labels(root / "labels.csv", [("a.dcm", "normal")], header=("file", "Label", "label"))
    assert _refused(dicom.load_raw, **options) == (
        f"{root / 'labels.csv'}: row 1 names column 'label' 2 times (columns 2, 3)"
    )
    _labels(root / "labels.csv", [("a.dcm", "normal"), ("b.dcm", "nodule")])
    assert _refused(dicom.load_raw, **options) == (
        f"{root}: no files to read besides the labels CSV (expected DICOM files, in any "
        "sub-folders)"
    )
    (root / "a.dcm").write_bytes(b"\x89PNG not DICOM")
    _dicom(root / "b.dcm", np.zeros((4, 4), np.uint16))
    assert _refused(dicom.load_raw, **options) == (
        f"{root}: 1 usable DICOM image(s) (1 skipped: a.dcm: not a DICOM file): a site needs "
        "at least 2 (one train, one test)"
    )
    _dicom(root / "a.dcm", np.zeros((4, 4), np.uint16))
    assert _refused(dicom.load_raw, **options).startswith(
        f"{root}: the 2 usable images are of one patient, and split_by: patient"
    )
    assert len(dicom.load_raw(**options, split_by="image").y_train) == 1
    for change, expected in [
        ({"key": "uid"}, "key must be one of file, sop_instance_uid"),
        ({"frame": "max-contrast"}, "frame must be first, middle, last or a frame index"),
        ({"intensity": {"center": 40}}, "intensity must be percentile, rescaled or {center"),
        ({"intensity": {"center": 40, "width": 0}}, "a window of finite center and positive"),
        ({"labels": None}, "dicom: task.options needs labels"),
        ({"channels": 4}, "dicom: task.options.channels must be 1 (grayscale) or 3 (RGB)"),
    ]:
        with pytest.raises(ValueError) as info:
            dicom.model_io({**DICOM_OPTIONS, **change})
        assert expected in _one_line(str(info.value)), (change, str(info.value))


# -- federation statistics and the engine --------------------------------------------------


@pytest.mark.parametrize("source", ["images", "dicom"])
def test_site_statistics_add_up_to_the_pooled_ones(png_dir, dicom_dir, source) -> None:
    module, folder, options = (
        (images, png_dir, OPTIONS) if source == "images" else (dicom, dicom_dir, DICOM_OPTIONS)
    )
    raw = module.load_raw(seed=2, data_dir=folder, **options)
    sites = default_site_partition(raw, num_sites=3, scheme="iid", seed=2)
    shares = [data_stats(s) for s in sites]
    total = sum(shares)
    pooled = data_stats(raw)
    assert (
        total.features.count
        == pooled.features.count
        == raw.x_train[0].numel() * (len(raw.y_train) + len(raw.y_test))
    )
    for name in ("sum", "sum_sq"):
        np.testing.assert_allclose(
            getattr(total.features, name), getattr(pooled.features, name), rtol=1e-12
        )
    np.testing.assert_array_equal(total.features.min, pooled.features.min)
    np.testing.assert_array_equal(total.features.max, pooled.features.max)
    federation = DataStats.from_dict(total.to_dict())  # what the aggregator sends back
    expected = default_site_partition(
        module.load_task_data(seed=2, data_dir=folder, **options),
        num_sites=3,
        scheme="iid",
        seed=2,
    )
    for site, want in zip(sites, expected, strict=True):
        got = prepare(site, federation)
        for name in ("x_train", "x_test"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-5)
        assert got.feature_range == pytest.approx(want.feature_range, rel=1e-6)


@pytest.mark.parametrize("source", ["images", "dicom"])
def test_engine_reaches_the_sources_as_task_modules(png_dir, dicom_dir, source) -> None:
    """Until the registry names them, a config reaches them as task modules."""
    folder, options = (png_dir, OPTIONS) if source == "images" else (dicom_dir, DICOM_OPTIONS)
    config = experiment_from_dict(
        {
            "name": f"{source}-smoke",
            "task": {
                "module": f"federation.tasks.{source}",
                "data_dir": str(folder),
                "options": options,
            },
            "model": {"arch": "cnn", "options": {"channels": [2]}},
            "sites": {"count": 2},
        },
        base=folder,
    )
    model = initial_model(config)
    assert isinstance(model[0], nn.Conv2d) and model[0].in_channels == 1
    data = site_data(config, 1)
    out = model(data.x_train.to(next(model.parameters()).dtype))
    assert out.shape == (len(data.x_train), len(options["classes"]))


@pytest.mark.parametrize("source", ["images", "dicom"])
def test_image_studies_train_encrypted_in_a_federation_equal_to_plaintext(
    png_dir, dicom_dir, tmp_path: Path, source: str
) -> None:
    """A study on an image folder and one on a DICOM folder, from YAML alone: the statistics
    round, then encrypted FedAvg that decrypts to plaintext FedAvg (float64)."""
    folder, options = (png_dir, OPTIONS) if source == "images" else (dicom_dir, DICOM_OPTIONS)
    experiment = tmp_path / f"{source}.yaml"
    experiment.write_text(
        yaml.safe_dump(
            {
                "name": f"{source}-study",
                "task": {"name": source, "data_dir": str(folder), "options": options},
                "model": {"options": {"channels": [3]}},
                "sites": {"count": 2},
                "training": {"rounds": 2, "batch_size": 8, "lr": 0.05, "dtype": "float64"},
                "output_dir": "out",
            }
        ),
        encoding="utf-8",
    )
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    config = server_run_config(experiment, tmp_path / "out", **{protocol.RUN_BASELINE: True})
    serve(LocalGrid(client_app.app, nodes, config), config)
    assert_decrypts_to_plaintext(tmp_path / "out")
    assert "normalisation: federation statistics" in (tmp_path / "out" / "report.md").read_text()
