"""Angiography task: generator, view boxes, DICOM in/out, partitions, model and preview."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from federation.tasks import angio
from federation.tasks.angio import dicom as angio_dicom
from federation.tasks.angio import preview, render
from federation.tasks.angio.views import ARTERIES, VIEW_BOXES, VIEW_CLASSES, view_class
from federation.tasks.base import TaskData
from federation.tasks.dicom_files import select_frame


@pytest.fixture(scope="module")
def task() -> TaskData:
    return angio.load_task_data(seed=4, n_train=240, n_test=48, image_size=32)


def test_generator_is_deterministic_and_seeded() -> None:
    a = render.generate(16, seed=5, image_size=32)
    b = render.generate(16, seed=5, image_size=32)
    c = render.generate(16, seed=6, image_size=32)
    assert np.array_equal(a.images, b.images)
    for field in ("view", "artery", "primary", "secondary", "sid", "scanner", "patient"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.images, c.images)


def test_images_finite_in_range_and_labelled_by_their_angles() -> None:
    data = render.generate(64, seed=1, num_scanners=4, images_per_patient=8)
    assert data.images.shape == (64, 64, 64) and data.images.dtype == np.float32
    assert np.isfinite(data.images).all()
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    assert data.images.std(axis=(1, 2)).min() > 0.05  # no blank images
    assert np.bincount(data.view, minlength=8).tolist() == [8] * 8
    for i in range(len(data)):
        assert view_class(int(data.artery[i]), data.primary[i], data.secondary[i]) == data.view[i]
    assert set(data.scanner) <= {0, 1, 2, 3}
    assert np.all(data.scanner == data.scanner[0::8].repeat(8))  # one scanner per patient


def test_test_patients_are_held_out() -> None:
    train = render.generate(16, seed=2, stream=0, image_size=32)
    test = render.generate(16, seed=2, stream=1, image_size=32)
    assert not set(train.patient_ids) & set(test.patient_ids)
    assert not np.array_equal(train.images, test.images)


@pytest.mark.parametrize("view", range(len(VIEW_CLASSES)))
def test_view_boxes_map_to_their_class(view: int) -> None:
    artery, (p_lo, p_hi), (s_lo, s_hi) = VIEW_BOXES[view]
    name = ARTERIES[artery]
    assert view_class(name, (p_lo + p_hi) / 2, (s_lo + s_hi) / 2) == view
    assert view_class(artery, p_lo, s_hi) == view  # edges are inside
    assert view_class(name.lower(), p_hi, s_lo) == view
    other = 1 - artery
    assert view_class(other, (p_lo + p_hi) / 2, (s_lo + s_hi) / 2) != view


@pytest.mark.parametrize(
    ("artery", "primary", "secondary"),
    [("LCA", 0.0, 0.0), ("RCA", 0.0, 40.0), ("LCA", 90.0, 0.0), ("RCA", 47.0, 11.0)],
)
def test_angles_outside_every_box_have_no_class(
    artery: str, primary: float, secondary: float
) -> None:
    assert view_class(artery, primary, secondary) is None


def test_c_arm_follows_dicom_conventions() -> None:
    d, r, u = render.c_arm_axes(np.array([0.0, 90.0, 0.0]), np.array([0.0, 0.0, 90.0]))
    assert np.allclose(d[0], [0, -1, 0])  # AP: beam posterior -> anterior (LPS: -y)
    assert np.allclose(r[0], [1, 0, 0]) and np.allclose(u[0], [0, 0, 1])  # left right, head up
    assert np.allclose(d[1], [1, 0, 0])  # LAO 90: detector at the patient's left
    assert np.allclose(d[2], [0, 0, 1])  # cranial 90: detector towards the head
    for k in range(3):
        basis = np.stack([d[k], r[k], u[k]])
        assert np.allclose(basis @ basis.T, np.eye(3))


def test_load_task_data_shapes_and_info(task: TaskData) -> None:
    assert task.kind == "classification" and task.num_classes == 8
    assert task.class_names == VIEW_CLASSES and task.feature_range == (0.0, 1.0)
    assert task.x_train.shape == (240, 1, 32, 32) and task.x_train.dtype == torch.float32
    assert task.y_train.dtype == torch.int64 and task.x_test.shape == (48, 1, 32, 32)
    assert torch.equal(task.y_train, torch.from_numpy(task.info["view_train"]))
    assert task.info["scanner_train"].shape == (240,)
    assert task.info["angles_test"].shape == (48, 2)
    artery = angio.load_task_data(seed=4, n_train=16, n_test=8, image_size=32, label="artery")
    assert artery.num_classes == 2 and artery.class_names == ("LCA", "RCA")
    assert set(artery.y_train.tolist()) <= {0, 1}
    with pytest.raises(ValueError):
        angio.load_task_data(n_train=8, n_test=8, label="stenosis")


def _indexed(task: TaskData) -> TaskData:
    """The task with each row's index as its only pixel, to trace rows through a split."""
    n, m = len(task.y_train), len(task.y_test)
    return replace(
        task,
        x_train=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1),
        x_test=torch.arange(m, dtype=torch.float32).view(m, 1, 1, 1),
    )


@pytest.mark.parametrize("scheme", ["iid", "non-iid"])
def test_partitions_are_deterministic_disjoint_and_covering(task: TaskData, scheme: str) -> None:
    data = _indexed(task)
    sites = angio.site_partition(data, num_sites=3, scheme=scheme, seed=7)
    again = angio.site_partition(data, num_sites=3, scheme=scheme, seed=7)
    for split, n in (("train", 240), ("test", 48)):
        rows = [getattr(s, f"x_{split}").flatten().long().numpy() for s in sites]
        assert sorted(np.concatenate(rows).tolist()) == list(range(n))
        for site, same in zip(sites, again, strict=True):
            assert torch.equal(getattr(site, f"x_{split}"), getattr(same, f"x_{split}"))
    for site in sites:
        idx = site.x_train.flatten().long().numpy()
        assert np.array_equal(site.info["scanner_train"], task.info["scanner_train"][idx])
        assert torch.equal(site.y_train, task.y_train[idx])
        assert site.info["partition"]["scheme"] == scheme
    other = angio.site_partition(data, num_sites=3, scheme=scheme, seed=8)
    assert any(not torch.equal(a.x_train, b.x_train) for a, b in zip(sites, other, strict=True))


def test_non_iid_sites_differ_in_scanners_and_views(task: TaskData) -> None:
    def spread(mixes: list[np.ndarray]) -> float:  # least total-variation distance
        return min(0.5 * np.abs(a - b).sum() for i, a in enumerate(mixes) for b in mixes[i + 1 :])

    for scheme in ("non-iid", "iid"):
        sites = angio.site_partition(task, num_sites=3, scheme=scheme, seed=0, alpha=0.5)
        scanners = [np.bincount(s.info["scanner_train"], minlength=3) for s in sites]
        home = [counts.max() / counts.sum() for counts in scanners]
        views = [np.bincount(s.y_train.numpy(), minlength=8) / len(s.y_train) for s in sites]
        if scheme == "non-iid":
            assert sorted(int(counts.argmax()) for counts in scanners) == [0, 1, 2]
            assert min(home) > 0.5 and spread(views) > 0.1
        else:
            assert max(home) < 0.5 and spread(views) < 0.1
    with pytest.raises(ValueError):
        angio.site_partition(task, num_sites=3, scheme="by-hospital", seed=0)


def test_model_uses_only_supported_layers_and_fits_sizes() -> None:
    allowed = (nn.Conv2d, nn.AvgPool2d, nn.Flatten, nn.Linear, nn.Tanh, nn.Sigmoid, nn.Softplus)
    for arch in ("cnn", "mlp"):
        for size, classes in ((64, 8), (32, 2), (128, 8)):
            model = angio.build_model(arch, image_size=size, num_classes=classes)
            assert isinstance(model, nn.Sequential)
            assert all(isinstance(layer, allowed) for layer in model)
            for conv in (m for m in model if isinstance(m, nn.Conv2d)):
                assert conv.groups == 1 and conv.dilation == (1, 1)
            assert model(torch.rand(2, 1, size, size)).shape == (2, classes)
    with pytest.raises(ValueError):
        angio.build_model("vit")


def _write(path: Path, image: np.ndarray, **overrides: object) -> Path:
    options: dict[str, object] = {
        "primary": 40.0,
        "secondary": 25.0,
        "sid": 1010.0,
        "sod": 760.0,
        "pixel_spacing": 0.2,
        "patient_id": "P1",
        "series_description": "LCA injection",
        **overrides,
    }
    return angio_dicom.write_xa(path, image, **options)  # type: ignore[arg-type]


def test_dicom_write_read_round_trip(tmp_path: Path) -> None:
    data = render.generate(8, seed=1, image_size=32, images_per_patient=4)
    paths = angio_dicom.export_synthetic(tmp_path, n=8, seed=1, image_size=32, images_per_patient=4)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries
    ds = pydicom.dcmread(paths[3])
    assert ds.Modality == "XA" and ds.SOPClassUID == pydicom.uid.XRayAngiographicImageStorage
    assert float(ds.PositionerPrimaryAngle) == pytest.approx(data.primary[3], abs=0.006)
    assert float(ds.PositionerSecondaryAngle) == pytest.approx(data.secondary[3], abs=0.006)
    assert float(ds.DistanceSourceToDetector) == pytest.approx(data.sid[3], abs=0.06)
    assert float(ds.DistanceSourceToPatient) == pytest.approx(data.sod[3], abs=0.06)
    assert float(ds.ImagerPixelSpacing[0]) == pytest.approx(data.pixel_spacing[3], rel=1e-5)
    assert ds.StudyInstanceUID != pydicom.dcmread(paths[4]).StudyInstanceUID  # two patients
    assert np.array_equal(ds.pixel_array, np.rint(data.images[3] * 4095).astype(np.uint16))

    read, skipped = angio_dicom.read_folder(tmp_path, image_size=32)
    assert skipped == []
    order = [paths.index(Path(p)) for p in read.paths]
    assert np.array_equal(read.view, data.view[order])
    assert np.array_equal(read.artery, data.artery[order])
    assert np.allclose(read.primary, data.primary[order], atol=0.006)
    assert np.allclose(read.secondary, data.secondary[order], atol=0.006)
    assert np.allclose(read.sid, data.sid[order], atol=0.06)
    assert np.allclose(read.images, data.images[order], atol=3e-3)
    assert len(read.patient_ids) == 2 and len(read.scanner_names) >= 1


def test_multi_frame_run_uses_peak_opacification(tmp_path: Path) -> None:
    mask = 0.45 + 0.3 * np.linspace(0.0, 1.0, 32)[None, :] * np.ones((32, 1))
    vessel = np.zeros((32, 32))
    vessel[10:13, 5:28] = vessel[5:28, 20:22] = 1.0
    frames = np.stack([mask * (1.0 - fill * vessel) for fill in (0.0, 0.3, 0.6, 0.2)])
    _write(tmp_path / "run.dcm", frames)
    assert int(pydicom.dcmread(tmp_path / "run.dcm").NumberOfFrames) == 4
    peak, _ = angio_dicom.read_folder(tmp_path, image_size=32)
    assert np.allclose(peak.images[0], render.normalize_image(frames[2]), atol=3e-3)
    first, _ = angio_dicom.read_folder(tmp_path, image_size=32, frame="first")
    assert np.allclose(first.images[0], render.normalize_image(mask), atol=3e-3)
    none, skipped = angio_dicom.read_folder(tmp_path, image_size=32, frame=7)
    assert len(none) == 0 and "out of range" in skipped[0][1]
    assert select_frame(frames) == 2
    assert select_frame(frames, -1) == 3
    with pytest.raises(ValueError):
        select_frame(frames, "brightest")


def test_resize_and_label_derivation_from_csv(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((48, 64))
    _write(tmp_path / "a.dcm", image, series_description="", primary=45.0, secondary=0.0)
    _write(tmp_path / "sub" / "b.dcm", image, series_description="", primary=-30.0, secondary=-25.0)
    _write(tmp_path / "c.dcm", image, series_description="", primary=None, secondary=None)
    _write(tmp_path / "d.dcm", image, series_description="")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "file,artery,view\na.dcm,right,\nb.dcm,LCA,\nc.dcm,,lca_lao_cranial\nd.dcm,aorta,\n"
    )
    data, skipped = angio_dicom.read_folder(tmp_path, image_size=16, labels_csv=labels)
    names = [Path(p).name for p in data.paths]
    assert names == ["a.dcm", "c.dcm", "b.dcm"]
    assert data.images.shape == (3, 16, 16)
    assert data.view.tolist() == [
        VIEW_CLASSES.index("RCA LAO"),
        VIEW_CLASSES.index("LCA LAO cranial"),  # from the CSV view, no angles needed
        VIEW_CLASSES.index("LCA RAO caudal"),
    ]
    assert data.artery.tolist() == [1, 0, 0]
    assert [(p.name, "unrecognised artery" in r) for p, r in skipped] == [("d.dcm", True)]
    without_csv, reasons = angio_dicom.read_folder(tmp_path, image_size=16)
    assert len(without_csv) == 0
    reasons_by_name = {p.name: r for p, r in reasons}
    assert reasons_by_name.pop("labels.csv") == "not a DICOM file"
    assert "no positioner angles" in reasons_by_name.pop("c.dcm")
    assert all("no artery label" in r for r in reasons_by_name.values())


@pytest.mark.parametrize(
    ("text", "artery"),
    [
        ("LCA LAO cranial", 0),
        ("Cor_RCA_30", 1),
        ("left coronary", 0),
        ("RIGHT", 1),
        ("LCA via right radial", 0),
        ("left and right", None),
        ("ventriculogram", None),
    ],
)
def test_artery_from_free_text(text: str, artery: int | None) -> None:
    assert angio_dicom.parse_artery(text) == artery


def test_unusable_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    image = render.generate(1, seed=0, image_size=32).images[0]
    _write(tmp_path / "good.dcm", image)
    (tmp_path / "notes.txt").write_text("not an image")
    _write(tmp_path / "no_angles.dcm", image, primary=None, secondary=None)
    _write(tmp_path / "outside.dcm", image, primary=0.0, secondary=0.0)
    _write(tmp_path / "unlabelled.dcm", image, series_description="ventriculogram")
    blank = pydicom.dcmread(_write(tmp_path / "no_pixels.dcm", image))
    del blank.PixelData
    blank.save_as(tmp_path / "no_pixels.dcm")
    ct = pydicom.dcmread(_write(tmp_path / "ct.dcm", image))
    ct.Modality, ct.SOPClassUID = "CT", pydicom.uid.CTImageStorage
    ct.save_as(tmp_path / "ct.dcm")
    data, skipped = angio_dicom.read_folder(tmp_path, image_size=32)
    assert [Path(p).name for p in data.paths] == ["good.dcm"]
    reasons = {p.name: r for p, r in skipped}
    assert reasons["notes.txt"] == "not a DICOM file"
    assert "no positioner angles" in reasons["no_angles.dcm"]
    assert "outside every LCA view box" in reasons["outside.dcm"]
    assert "no artery label" in reasons["unlabelled.dcm"]
    assert reasons["no_pixels.dcm"] == "no pixel data"
    assert reasons["ct.dcm"].startswith("not XA")
    by_artery, skipped_artery = angio_dicom.read_folder(tmp_path, image_size=32, label="artery")
    assert {Path(p).name for p in by_artery.paths} == {"good.dcm", "no_angles.dcm", "outside.dcm"}
    assert by_artery.view.tolist().count(-1) == 2 and len(skipped_artery) == 4


def test_task_from_a_dicom_folder_splits_by_patient(tmp_path: Path) -> None:
    angio_dicom.export_synthetic(tmp_path, n=20, seed=2, image_size=32, images_per_patient=4)
    (tmp_path / "README").write_text("PACS export")
    data = angio.load_task_data(data_dir=tmp_path, image_size=32, seed=1, test_fraction=0.4)
    assert data.info["source"] == "dicom"
    assert [Path(p).name for p, _ in data.info["skipped"]] == ["README"]
    assert len(data.y_train) + len(data.y_test) == 20
    train_patients = set(data.info["patient_train"].tolist())
    assert not train_patients & set(data.info["patient_test"].tolist())
    assert data.x_train.shape[1:] == (1, 32, 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="usable"):
        angio.load_task_data(data_dir=empty)


def test_preview_png_is_written_atomically(tmp_path: Path) -> None:
    out = preview.save_preview(tmp_path / "docs" / "preview.png", image_size=32, per_class=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["preview.png"]
    assert out.stat().st_mode & 0o777 == 0o644
