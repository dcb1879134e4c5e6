"""Synthetic coronary anatomy: per-patient 3-D centrelines of both coronary trees, the
guiding catheter and the ribs.

Per-patient centreline models of the left and right coronary trees (left main, LAD with
diagonals and septals, LCx with obtuse marginals; RCA with acute marginals, PDA and
posterolateral branch) lie on an ellipsoidal heart whose size, orientation and vessel course
vary between patients. Everything is drawn vectorised over a batch of patients;
:mod:`federation.tasks.angio.render` projects it.

Patient axes are DICOM LPS: x to the patient's left, y posterior, z to the head. The heart is
a half-ellipsoid: s runs from the atrioventricular groove (0) to the apex (1) along the long
axis a; phi is the azimuth around it, 0 at the anterior interventricular groove, +90 deg over
the LV lateral wall (vector n), 180 deg at the posterior groove, -90 deg over the RV free
wall; rho scales the local radius (1: epicardium, < 1: inside the septum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Patients = dict[str, np.ndarray]


def draw_patients(rng: np.random.Generator, count: int) -> Patients:
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


def _on_heart(pat: Patients, s: np.ndarray, phi: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """3-D points (P, M, 3), relative to the heart centre, of heart coordinates (P, M)."""
    rad = pat["radius"][:, None] * rho * np.sqrt(np.clip(1.0 - s**2, 0.0, None))
    axial = (s - 0.4) * pat["length"][:, None]
    return (
        axial[..., None] * pat["a"][:, None, :]
        + (rad * np.cos(phi))[..., None] * pat["g"][:, None, :]
        + (rad * np.sin(phi))[..., None] * pat["n"][:, None, :]
    )


@dataclass
class Tree:
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


def _join(parts: list[tuple[np.ndarray, np.ndarray]]) -> Tree:
    points = np.concatenate([p for p, _ in parts], axis=1)
    radius = np.concatenate([r for _, r in parts], axis=1)
    length = np.concatenate([_sample_lengths(p) for p, _ in parts], axis=1)
    return Tree(points, radius, length)


class Branches:
    """Draws the branches of both trees for a batch of patients (vectorised over patients)."""

    def __init__(self, rng: np.random.Generator, pat: Patients, step: float) -> None:
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

    def left(self) -> tuple[Tree, np.ndarray]:
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

    def right(self) -> tuple[Tree, np.ndarray]:
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


def draw_catheter(rng: np.random.Generator, pat: Patients, ostium: np.ndarray, step: float) -> Tree:
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
    return Tree(points, np.full(points.shape[:2], 0.9), _sample_lengths(points))


def draw_ribs(pat: Patients, step: float) -> tuple[np.ndarray, np.ndarray]:
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
