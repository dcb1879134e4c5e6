"""X-ray coronary angiography: synthetic angiograms and the C-arm view-classification task.

Real angiograms never leave a hospital, so the federation gets a generator whose labels are a
property of 3-D anatomy seen through a projection, exactly as in a catheter lab: per-patient
centreline models of the left and right coronary trees (left main, LAD with diagonals and
septals, LCx with obtuse marginals; RCA with acute marginals, PDA and posterolateral branch)
lie on an ellipsoidal heart whose size, orientation and vessel course vary between patients.
A C-arm projects them with DICOM conventions: PositionerPrimaryAngle (0018,1510) is positive
towards LAO, PositionerSecondaryAngle (0018,1511) positive towards cranial, and the source and
detector sit at DistanceSourceToPatient / DistanceSourceToDetector for a perspective
projection. Intensities follow Beer-Lambert through iodine (vessels and the contrast-filled
catheter), ribs, spine, heart shadow and the diaphragm/liver dome, with automatic exposure
control, Poisson quantum noise and Gaussian read noise. Scanner profiles differ in dose, read
noise, iodine contrast and geometry, which is what makes sites non-iid beyond their view mix.

Rendering is vectorised: centreline points are splatted with their projected radii into a
few Gaussian scale layers, and the smooth anatomy uses analytic ray-ellipsoid chords: about
2 ms of one core per 64x64 image, so the default 7,200 images take about 15 s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from federation.atomic import atomic_write
from federation.tasks.base import TaskData, partition_sites

ARTERIES: tuple[str, ...] = ("LCA", "RCA")
"""Binary label: which coronary tree was injected."""

VIEW_CLASSES: tuple[str, ...] = (
    "LCA RAO caudal",
    "LCA AP cranial",
    "LCA LAO cranial",
    "LCA LAO caudal",  # the "spider" view
    "LCA AP caudal",
    "RCA LAO",
    "RCA LAO cranial",
    "RCA RAO",
)
"""The eight standard views, indexed by the ``label="view"`` targets."""

# Per view: artery index, (primary lo, hi), (secondary lo, hi) in degrees, LAO / cranial > 0.
VIEW_BOXES: tuple[tuple[int, tuple[float, float], tuple[float, float]], ...] = (
    (0, (-45.0, -20.0), (-35.0, -15.0)),
    (0, (-30.0, 5.0), (20.0, 45.0)),
    (0, (25.0, 50.0), (20.0, 35.0)),
    (0, (35.0, 60.0), (-40.0, -20.0)),
    (0, (-15.0, 10.0), (-35.0, -20.0)),
    (1, (35.0, 60.0), (-10.0, 10.0)),
    (1, (30.0, 50.0), (12.0, 30.0)),
    (1, (-45.0, -25.0), (-10.0, 10.0)),
)

DEFAULTS: dict[str, object] = {
    # load_task_data
    "seed": 0,  # patients, views, scanners and noise are all drawn from it
    "data_dir": None,  # None: synthesise; else a folder of real XA DICOM (see angio_dicom)
    "n_train": 6000,  # synthetic training images
    "n_test": 1200,  # synthetic test images, from held-out patients
    "image_size": 64,  # images are image_size x image_size
    "label": "view",  # "view" (8 classes) | "artery" (LCA/RCA)
    "num_scanners": 3,  # scanner profiles the synthetic patients are spread over
    "images_per_patient": 8,  # views acquired per synthetic patient (one study)
    "labels_csv": None,  # real data: CSV with columns file and artery and/or view
    "frame": "max-contrast",  # real data: frame of a cine run ("max-contrast" | "first" | ...)
    "test_fraction": 0.2,  # real data: share of patients held out for testing
    # site_partition
    "scheme": "iid",  # "iid" | "non-iid" (scanner homes + Dirichlet view skew)
    "alpha": 0.5,  # Dirichlet concentration of the non-iid view skew
    # build_model
    "arch": "cnn",  # "cnn" | "mlp" | "resnet"
    "channels": 8,  # resnet width
    "blocks": 1,  # resnet residual blocks
    # measured plaintext training recipe (SGD + softmax cross-entropy)
    "epochs": 20,  # 6000 images, ~20 s of one core: 94.9-96.4 % on held-out patients
    "batch_size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 1e-4,
}
"""Documented defaults of every option this task reads, plus its measured training recipe."""

FEATURE_RANGE = (0.0, 1.0)
PRIVATE_DATA_DIR = True
"""``task.data_dir`` is a hospital's own DICOM export (so never encrypt it under the public
simulation key without a warning)."""


def view_class(artery: str | int, primary: float, secondary: float) -> int | None:
    """Index of the view whose angle box holds (primary, secondary) for this artery, or None.

    The artery is needed because LCA and RCA boxes overlap in angle space (an RCA LAO and an
    LCA LAO are acquired at similar angles); box edges count as inside.
    """
    index = int(artery) if isinstance(artery, (int, np.integer)) else ARTERIES.index(artery.upper())
    for view, (art, (p_lo, p_hi), (s_lo, s_hi)) in enumerate(VIEW_BOXES):
        if art == index and p_lo <= primary <= p_hi and s_lo <= secondary <= s_hi:
            return view
    return None


def angle_name(primary: float, secondary: float) -> str:
    """Clinical spelling of C-arm angles, e.g. ``LAO 45 CRA 20``."""
    side = "LAO" if primary >= 0 else "RAO"
    tilt = "CRA" if secondary >= 0 else "CAU"
    return f"{side} {abs(primary):.0f} {tilt} {abs(secondary):.0f}"


@dataclass(frozen=True)
class ScannerProfile:
    """Acquisition chain of one catheter lab; sites differ in these, not only in patients."""

    name: str
    dose: float  # detected quanta per pixel at the exposure-control reference level
    read_noise: float  # Gaussian electronic noise, in quanta
    contrast: float  # iodine attenuation scale (injector, concentration, kVp)
    sid: float  # mean source-to-detector distance, mm
    sod: float  # source-to-isocentre distance, mm
    detector_mm: float  # detector field of view (zoom), mm


_NAMED_SCANNERS = (
    ScannerProfile("flat-panel, standard dose", 1200.0, 2.0, 1.0, 1000.0, 750.0, 200.0),
    ScannerProfile("flat-panel, low dose", 350.0, 6.0, 0.85, 1100.0, 780.0, 220.0),
    ScannerProfile("image intensifier", 220.0, 12.0, 0.75, 950.0, 720.0, 180.0),
)


def scanner_profile(index: int) -> ScannerProfile:
    """Profile of scanner ``index``: three named labs, further ones drawn from its index."""
    if index < len(_NAMED_SCANNERS):
        return _NAMED_SCANNERS[index]
    rng = np.random.default_rng([7919, index])
    return ScannerProfile(
        name=f"scanner {index}",
        dose=float(rng.uniform(200.0, 1500.0)),
        read_noise=float(rng.uniform(1.0, 14.0)),
        contrast=float(rng.uniform(0.7, 1.1)),
        sid=float(rng.uniform(950.0, 1150.0)),
        sod=float(rng.uniform(700.0, 800.0)),
        detector_mm=float(rng.uniform(180.0, 230.0)),
    )


_ROW_FIELDS = (
    "images", "view", "artery", "primary", "secondary", "sid", "sod", "pixel_spacing",
    "scanner", "patient",
)  # fmt: skip


@dataclass(frozen=True)
class AngioSet:
    """Images with their acquisition metadata (synthetic, or read from DICOM).

    ``view`` is -1 where no view box applies (real data labelled by artery only); ``patient``
    and ``scanner`` index ``patient_ids`` / ``scanner_names`` where those are known.
    """

    images: np.ndarray  # float32 [N, H, W] in FEATURE_RANGE, vessels dark
    view: np.ndarray  # int64 [N]
    artery: np.ndarray  # int64 [N], index into ARTERIES
    primary: np.ndarray  # float64 [N], degrees, LAO > 0
    secondary: np.ndarray  # float64 [N], degrees, cranial > 0
    sid: np.ndarray  # float64 [N], source-to-detector distance, mm
    sod: np.ndarray  # float64 [N], source-to-patient (isocentre) distance, mm
    pixel_spacing: np.ndarray  # float64 [N], detector (imager) pixel spacing, mm
    scanner: np.ndarray  # int64 [N]
    patient: np.ndarray  # int64 [N]
    scanner_names: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.images)

    def take(self, idx: np.ndarray) -> AngioSet:
        """The rows ``idx`` (names tables are kept whole so indices stay valid)."""
        idx = np.asarray(idx, dtype=np.int64)
        rows = {name: getattr(self, name)[idx] for name in _ROW_FIELDS}
        paths = tuple(self.paths[i] for i in idx) if self.paths else ()
        return replace(self, **rows, paths=paths)


def normalize_image(images: np.ndarray) -> np.ndarray:
    """Map each image's 0.5-99.5 percentile window to [0, 1] (float32, clipped).

    Used for synthetic and real images alike so that exposure, bit depth and windowing of a
    scanner do not leak into the pixel range the model and the encryption see.
    """
    flat = images.reshape(*images.shape[:-2], -1).astype(np.float32)
    lo, hi = np.percentile(flat, [0.5, 99.5], axis=-1, keepdims=True)
    out = (flat - lo) / np.maximum(hi - lo, 1e-6)
    return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(images.shape)


# ---------------------------------------------------------------------------------------------
# Anatomy. Patient axes are DICOM LPS: x to the patient's left, y posterior, z to the head. The
# heart is a half-ellipsoid: s runs from the atrioventricular groove (0) to the apex (1) along
# the long axis a; phi is the azimuth around it, 0 at the anterior interventricular groove,
# +90 deg over the LV lateral wall (vector n), 180 deg at the posterior groove, -90 deg over
# the RV free wall; rho scales the local radius (1: epicardium, < 1: inside the septum).

_Patients = dict[str, np.ndarray]


def _patients(rng: np.random.Generator, count: int) -> _Patients:
    """Per-patient heart geometry, vessel calibre and tortuosity, thorax and diaphragm."""

    def uniform(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, count)

    az = np.radians(uniform(35.0, 55.0))  # long axis: from anterior towards the left
    el = np.radians(uniform(-40.0, -20.0))  # apex below the base
    roll = np.radians(uniform(-15.0, 15.0))
    a = np.stack([np.cos(el) * np.sin(az), -np.cos(el) * np.cos(az), np.sin(el)], axis=1)
    n0 = np.stack([np.cos(az), np.sin(az), np.zeros(count)], axis=1)  # septum normal, to the LV
    n = n0 * np.cos(roll)[:, None] + np.cross(a, n0) * np.sin(roll)[:, None]
    return {
        "a": a,
        "n": n,
        "g": np.cross(a, n),  # towards the anterior interventricular groove
        "length": uniform(85.0, 105.0),  # AV groove to apex, mm
        "radius": uniform(40.0, 50.0),  # AV groove radius, mm
        "calibre": uniform(0.85, 1.15),
        "tortuosity": uniform(0.0, 1.0),
        "spine_x": uniform(-35.0, -15.0),  # relative to the heart centre, mm
        "spine_y": uniform(70.0, 95.0),
        "dome": uniform(-75.0, -50.0),  # right hemidiaphragm top, relative to the heart centre
        "dome_drop": uniform(5.0, 25.0),  # left dome lower than the right
        "thorax_w": uniform(120.0, 150.0),
        "thorax_d": uniform(70.0, 90.0),
        "rib_phase": uniform(0.0, 28.0),
        "body": uniform(0.6, 1.4),  # soft-tissue thickness (attenuation offset)
        "offset": rng.normal(0.0, 6.0, (count, 3)),  # table position of the heart, mm
    }


def _on_heart(pat: _Patients, s: np.ndarray, phi: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """3-D points (P, M, 3), relative to the heart centre, of heart coordinates (P, M)."""
    rad = pat["radius"][:, None] * rho * np.sqrt(np.clip(1.0 - s**2, 0.0, None))
    axial = (s - 0.4) * pat["length"][:, None]
    return (
        axial[..., None] * pat["a"][:, None, :]
        + (rad * np.cos(phi))[..., None] * pat["g"][:, None, :]
        + (rad * np.sin(phi))[..., None] * pat["n"][:, None, :]
    )


@dataclass
class _Tree:
    """Sampled centrelines of one artery for every patient: points, radii, sample lengths."""

    points: np.ndarray  # (P, N, 3) mm, relative to the heart centre
    radius: np.ndarray  # (P, N) mm, 0 for an absent branch
    length: np.ndarray  # (P, N) mm of centreline each sample stands for


def _sample_lengths(points: np.ndarray) -> np.ndarray:
    """Centreline length each point represents (half of each neighbouring segment)."""
    seg = np.linalg.norm(np.diff(points, axis=1), axis=-1)
    out = np.zeros(points.shape[:2])
    out[:, 1:] += seg / 2
    out[:, :-1] += seg / 2
    return out


def _join(parts: list[tuple[np.ndarray, np.ndarray]]) -> _Tree:
    points = np.concatenate([p for p, _ in parts], axis=1)
    radius = np.concatenate([r for _, r in parts], axis=1)
    length = np.concatenate([_sample_lengths(p) for p, _ in parts], axis=1)
    return _Tree(points, radius, length)


class _Branches:
    """Draws the branches of both trees for a batch of patients (vectorised over patients)."""

    def __init__(self, rng: np.random.Generator, pat: _Patients, step: float) -> None:
        self.rng, self.pat, self.step = rng, pat, step
        self.count = len(pat["length"])

    def _u(self, lo: float, hi: float) -> np.ndarray:
        return self.rng.uniform(lo, hi, (self.count, 1))

    def _t(self, nominal_mm: float) -> np.ndarray:
        return np.linspace(0.0, 1.0, max(4, math.ceil(nominal_mm / self.step) + 1))[None, :]

    def _wiggle(self, t: np.ndarray, amp: np.ndarray) -> np.ndarray:
        """Smooth tortuosity that vanishes at the branch origin (stays attached)."""
        out = np.zeros_like(t * amp)
        for lo, hi, share in ((0.7, 1.6, 0.7), (1.8, 3.5, 0.3)):
            freq, phase = self._u(lo, hi), self._u(0.0, 2 * np.pi)
            out += share * amp * (np.sin(2 * np.pi * freq * t + phase) - np.sin(phase))
        return out

    def _radius(self, t: np.ndarray, r0: float, r1: float, present: float) -> np.ndarray:
        keep = (self.rng.random((self.count, 1)) < present).astype(float)
        return (r0 + (r1 - r0) * t) * self.pat["calibre"][:, None] * keep

    def _sides(
        self, parent: tuple[np.ndarray, np.ndarray], lo: float, hi: float, count: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Origins (s, phi) of ``count`` side branches spread along the parent's [lo, hi]."""
        s, phi = parent
        at = np.sort(self.rng.uniform(lo, hi, (self.count, count)), axis=1)
        idx = np.rint(at * (s.shape[1] - 1)).astype(int)
        return [
            (
                np.take_along_axis(s, idx[:, k : k + 1], 1),
                np.take_along_axis(phi, idx[:, k : k + 1], 1),
            )
            for k in range(count)
        ]

    def _line(
        self, start: np.ndarray, end: np.ndarray, nominal_mm: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Straight 3-D segment (ostium to groove), returned with its parameter t."""
        t = self._t(nominal_mm)
        return start[:, None, :] + (end - start)[:, None, :] * t[..., None], t

    def left(self) -> tuple[_Tree, np.ndarray]:
        """Left coronary tree and its ostium."""
        pat, deg = self.pat, np.radians
        tort = pat["tortuosity"][:, None]
        s_b, phi_b = self._u(-0.02, 0.04), deg(self._u(20.0, 35.0))
        one = np.ones((self.count, 1))
        ostium = _on_heart(pat, -0.1 * one, deg(15.0) * one, 0.7 * one)[:, 0]
        bifurcation = _on_heart(pat, s_b, phi_b, 1.02 * one)[:, 0]
        lm, t_lm = self._line(ostium, bifurcation, 25.0)
        parts = [(lm, self._radius(t_lm, 2.1, 1.9, 1.0))]

        t = self._t(150.0)  # LAD down the anterior interventricular groove
        s_end, phi_end = self._u(0.85, 0.97), deg(self._u(-8.0, 8.0))
        lad_s = s_b + (s_end - s_b) * t + self._wiggle(t, 0.005 + 0.015 * tort)
        lad_phi = phi_end + (phi_b - phi_end) * np.exp(-t / 0.07)
        lad_phi = lad_phi + self._wiggle(t, deg(1.0 + 5.0 * tort))
        parts.append((_on_heart(pat, lad_s, lad_phi, 1.02 + 0 * t), self._radius(t, 1.8, 0.6, 1.0)))

        t = self._t(110.0)  # LCx in the left atrioventricular groove
        phi_end = deg(self._u(110.0, 160.0))
        cx_s = s_b + 0.03 * t + self._u(0.0, 0.1) * t**2 + self._wiggle(t, 0.004 + 0.01 * tort)
        cx_phi = phi_b + (phi_end - phi_b) * t + self._wiggle(t, deg(1.0 + 3.0 * tort))
        parts.append((_on_heart(pat, cx_s, cx_phi, 1.02 + 0 * t), self._radius(t, 1.6, 0.7, 1.0)))

        for k, (s0, phi0) in enumerate(self._sides((lad_s, lad_phi), 0.1, 0.55, 3)):
            t = self._t(70.0)  # diagonals over the LV anterolateral wall
            s = s0 + np.minimum(self._u(0.25, 0.5), 0.95 - s0) * t + self._wiggle(t, 0.01 * tort)
            phi = phi0 + deg(self._u(40.0, 80.0)) * t + self._wiggle(t, deg(4.0 * tort))
            radius = self._radius(t, 1.1 - 0.15 * k, 0.45, (0.95, 0.8, 0.5)[k])
            parts.append((_on_heart(pat, s, phi, 1.02 + 0 * t), radius))
        for k, (s0, phi0) in enumerate(self._sides((lad_s, lad_phi), 0.08, 0.6, 4)):
            t = self._t(35.0)  # septals dive into the septum
            s = s0 + self._u(0.05, 0.2) * t
            phi = phi0 + deg(self._u(-4.0, 4.0)) * t
            rho = 1.0 + (self._u(0.45, 0.75) - 1.0) * t
            radius = self._radius(t, 0.6, 0.3, (0.9, 0.8, 0.7, 0.5)[k])
            parts.append((_on_heart(pat, s, phi, rho), radius))
        for k, (s0, phi0) in enumerate(self._sides((cx_s, cx_phi), 0.25, 0.95, 3)):
            t = self._t(80.0)  # obtuse marginals down the lateral wall
            s = s0 + (self._u(0.45, 0.85) - s0) * t + self._wiggle(t, 0.01 * tort)
            phi = phi0 + deg(self._u(-15.0, 15.0)) * t + self._wiggle(t, deg(4.0 * tort))
            radius = self._radius(t, 1.1, 0.45, (0.95, 0.85, 0.6)[k])
            parts.append((_on_heart(pat, s, phi, 1.02 + 0 * t), radius))
        return _join(parts), ostium

    def right(self) -> tuple[_Tree, np.ndarray]:
        """Right coronary tree (right dominant) and its ostium."""
        pat, deg = self.pat, np.radians
        tort = pat["tortuosity"][:, None]
        one = np.ones((self.count, 1))
        ostium = _on_heart(pat, -0.1 * one, deg(-25.0) * one, 0.7 * one)[:, 0]
        phi_r = deg(self._u(-45.0, -30.0))
        groove = _on_heart(pat, 0.0 * one, phi_r, 1.02 * one)[:, 0]
        proximal, t_p = self._line(ostium, groove, 30.0)
        parts = [(proximal, self._radius(t_p, 1.9, 1.85, 1.0))]

        t = self._t(150.0)  # around the right atrioventricular groove to the crux
        phi_crux = deg(-180.0 + self._u(-15.0, 15.0))
        ring_s = self._u(0.0, 0.06) * np.sin(np.pi * t) + self._wiggle(t, 0.004 + 0.01 * tort)
        ring_phi = phi_r + (phi_crux - phi_r) * t + self._wiggle(t, deg(1.0 + 3.0 * tort))
        parts.append(
            (_on_heart(pat, ring_s, ring_phi, 1.02 + 0 * t), self._radius(t, 1.85, 1.3, 1.0))
        )

        for k, (s0, phi0) in enumerate(self._sides((ring_s, ring_phi), 0.2, 0.7, 2)):
            t = self._t(60.0)  # acute marginals over the RV free wall
            s = s0 + (self._u(0.35, 0.65) - s0) * t + self._wiggle(t, 0.01 * tort)
            phi = phi0 + deg(self._u(-12.0, 12.0)) * t + self._wiggle(t, deg(4.0 * tort))
            radius = self._radius(t, 0.9, 0.4, (0.9, 0.65)[k])
            parts.append((_on_heart(pat, s, phi, 1.02 + 0 * t), radius))
        s_crux, phi_end = ring_s[:, -1:], ring_phi[:, -1:]
        t = self._t(90.0)  # PDA down the posterior interventricular groove
        s = s_crux + (self._u(0.55, 0.85) - s_crux) * t + self._wiggle(t, 0.006 + 0.01 * tort)
        phi = phi_end + deg(self._u(-6.0, 6.0)) * t + self._wiggle(t, deg(1.0 + 4.0 * tort))
        parts.append((_on_heart(pat, s, phi, 1.02 + 0 * t), self._radius(t, 1.2, 0.5, 1.0)))
        t = self._t(50.0)  # posterolateral branch towards the LV inferior wall
        s = s_crux + self._u(0.1, 0.35) * t**2
        phi = phi_end - deg(self._u(25.0, 45.0)) * t + self._wiggle(t, deg(3.0 * tort))
        parts.append((_on_heart(pat, s, phi, 1.02 + 0 * t), self._radius(t, 1.0, 0.45, 0.8)))
        return _join(parts), ostium


def _catmull_rom(control: np.ndarray, counts: list[int]) -> np.ndarray:
    """Smooth curve through control points (P, K, 3), ``counts[i]`` samples per segment."""
    padded = np.concatenate([control[:, :1], control, control[:, -1:]], axis=1)
    pieces = []
    for i, m in enumerate(counts):
        p0, p1, p2, p3 = (padded[:, i + j, None, :] for j in range(4))
        t = np.linspace(0.0, 1.0, m, endpoint=i == len(counts) - 1)[None, :, None]
        pieces.append(
            0.5
            * (
                2 * p1
                + (p2 - p0) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (3 * p1 - p0 - 3 * p2 + p3) * t**3
            )
        )
    return np.concatenate(pieces, axis=1)


def _catheter(rng: np.random.Generator, pat: _Patients, ostium: np.ndarray, step: float) -> _Tree:
    """Contrast-filled guiding catheter: ostium, ascending aorta, arch, descending aorta."""
    count = len(ostium)
    root = _on_heart(
        pat, np.full((count, 1), -0.15), np.zeros((count, 1)), np.full((count, 1), 0.35)
    )
    bends = np.array(
        [
            [-8.0, -6.0, 35.0],
            [-4.0, 5.0, 75.0],
            [12.0, 28.0, 95.0],
            [26.0, 40.0, 70.0],
            [28.0, 42.0, -20.0],
            [28.0, 42.0, -220.0],
        ]
    )
    jitter = rng.normal(0.0, 6.0, (count, len(bends), 3))
    control = np.concatenate([ostium[:, None, :], root[:, 0, None, :] + bends + jitter], axis=1)
    nominal = [45.0, 42.0, 35.0, 32.0, 90.0, 200.0]
    points = _catmull_rom(control, [max(2, math.ceil(1.6 * mm / step)) for mm in nominal])
    return _Tree(points, np.full(points.shape[:2], 0.9), _sample_lengths(points))


def _ribs(pat: _Patients, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Rib centrelines (P, N, 3) relative to the heart centre and their bone length (P, N).

    Each rib leaves the spine, sweeps laterally around the thorax and descends anteriorly; the
    anterior costal cartilage is much less dense than the posterior bone.
    """
    count = len(pat["length"])
    w, d = pat["thorax_w"][:, None, None], pat["thorax_d"][:, None, None]
    theta = np.linspace(0.2, 2.6, max(8, math.ceil(330.0 / step)))[None, None, :]
    level = (pat["rib_phase"][:, None] + 150.0 - 28.0 * np.arange(12)[None, :])[:, :, None]
    sides = []
    for side in (-1.0, 1.0):
        x = pat["spine_x"][:, None, None] + side * w * np.sin(theta)
        y = pat["spine_y"][:, None, None] + 15.0 - d * (1.0 - np.cos(theta))
        z = level - 35.0 * (1.0 - np.cos(theta))
        sides.append(np.stack(np.broadcast_arrays(x, y, z), axis=-1))
    ribs = np.concatenate(sides, axis=1)  # (P, 24, T, 3)
    length = _sample_lengths(ribs.reshape(-1, ribs.shape[2], 3)).reshape(ribs.shape[:3])
    density = np.where(theta > 2.1, 0.35, 1.0)
    return ribs.reshape(count, -1, 3), (length * density).reshape(count, -1)


# ---------------------------------------------------------------------------------------------
# C-arm projection and rendering.

_MU_IODINE = 0.25  # attenuation of contrast-filled lumen relative to blood, 1/mm
_MU_BONE = 0.012  # ribs and vertebrae relative to soft tissue, 1/mm
_RIB_RADIUS = 5.0  # mm
_SIGMA0 = 0.6  # finest splat scale, pixels


def c_arm_axes(primary: np.ndarray, secondary: np.ndarray) -> tuple[np.ndarray, ...]:
    """Beam direction d (source to detector), image right r and image up u, each (B, 3).

    Primary rotates about the patient's long axis (LAO: detector to the patient's left),
    secondary then tilts the detector towards the head (cranial). In AP the patient's left
    shows on the image's right and the head at the top, as angiograms are displayed.
    """
    a, b = np.radians(primary), np.radians(secondary)
    d = np.stack([np.sin(a) * np.cos(b), -np.cos(a) * np.cos(b), np.sin(b)], axis=-1)
    r = np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], axis=-1)
    u = np.stack([-np.sin(a) * np.sin(b), np.cos(a) * np.sin(b), np.cos(b)], axis=-1)
    return d, r, u


@dataclass
class _Views:
    """Per-image geometry of one rendering batch (arrays over images)."""

    primary: np.ndarray
    secondary: np.ndarray
    sid: np.ndarray
    sod: np.ndarray
    spacing: np.ndarray  # detector mm per pixel
    size: int

    def axes(self) -> tuple[np.ndarray, ...]:
        return c_arm_axes(self.primary, self.secondary)


def _project(views: _Views, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column, row and magnification of world points (B, N, 3) on each image's detector."""
    d, r, u = views.axes()
    rel = points + (views.sod[:, None] * d)[:, None, :]  # source at -SOD * d
    depth = np.einsum("bnk,bk->bn", rel, d)
    mag = views.sid[:, None] / depth
    centre = (views.size - 1) / 2
    col = centre + np.einsum("bnk,bk->bn", rel, r) * mag / views.spacing[:, None]
    row = centre - np.einsum("bnk,bk->bn", rel, u) * mag / views.spacing[:, None]
    return col, row, mag


def _fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: pocketfft is several times slower on large prime factors."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _splat(views: _Views, points: np.ndarray, volume: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Projected line integral (B, H, W) of tubes sampled at ``points``.

    ``volume`` is each sample's attenuation volume (mu * pi r^2 * length); dividing by the
    pixel's footprint in the object plane turns it into a line integral. Each sample is
    deposited bilinearly into the two Gaussian scale layers bracketing its projected radius
    (sigma = r / 2 matches the second moment of a cylinder's chord profile); the layers are
    blurred in the Fourier domain and summed, so the work is O(points + pixels), not a
    stencil per point. A margin keeps blur from wrapping round and lets samples just outside
    the field still shade its edge.
    """
    size, batch = views.size, len(views.sid)
    col, row, mag = _project(views, points)
    weight = (volume * (mag / views.spacing[:, None]) ** 2).astype(np.float32)
    sigma = np.maximum(radius * mag / views.spacing[:, None] / 2, _SIGMA0)
    levels = max(1, math.ceil(math.log2(float(sigma.max()) / _SIGMA0)) + 1)
    grid = _fft_size(size + 2 * math.ceil(3 * _SIGMA0 * 2.0 ** (levels - 1)) + 2)
    margin = (grid - size) // 2
    lam = np.clip(np.log2(sigma / _SIGMA0), 0, levels - 1)
    lo = np.floor(lam).astype(np.int64)
    frac = (lam - lo).astype(np.float32)
    col, row = col + margin, row + margin
    c0, r0 = np.floor(col).astype(np.int64), np.floor(row).astype(np.int64)
    fc, fr = (col - c0).astype(np.float32), (row - r0).astype(np.float32)
    keep = (c0 >= 0) & (c0 < grid - 1) & (r0 >= 0) & (r0 < grid - 1) & (weight > 0)
    image = np.broadcast_to(np.arange(batch)[:, None], keep.shape)[keep]
    lo, frac, c0, r0, fc, fr, weight = (v[keep] for v in (lo, frac, c0, r0, fc, fr, weight))
    idx_parts, w_parts = [], []
    for level, wl in ((lo, 1 - frac), (np.minimum(lo + 1, levels - 1), frac)):
        base = ((image * levels + level) * grid + r0) * grid + c0
        for offset, wo in (
            (0, (1 - fc) * (1 - fr)),
            (1, fc * (1 - fr)),
            (grid, (1 - fc) * fr),
            (grid + 1, fc * fr),
        ):
            idx_parts.append(base + offset)
            w_parts.append(weight * wl * wo)
    acc = np.bincount(
        np.concatenate(idx_parts), np.concatenate(w_parts), minlength=batch * levels * grid**2
    ).reshape(batch, levels, grid, grid)
    freq2 = np.fft.fftfreq(grid)[:, None] ** 2 + np.fft.rfftfreq(grid)[None, :] ** 2
    sigmas = _SIGMA0 * 2.0 ** np.arange(levels)
    transfer = torch.from_numpy(
        np.exp(-2 * np.pi**2 * sigmas[:, None, None] ** 2 * freq2).astype(np.float32)
    )
    spectrum = torch.fft.rfft2(torch.from_numpy(acc.astype(np.float32)))
    out = torch.fft.irfft2((spectrum * transfer).sum(dim=1), s=(grid, grid)).numpy()
    return out[:, margin : margin + size, margin : margin + size]


class _Rays:
    """Per-pixel rays of a batch: w = SID d + x r + y u (x, y on the detector, in mm).

    x varies along columns and y along rows only, so ray-quadric coefficients are built from
    (B, 1, W) and (B, H, 1) pieces and a handful of full-size operations.
    """

    def __init__(self, views: _Views) -> None:
        self.views = views
        self.d, self.r, self.u = views.axes()
        half = (views.size - 1) / 2
        grid = np.arange(views.size) - half
        spacing = views.spacing[:, None, None]
        self.x = (grid[None, None, :] * spacing).astype(np.float32)  # (B, 1, W)
        self.y = (-grid[None, :, None] * spacing).astype(np.float32)  # (B, H, 1)
        self.sid = views.sid[:, None, None].astype(np.float32)
        self.norm = np.sqrt(self.sid**2 + self.x**2 + self.y**2)  # (B, H, W)
        self.source = -views.sod[:, None] * self.d

    def chords(
        self, centre: np.ndarray, axes: np.ndarray, semi: np.ndarray, depth: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Path length (B, H, W) of every pixel's ray through an ellipsoid (+ mid-chord z).

        ``axes`` (B, 3, 3) holds the unit semi-axis directions as rows, ``semi`` (B, 3)
        their lengths; with ``depth`` also the z of each chord's midpoint.
        """
        scale = axes / semi[:, :, None]
        o = np.einsum("bij,bj->bi", scale, self.source - centre)
        md, mr, mu = (np.einsum("bij,bj->bi", scale, v) for v in (self.d, self.r, self.u))

        def dot(p: np.ndarray, q: np.ndarray) -> np.ndarray:
            return np.einsum("bi,bi->b", p, q)[:, None, None].astype(np.float32)

        sid, x, y = self.sid, self.x, self.y
        qa = (
            (sid**2 * dot(md, md) + 2 * sid * y * dot(md, mu) + y**2 * dot(mu, mu))
            + (2 * sid * x * dot(md, mr) + x**2 * dot(mr, mr))
            + 2 * dot(mr, mu) * (y * x)
        )
        qb = 2 * (sid * dot(o, md) + y * dot(o, mu)) + 2 * x * dot(o, mr)
        qc = dot(o, o) - 1.0
        disc = np.maximum(qb * qb - 4 * qa * qc, 0.0)
        chord = np.sqrt(disc) / qa * self.norm
        if not depth:
            return chord, None
        t_mid = -qb / (2 * qa)
        d, r, u = (v[:, 2:3, None].astype(np.float32) for v in (self.d, self.r, self.u))
        lead = self.source[:, 2:3, None].astype(np.float32)
        return chord, lead + t_mid * ((sid * d + y * u) + x * r)


def _background(views: _Views, pat: _Patients, heart: np.ndarray) -> np.ndarray:
    """Line integral (B, H, W) of thorax, heart shadow, spine and diaphragm/abdomen domes."""
    batch = len(heart)
    rays = _Rays(views)
    eye = np.broadcast_to(np.eye(3), (batch, 3, 3))

    def vec(*parts: float | np.ndarray) -> np.ndarray:
        return np.stack(np.broadcast_arrays(*parts, np.zeros(batch))[:3], axis=1)

    spine = heart + vec(pat["spine_x"], pat["spine_y"], 0.0)
    thorax = vec(pat["thorax_w"] + 20.0, 120.0, 400.0)
    total = 0.0025 * rays.chords(spine + vec(0.0, -60.0, 0.0), eye, thorax)[0]
    total += pat["body"][:, None, None].astype(np.float32)
    heart_axes = np.stack([pat["a"], pat["g"], pat["n"]], axis=1)
    heart_semi = vec(0.72 * pat["length"], 1.05 * pat["radius"], 1.05 * pat["radius"])
    centre = heart - 0.1 * pat["length"][:, None] * pat["a"]
    total += 0.003 * rays.chords(centre, heart_axes, heart_semi)[0]
    chord, z_mid = rays.chords(spine, eye, vec(24.0, 20.0, 400.0), depth=True)
    assert z_mid is not None
    phase = (heart[:, 2] + pat["rib_phase"])[:, None, None].astype(np.float32)
    disc = np.cos(np.float32(np.pi / 28.0) * (z_mid - phase)) ** 8
    total += _MU_BONE * chord * (1.0 - 0.35 * disc)
    dome_r = heart + vec(pat["spine_x"] - 60.0, 20.0, pat["dome"] - 110.0)
    total += 0.006 * rays.chords(dome_r, eye, vec(110.0, 110.0, 110.0))[0]
    dome_l = heart + vec(pat["spine_x"] + 90.0, 0.0, pat["dome"] - pat["dome_drop"] - 100.0)
    total += 0.004 * rays.chords(dome_l, eye, vec(90.0, 100.0, 100.0))[0]
    return total


@dataclass
class _Acquisition:
    """Everything drawn per image, before rendering."""

    view: np.ndarray
    artery: np.ndarray
    patient: np.ndarray
    scanner: np.ndarray
    primary: np.ndarray
    secondary: np.ndarray
    sid: np.ndarray
    sod: np.ndarray
    spacing: np.ndarray  # detector mm per pixel
    pan: np.ndarray  # (N, 3) table pan and breathing, mm
    cardiac: np.ndarray  # heart scale over the cardiac cycle
    contrast: np.ndarray  # iodine scale: scanner chain times this run's filling
    dose: np.ndarray
    read_noise: np.ndarray


def _acquisitions(
    rng: np.random.Generator,
    n: int,
    size: int,
    patient_scanner: np.ndarray,
    per_patient: int,
    profiles: list[ScannerProfile],
) -> _Acquisition:
    view = rng.permutation(np.arange(n) % len(VIEW_CLASSES))
    boxes = np.array([[*p, *s] for _, p, s in VIEW_BOXES])[view]
    patient = np.arange(n) // per_patient
    scanner = patient_scanner[patient]

    def per_image(field: str) -> np.ndarray:
        return np.array([getattr(p, field) for p in profiles])[scanner]

    return _Acquisition(
        view=view,
        artery=np.array([art for art, _, _ in VIEW_BOXES])[view],
        patient=patient,
        scanner=scanner,
        primary=rng.uniform(boxes[:, 0], boxes[:, 1]),
        secondary=rng.uniform(boxes[:, 2], boxes[:, 3]),
        sid=per_image("sid") + rng.uniform(-60.0, 60.0, n),
        sod=per_image("sod"),
        spacing=per_image("detector_mm") / size,
        pan=rng.normal(0.0, 6.0, (n, 3)),
        cardiac=rng.uniform(0.93, 1.04, n),
        contrast=per_image("contrast") * rng.uniform(0.7, 1.2, n),
        dose=per_image("dose"),
        read_noise=per_image("read_noise"),
    )


def generate(
    n: int,
    *,
    seed: int = 0,
    stream: int = 0,
    image_size: int = 64,
    num_scanners: int = 3,
    images_per_patient: int = 8,
    chunk: int = 256,
) -> AngioSet:
    """``n`` synthetic angiograms of ``ceil(n / images_per_patient)`` patients.

    Views are balanced (each class ``n // 8`` or one more); each image's angles are uniform in
    its view's box. Patients and all randomness come from ``(seed, stream)``: streams are
    disjoint patient populations, so training (stream 0) and test (stream 1) never share a
    patient. Each patient is imaged on one of ``num_scanners`` scanner profiles. Images are
    rendered ``chunk`` at a time to bound memory.
    """
    if n < 1 or image_size < 8 or num_scanners < 1 or images_per_patient < 1:
        raise ValueError("need n >= 1, image_size >= 8, num_scanners >= 1, images_per_patient >= 1")
    rng = np.random.default_rng([seed, stream])
    count = math.ceil(n / images_per_patient)
    pat = _patients(rng, count)
    patient_scanner = rng.integers(0, num_scanners, count)
    step = 150.0 / image_size  # about one object-plane pixel: splats overlap smoothly
    branches = _Branches(rng, pat, step)
    trees = [branches.left(), branches.right()]
    iodine = [(tree, _catheter(rng, pat, ostium, step)) for tree, ostium in trees]
    width = max(t.points.shape[1] + c.points.shape[1] for t, c in iodine)
    points = np.zeros((2, count, width, 3))
    volume = np.zeros((2, count, width))
    radius = np.zeros((2, count, width))
    for art, (tree, cath) in enumerate(iodine):
        pts = np.concatenate([tree.points, cath.points], axis=1)
        rad = np.concatenate([tree.radius, cath.radius], axis=1)
        seg = np.concatenate([tree.length, cath.length], axis=1)
        m = pts.shape[1]
        points[art, :, :m], radius[art, :, :m] = pts, rad
        volume[art, :, :m] = _MU_IODINE * np.pi * rad**2 * seg
    rib_points, rib_length = _ribs(pat, 2 * step)
    rib_volume = _MU_BONE * np.pi * _RIB_RADIUS**2 * rib_length

    profiles = [scanner_profile(k) for k in range(num_scanners)]
    acq = _acquisitions(rng, n, image_size, patient_scanner, images_per_patient, profiles)
    images = np.empty((n, image_size, image_size), dtype=np.float32)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        pid, art = acq.patient[sl], acq.artery[sl]
        views = _Views(
            acq.primary[sl],
            acq.secondary[sl],
            acq.sid[sl],
            acq.sod[sl],
            acq.spacing[sl],
            image_size,
        )
        heart = pat["offset"][pid] + acq.pan[sl]
        sub = {key: value[pid] for key, value in pat.items()}
        vessels = points[art, pid] * acq.cardiac[sl, None, None] + heart[:, None, :]
        line = _splat(
            views,
            np.concatenate([vessels, rib_points[pid] + heart[:, None, :]], axis=1),
            np.concatenate([volume[art, pid] * acq.contrast[sl, None], rib_volume[pid]], axis=1),
            np.concatenate([radius[art, pid], np.full(rib_volume[pid].shape, _RIB_RADIUS)], 1),
        )
        line += _background(views, sub, heart)
        # Automatic exposure control holds the median detector signal at the scanner's dose.
        line = line.reshape(len(pid), -1)
        expected = acq.dose[sl, None] * np.exp(-(line - np.median(line, axis=1, keepdims=True)))
        counts = (
            rng.poisson(expected) + rng.normal(0.0, 1.0, expected.shape) * acq.read_noise[sl, None]
        )
        raw = np.log(np.maximum(counts, 1.0)).reshape(-1, image_size, image_size)
        images[sl] = normalize_image(raw)
    return AngioSet(
        images=images,
        view=acq.view.astype(np.int64),
        artery=acq.artery.astype(np.int64),
        primary=acq.primary,
        secondary=acq.secondary,
        sid=acq.sid,
        sod=acq.sod.astype(np.float64),
        pixel_spacing=acq.spacing,
        scanner=acq.scanner.astype(np.int64),
        patient=acq.patient.astype(np.int64),
        scanner_names=tuple(p.name for p in profiles),
        patient_ids=tuple(f"synthetic-{seed}-{stream}-{j}" for j in range(count)),
    )


# ---------------------------------------------------------------------------------------------
# Task glue: what the config and the CLI call.


def _label_names(label: str) -> tuple[str, ...]:
    if label == "view":
        return VIEW_CLASSES
    if label == "artery":
        return ARTERIES
    raise ValueError(f"label must be 'view' or 'artery', got {label!r}")


def _split_patients(data: AngioSet, test_fraction: float, seed: int) -> tuple[AngioSet, ...]:
    """Train/test split of real data by patient, so no patient is on both sides."""
    patients = np.unique(data.patient)
    if len(patients) < 2:
        raise ValueError("a train/test split needs images of at least two patients")
    order = np.random.default_rng(seed).permutation(patients)
    n_test = min(len(patients) - 1, max(1, round(test_fraction * len(patients))))
    test = np.isin(data.patient, order[:n_test])
    return data.take(np.flatnonzero(~test)), data.take(np.flatnonzero(test))


def split_sizes(options: Mapping[str, Any]) -> tuple[int, int] | None:
    """(train, test) example counts of the synthetic data; ``None`` for a DICOM folder
    (known only once it is read)."""
    if options.get("data_dir") is not None:
        return None
    return int(options.get("n_train", DEFAULTS["n_train"])), int(
        options.get("n_test", DEFAULTS["n_test"])
    )


def load_task_data(
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    n_train: int = 6000,
    n_test: int = 1200,
    image_size: int = 64,
    label: str = "view",
    num_scanners: int = 3,
    images_per_patient: int = 8,
    labels_csv: str | Path | None = None,
    frame: str | int = "max-contrast",
    test_fraction: float = 0.2,
) -> TaskData:
    """The angiography task: x ``[N, 1, S, S]`` float32 in [0, 1] (vessels dark), y int64.

    Without ``data_dir`` the images are synthetic: ``n_train`` from one patient population
    and ``n_test`` from held-out patients (a disjoint seed stream). With ``data_dir`` they
    are the usable XA files of that folder (see ``angio_dicom.read_folder``; ``labels_csv``
    and ``frame`` apply there), split by patient with ``test_fraction`` of the patients held
    out. ``info`` carries per-image views, arteries, scanners, patients and angles
    (``*_train`` / ``*_test`` arrays), which ``site_partition`` uses.
    """
    names = _label_names(label)
    info: dict[str, object] = {"label": label, "image_size": image_size, "seed": seed}
    if data_dir is None:
        train = generate(
            n_train, seed=seed, stream=0, image_size=image_size, num_scanners=num_scanners,
            images_per_patient=images_per_patient,
        )  # fmt: skip
        test = generate(
            n_test, seed=seed, stream=1, image_size=image_size, num_scanners=num_scanners,
            images_per_patient=images_per_patient,
        )  # fmt: skip
        info.update(source="synthetic", images_per_patient=images_per_patient)
    else:
        from federation.tasks.angio_dicom import read_folder

        data, skipped = read_folder(
            data_dir, image_size=image_size, labels_csv=labels_csv, label=label, frame=frame
        )
        info.update(
            source="dicom",
            data_dir=str(data_dir),
            skipped=[(str(path), reason) for path, reason in skipped],
        )
        if len(data) < 2:
            reasons = "; ".join(f"{p.name}: {r}" for p, r in skipped[:5])
            raise ValueError(f"{data_dir}: {len(data)} usable XA image(s). Skipped: {reasons}")
        train, test = _split_patients(data, test_fraction, seed)
    info["scanner_names"] = train.scanner_names
    for split, part in (("train", train), ("test", test)):
        info[f"view_{split}"] = part.view
        info[f"artery_{split}"] = part.artery
        info[f"scanner_{split}"] = part.scanner
        info[f"patient_{split}"] = part.patient
        info[f"angles_{split}"] = np.stack([part.primary, part.secondary], axis=1)
    target = "view" if label == "view" else "artery"
    return TaskData(
        name="angio",
        kind="classification",
        x_train=torch.from_numpy(train.images).unsqueeze(1),
        y_train=torch.from_numpy(getattr(train, target)),
        x_test=torch.from_numpy(test.images).unsqueeze(1),
        y_test=torch.from_numpy(getattr(test, target)),
        feature_range=FEATURE_RANGE,
        num_classes=len(names),
        class_names=names,
        info=info,
    )


_RESNET_DEFAULTS: dict[str, int] = {"channels": 8, "blocks": 1}


def _input_pool(image_size: int) -> nn.Module:
    """Average-pools the input to about 32x32 (identity for images that small already)."""
    pool = max(1, image_size // 32)
    return nn.AvgPool2d(pool) if pool > 1 else nn.Identity()


class ResidualBlock(nn.Module):
    """torchvision's BasicBlock at constant width: conv-bn-relu-conv-bn, plus the skip, relu."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class AngioResNet(nn.Module):
    """A small ResNet: pool to ~32x32 -> Conv(1->c, 5x5, stride 2) -> BN -> ReLU -> MaxPool(2)
    -> ``blocks`` x ResidualBlock(c) -> AvgPool(2) -> Linear (logits).

    At 64x64 with c = 8 and one block: 8x8 feature maps in the block, 2.4k parameters and
    0.13 MMAC per image like ``cnn``, but about 2.5x its encrypted cost (batch norm, ReLU and
    max-pooling at 16x16). Plain modules, so the engine traces it with torch.fx.
    """

    def __init__(
        self, image_size: int = 64, num_classes: int = 8, channels: int = 8, blocks: int = 1
    ) -> None:
        super().__init__()
        if channels < 1 or blocks < 0:
            raise ValueError(
                f"resnet needs channels >= 1 and blocks >= 0, got {channels}, {blocks}"
            )
        self.pool = _input_pool(image_size)
        self.conv1 = nn.Conv2d(1, channels, kernel_size=5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))
        self.avgpool = nn.AvgPool2d(2)
        with torch.no_grad():
            features = self.features(torch.zeros(1, 1, image_size, image_size)).shape[1]
        self.fc = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.pool(x)))))
        return torch.flatten(self.avgpool(self.layer1(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_model(
    arch: str = "cnn", *, image_size: int = 64, num_classes: int = 8, **options: int
) -> nn.Module:
    """A small classifier made only of layers the encrypted engine supports.

    The input is first average-pooled to about 32x32: vessels at 64x64 are one or two pixels
    wide, and pooling keeps their contrast while quartering every later cost, which matters
    at ~8x under encryption. ``cnn``: Conv(1->8, 5x5, stride 2) -> Tanh -> AvgPool(2) ->
    Conv(8->16, 3x3) -> Tanh -> AvgPool(2) -> Linear (3.4k parameters and 0.13 MMAC per
    64x64 image). ``mlp``: pool to 8x8 -> Linear(64) -> Tanh -> Linear, a cheaper baseline.
    ``resnet``: :class:`AngioResNet` (ReLU, batch norm, max-pooling and a residual block; an
    ordinary ``nn.Module`` the engine traces), options ``channels`` and ``blocks``. Outputs
    are logits for softmax cross-entropy.
    """
    if arch not in ("cnn", "mlp", "resnet"):
        raise ValueError(f"unknown angio arch {arch!r}; choose 'cnn', 'mlp' or 'resnet'")
    allowed = set(_RESNET_DEFAULTS) if arch == "resnet" else set()
    unknown = set(options) - allowed
    if unknown:
        takes = ", ".join(["image_size", "num_classes", *sorted(allowed)])
        raise TypeError(
            f"unknown model.options for {arch!r}: {', '.join(sorted(unknown))} (it takes {takes})"
        )
    if arch == "resnet":
        settings = {**_RESNET_DEFAULTS, **options}
        return AngioResNet(
            image_size, num_classes, int(settings["channels"]), int(settings["blocks"])
        )
    pool = max(1, image_size // 32)
    head: list[nn.Module] = [nn.AvgPool2d(pool)] if pool > 1 else []
    if arch == "cnn":
        layers = head + [
            nn.Conv2d(1, 8, kernel_size=5, stride=2, padding=2),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
        ]
    else:
        layers = head + [nn.AvgPool2d(4), nn.Flatten()]
    with torch.no_grad():
        features = nn.Sequential(*layers)(torch.zeros(1, 1, image_size, image_size)).shape[1]
    if arch == "mlp":
        layers += [nn.Linear(features, 64), nn.Tanh()]
        features = 64
    return nn.Sequential(*layers, nn.Linear(features, num_classes))


def _rows(info: dict[str, object], split: str, key: str, default: np.ndarray) -> np.ndarray:
    value = info.get(f"{key}_{split}")
    return np.asarray(value) if isinstance(value, np.ndarray) else default


def _skewed_partition(
    views: np.ndarray,
    scanners: np.ndarray,
    num_sites: int,
    alpha: float,
    seed: int,
    foreign: float = 0.02,
) -> list[np.ndarray]:
    """Sites with home scanners and a Dirichlet(alpha) view mix.

    Each view's images are spread over sites with Dirichlet(alpha) weights (as in
    ``dirichlet_partition``), multiplied by a scanner affinity: 1 for a site's home scanners
    (scanner k belongs to site k mod num_sites; with fewer scanners than sites, site s uses
    scanner s mod num_scanners) and ``foreign`` otherwise. Every image goes to one site, so
    the shares are disjoint and cover the data; redrawn until no site is empty.
    """
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    if num_sites < 1 or num_sites > len(views):
        raise ValueError(f"cannot split {len(views)} examples across {num_sites} sites")
    rng = np.random.default_rng(seed)
    groups, group = np.unique(views, return_inverse=True)
    num_scanners = int(scanners.max()) + 1
    site_ids, scanner_ids = np.arange(num_sites)[:, None], np.arange(num_scanners)[None, :]
    if num_scanners >= num_sites:
        home = scanner_ids % num_sites == site_ids
    else:
        home = site_ids % num_scanners == scanner_ids
    affinity = np.where(home, 1.0, foreign)
    for _ in range(1000):
        weights = rng.dirichlet(np.full(num_sites, alpha), size=len(groups)).T
        prob = weights[:, group] * affinity[:, scanners]
        cum = np.cumsum(prob / prob.sum(axis=0), axis=0)
        site = np.minimum((cum < rng.random(len(views))).sum(axis=0), num_sites - 1)
        parts = [np.flatnonzero(site == s) for s in range(num_sites)]
        if min(len(p) for p in parts) > 0:
            return parts
    raise ValueError(f"no non-iid split with alpha={alpha} gives all {num_sites} sites data")


def site_partition(
    data: TaskData, *, num_sites: int, scheme: str, seed: int, alpha: float = 0.5
) -> list[TaskData]:
    """Each site's share of ``data``: disjoint, covering, deterministic from ``seed``.

    ``"iid"`` shuffles train images evenly across sites. ``"non-iid"`` gives each site its
    own scanners (so its own noise, dose and contrast) and a Dirichlet(``alpha``) view mix
    (see ``_skewed_partition``). The test set is split iid either way: every site evaluates
    on the population, so the weighted mean of site metrics is the global metric. Per-image
    ``info`` arrays are cut to each site's rows.
    """
    n_train = len(data.y_train)

    def skewed(train_seed: int) -> list[np.ndarray]:
        views = _rows(data.info, "train", "view", data.y_train.numpy())
        scanners = _rows(data.info, "train", "scanner", np.zeros(n_train, dtype=np.int64))
        return _skewed_partition(views, scanners, num_sites, alpha, train_seed)

    return partition_sites(
        data, num_sites=num_sites, scheme=scheme, seed=seed, non_iid=skewed, alpha=alpha
    )


def save_preview(
    path: str | Path, *, image_size: int = 64, seed: int = 0, per_class: int = 4
) -> Path:
    """Save a PNG montage with ``per_class`` synthetic examples of every view, labelled.

    One patient per example (stream 2, apart from training and test patients), so the
    montage shows the spread between patients and scanners. Written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    data = generate(
        per_class * len(VIEW_CLASSES), seed=seed, stream=2, image_size=image_size,
        images_per_patient=1,
    )  # fmt: skip
    fig = Figure(figsize=(1.5 * per_class + 1.2, 1.6 * len(VIEW_CLASSES)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(VIEW_CLASSES), per_class, squeeze=False)
    for view, name in enumerate(VIEW_CLASSES):
        for col, i in enumerate(np.flatnonzero(data.view == view)[:per_class]):
            ax = axes[view, col]
            ax.imshow(data.images[i], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(angle_name(data.primary[i], data.secondary[i]), fontsize=7)
        axes[view, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("Synthetic coronary angiograms by view", fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
