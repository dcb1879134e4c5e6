"""The angiography task's label vocabulary: arteries, the eight standard C-arm views and
the angle box of each view.

Angles follow DICOM: PositionerPrimaryAngle (0018,1510) is positive towards LAO,
PositionerSecondaryAngle (0018,1511) positive towards cranial. The generator draws a view's
angles from its box and the DICOM reader labels a real run by the box its angles fall in, so
both sides share these tables.
"""

from __future__ import annotations

import numpy as np

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
