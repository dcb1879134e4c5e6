"""Synthetic X-ray coronary angiograms: C-arm projection and rendering of the anatomy of
:mod:`federation.tasks.angio.anatomy`, scanner profiles, and the image set they produce.

Real angiograms never leave a hospital, so the federation gets a generator whose labels are a
property of 3-D anatomy seen through a projection, exactly as in a catheter lab. A C-arm
projects the coronary trees with DICOM conventions (:mod:`federation.tasks.angio.views`):
the source and detector sit at DistanceSourceToPatient / DistanceSourceToDetector for a
perspective projection. Intensities follow Beer-Lambert through iodine (vessels and the
contrast-filled catheter), ribs, spine, heart shadow and the diaphragm/liver dome, with
automatic exposure control, Poisson quantum noise and Gaussian read noise. Scanner profiles
differ in dose, read noise, iodine contrast and geometry, which is what makes sites non-iid
beyond their view mix.

Rendering is vectorised: centreline points are splatted with their projected radii into a
few Gaussian scale layers, and the smooth anatomy uses analytic ray-ellipsoid chords: about
2 ms of one core per 64x64 image, so the default 7,200 images take about 15 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from federation.tasks.angio.anatomy import (
    Branches,
    Patients,
    draw_catheter,
    draw_patients,
    draw_ribs,
)
from federation.tasks.angio.views import VIEW_BOXES, VIEW_CLASSES


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

    images: np.ndarray  # float32 [N, H, W] in [0, 1], vessels dark
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


def _background(views: _Views, pat: Patients, heart: np.ndarray) -> np.ndarray:
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
    pat = draw_patients(rng, count)
    patient_scanner = rng.integers(0, num_scanners, count)
    step = 150.0 / image_size  # about one object-plane pixel: splats overlap smoothly
    branches = Branches(rng, pat, step)
    trees = [branches.left(), branches.right()]
    iodine = [(tree, draw_catheter(rng, pat, ostium, step)) for tree, ostium in trees]
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
    rib_points, rib_length = draw_ribs(pat, 2 * step)
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
