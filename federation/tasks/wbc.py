"""Whole-body circulation (WBC) task: predict haemodynamics from cardiovascular parameters.

A closed-loop lumped-parameter (0D) model of the circulation generates the data: four heart
chambers with time-varying elastance, diode valves, three-element Windkessels for the systemic
and pulmonary arteries, and systemic and pulmonary venous compliances. Each sample is one
"patient" (heart rate, contractility, stiffness, resistances, compliances, blood volume) run to
periodic steady state; the targets are the clinical summary numbers of the last beat. The model
is cheap enough to simulate 10,000 patients in about a minute, which makes it a realistic but
reproducible regression task for federated training (sites differ in patient population).

Units throughout: mmHg, mL, s (heart rate in beats/min, cardiac output in L/min).
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from federation.atomic import atomic_write
from federation.tasks.base import TaskData, partition_sites, quantile_bands

# Bump whenever the model, its parameters or the generator change: it keys the disk cache.
VERSION = "wbc-1"

# Baseline adult at rest. The sampled parameters (INPUT_RANGES) override their entries.
# LV: P = e(t) * emax * (V - v0) + (1 - e(t)) * a * (exp(b * (V - v0)) - 1), e(t) the activation.
BASELINE: dict[str, float] = {
    "hr": 72.0,  # heart rate, beats/min
    "lv_emax": 2.75,  # LV end-systolic elastance (contractility), mmHg/mL
    "lv_b": 0.027,  # LV diastolic stiffness exponent, 1/mL
    "sys_dur": 0.42,  # ventricular activation time at 60 bpm, s (scaled by sqrt(RR))
    "r_sys": 1.05,  # systemic vascular resistance, mmHg s/mL
    "c_sa": 1.5,  # systemic arterial compliance, mL/mmHg
    "c_sv": 100.0,  # systemic venous compliance, mL/mmHg
    "r_pul": 0.1,  # pulmonary vascular resistance, mmHg s/mL
    "blood_volume": 5000.0,  # total blood volume, mL
}

# Fixed parameters (not sampled). Only the LV has an exponential diastolic curve (its stiffness is
# an input); the RV and both atria use linear elastances between emin and emax.
LV_V0, LV_A = 5.0, 0.35
RV_EMIN, RV_EMAX, RV_V0 = 0.03, 0.55, 10.0
ATRIUM_EMIN, ATRIUM_EMAX, ATRIUM_V0 = 0.10, 0.30, 4.0  # shared by left and right atrium
ATRIAL_DUR = 0.20  # atrial activation time, s at 60 bpm
PR_INTERVAL = 0.16  # atrial onset before the ventricular onset, s at 60 bpm
Z_SA, Z_PA = 0.04, 0.02  # characteristic impedances of aorta and pulmonary artery, mmHg s/mL
C_PA, C_PV = 4.0, 15.0  # pulmonary arterial and venous compliances, mL/mmHg
R_SV, R_PV = 0.02, 0.01  # venous return resistances into the atria, mmHg s/mL
R_VALVE = 0.005  # forward resistance of an open valve, mmHg s/mL
VALVE_LEAK = 1e-6  # backward/forward conductance ratio of a closed valve
# Unstressed volumes of the vascular compartments (blood held at zero transmural pressure), mL.
V0_SA, V0_SV, V0_PA, V0_PV = 600.0, 3000.0, 100.0, 250.0

# Compartments in loop order: flow k leaves compartment k and enters compartment k + 1 (mod 8), so
# the flows are one vector over the loop and volume conservation holds by construction. With the
# state viewed as [2, 4, N] (right heart and lungs, left heart and body), [:, 0] are the atria,
# [:, 1] the ventricles, [:, 2:] the vessels, and flows [:, :2] pass valves (tricuspid,
# pulmonary, mitral, aortic).
COMPARTMENTS = ("ra", "rv", "pa", "pv", "la", "lv", "sa", "sv")
_UNSTRESSED = np.array([ATRIUM_V0, RV_V0, V0_PA, V0_PV, ATRIUM_V0, LV_V0, V0_SA, V0_SV])

# Sampling ranges of the inputs: a broad adult population from heart failure to athlete.
INPUT_RANGES: dict[str, tuple[float, float]] = {
    "hr": (50.0, 110.0),
    "lv_emax": (1.4, 4.0),
    "lv_b": (0.018, 0.036),
    "sys_dur": (0.36, 0.48),
    "r_sys": (0.7, 1.5),
    "c_sa": (0.8, 2.4),
    "c_sv": (70.0, 130.0),
    "r_pul": (0.05, 0.2),
    "blood_volume": (4700.0, 5300.0),
}
INPUT_UNITS: dict[str, str] = {
    "hr": "1/min",
    "lv_emax": "mmHg/mL",
    "lv_b": "1/mL",
    "sys_dur": "s",
    "r_sys": "mmHg s/mL",
    "c_sa": "mL/mmHg",
    "c_sv": "mL/mmHg",
    "r_pul": "mmHg s/mL",
    "blood_volume": "mL",
}
OUTPUT_NAMES = ("SBP", "DBP", "MAP", "EDV", "ESV", "SV", "EF", "CO")
OUTPUT_UNITS = ("mmHg", "mmHg", "mmHg", "mL", "mL", "mL", "%", "L/min")

# Outputs outside these bounds are not a living patient at rest: such samples are rejected.
PHYSIOLOGICAL_LIMITS: dict[str, tuple[float, float]] = {
    "SBP": (80.0, 200.0),
    "DBP": (40.0, 120.0),
    "MAP": (60.0, 150.0),
    "EDV": (60.0, 250.0),
    "ESV": (15.0, 200.0),
    "SV": (30.0, 150.0),
    "EF": (25.0, 80.0),
    "CO": (2.5, 10.0),
}
# A sample whose compartment volumes still move by more than this over its last beat (mL) has
# not reached periodic steady state and is rejected.
STEADY_STATE_TOL = 0.05

# Generation gives up when fewer draws than this are physiological, and simulates at most
# MAX_BATCH patients at once (the activation tables take 16 kB per patient).
MIN_ACCEPTANCE = 0.05
MAX_BATCH = 16_384

# Latent population parameter of the non-iid split: arterial compliance falls with age.
PARTITION_FEATURE = "c_sa"

DEFAULT_CACHE_DIR = Path("~") / ".cache" / "more-fl" / "wbc"
"""Where generated datasets are cached when neither cache_dir nor data_dir is given."""

_MODEL_DEFAULTS: dict[str, int | str] = {
    "hidden": 64,  # width of each hidden layer
    "depth": 2,  # number of hidden layers
    "activation": "tanh",  # "tanh" | "sigmoid" | "softplus" (mlp; bn-mlp uses ReLU)
}

RECIPES: dict[str, dict[str, int | float]] = {
    # 9-64-64-8 Tanh, MSE on standardised targets, 8,000/2,000 split of the default dataset:
    # test R2 >= 0.998 on every output over five seeds, ~3-4 s of CPU on one thread
    "mlp": {"epochs": 20, "batch_size": 64, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
}
"""Measured plaintext SGD recipe (constant lr, no schedule, shuffled mini-batches)."""

DEFAULTS: dict[str, object] = {
    # load_task_data
    "seed": 0,  # train/test split permutation
    "data_dir": None,  # cache root: datasets go to <data_dir>/wbc unless cache_dir is set
    "n_samples": 10_000,  # accepted (physiological) simulated patients
    "test_fraction": 0.2,  # share of the samples held out for testing
    "cache_dir": None,  # None: <data_dir>/wbc, else ~/.cache/more-fl/wbc
    "data_seed": 0,  # generator seed: every experiment seed reuses one cached dataset
    "progress": False,  # rich progress bar while simulating
    # site_partition
    "scheme": "iid",  # "iid" | "non-iid" (quantile bands of PARTITION_FEATURE)
    # build_model
    "arch": "mlp",  # "mlp" | "bn-mlp"
    **_MODEL_DEFAULTS,
    # training recipe (SGD + MSE), see RECIPES
    **RECIPES["mlp"],
}
"""Documented defaults of every option this task reads, plus the recipe of its model."""


@dataclass(frozen=True)
class Hemodynamics:
    """Steady-state summary of a batch of simulated patients (arrays over samples)."""

    outputs: np.ndarray  # [N, len(OUTPUT_NAMES)] measured on the last beat
    residual: np.ndarray  # [n_beats, N] max change of any compartment volume over each beat, mL
    volumes: np.ndarray  # [len(COMPARTMENTS), N] volumes at the end of the run, mL
    initial_volume: np.ndarray  # [N] total blood volume at the start, mL

    def output(self, name: str) -> np.ndarray:
        """One output column by name."""
        return self.outputs[:, OUTPUT_NAMES.index(name)]


def _activations(hr: np.ndarray, sys_dur: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Ventricular and atrial activation e(t) in [0, 1], tabulated per step of one beat.

    Raised cosines: the ventricles contract over 2/3 of their activation time and relax over the
    last 1/3; the atria follow one symmetric cosine that starts PR_INTERVAL before the ventricles.
    Durations shorten with sqrt(RR) (Bazett), so systole stays plausible from 50 to 110 bpm.
    Returns two ``[steps, N]`` tables indexed by the step within the beat.
    """
    rr = 60.0 / hr
    scale = np.sqrt(rr) / rr  # seconds at 60 bpm -> fraction of this beat
    phase = np.arange(steps)[:, None] / steps
    t_sys = sys_dur * scale
    t_con, t_rel = t_sys * (2.0 / 3.0), t_sys / 3.0
    # Piecewise-linear angle: 0 -> pi over contraction, pi -> 2 pi over relaxation, then 2 pi.
    angle = np.minimum(np.maximum(phase / t_con, 1.0 + (phase - t_con) / t_rel), 2.0)
    ventricle = 0.5 * (1.0 - np.cos(np.pi * angle))
    t_atr = ATRIAL_DUR * scale
    since_onset = (phase - (1.0 - PR_INTERVAL * scale)) % 1.0
    atrial_angle = np.minimum(since_onset / t_atr, 1.0)  # one full cosine, then rest
    atrium = 0.5 * (1.0 - np.cos(2.0 * np.pi * atrial_angle))
    return ventricle, atrium


def _initial_volumes(p: Mapping[str, np.ndarray]) -> np.ndarray:
    """A plausible starting distribution of the blood volume; the systemic veins take the rest."""
    start = {
        "lv": np.full_like(p["hr"], 120.0),
        "sa": V0_SA + 90.0 * p["c_sa"],
        "ra": np.full_like(p["hr"], 60.0),
        "rv": np.full_like(p["hr"], 120.0),
        "pa": np.full_like(p["hr"], V0_PA + 15.0 * C_PA),
        "pv": np.full_like(p["hr"], V0_PV + 8.0 * C_PV),
        "la": np.full_like(p["hr"], 60.0),
    }
    start["sv"] = p["blood_volume"] - sum(start.values())
    return np.stack([start[name] for name in COMPARTMENTS])


def simulate(
    params: Mapping[str, float | np.ndarray],
    *,
    n_beats: int = 60,
    steps_per_beat: int = 1000,
    on_beat: Callable[[], None] | None = None,
) -> Hemodynamics:
    """Run the closed-loop model for every sample to periodic steady state.

    ``params`` maps names of BASELINE to scalars or ``[N]`` arrays (missing names take the
    baseline). Explicit Euler with a per-sample step of RR/steps_per_beat keeps every sample at
    the same phase of its beat, so activation tables and last-beat statistics are row operations
    over the whole batch. Every operation writes into a preallocated buffer: fresh temporaries
    of this size cost more in page faults than in arithmetic.
    """
    unknown = set(params) - set(BASELINE)
    if unknown:
        raise ValueError(f"unknown WBC parameters: {sorted(unknown)}")
    if n_beats < 1 or steps_per_beat < 1:
        raise ValueError(f"need at least one beat and one step, got {n_beats}, {steps_per_beat}")
    merged = {k: np.asarray(params.get(k, v), dtype=np.float64) for k, v in BASELINE.items()}
    n = int(np.broadcast(*merged.values()).size)
    p = {name: np.broadcast_to(value, (n,)).copy() for name, value in merged.items()}

    ventricle, atrium = _activations(p["hr"], p["sys_dur"], steps_per_beat)
    atrium = ATRIUM_EMIN + (ATRIUM_EMAX - ATRIUM_EMIN) * atrium  # atrial elastance per step
    dt = 60.0 / p["hr"] / steps_per_beat
    # Conductance of each flow times dt, so that a flow is the volume moved in one step.
    resistance = np.broadcast_arrays(
        R_VALVE, R_VALVE + Z_PA, p["r_pul"], R_PV, R_VALVE, R_VALVE + Z_SA, p["r_sys"], R_SV
    )
    conductance = (dt / np.stack(resistance)).reshape(2, 4, n)
    compliance = np.broadcast_arrays(C_PA, C_PV, p["c_sa"], p["c_sv"])
    vessel_elastance = (1.0 / np.stack(compliance)).reshape(2, 2, n)
    lv_emax, lv_b = p["lv_emax"], p["lv_b"]
    log_lv_a = math.log(LV_A)
    z_per_step = Z_SA / dt

    volumes = _initial_volumes(p)
    initial_volume = volumes.sum(axis=0)
    x = volumes - _UNSTRESSED[:, None]  # the state is the stressed volume of each compartment
    pressure = np.empty_like(x)
    flow = np.empty_like(x)
    x4, pressure4, flow4 = (a.reshape(2, 4, n) for a in (x, pressure, flow))
    back = np.empty((2, 2, n))
    passive = np.empty(n)
    p_ao = np.empty(n)
    residual = np.empty((n_beats, n))
    p_ao_max = np.full(n, -np.inf)
    p_ao_min = np.full(n, np.inf)
    p_ao_sum = np.zeros(n)
    lv, rv, sa = (COMPARTMENTS.index(name) for name in ("lv", "rv", "sa"))
    x_lv, x_rv, p_lv, p_rv = x[lv], x[rv], pressure[lv], pressure[rv]
    with np.errstate(over="ignore", invalid="ignore"):
        for beat in range(n_beats):
            start = x.copy()
            last = beat == n_beats - 1
            if last:
                lv_max, lv_min = x_lv.copy(), x_lv.copy()
            for k in range(steps_per_beat):
                ev = ventricle[k]
                # LV: passive exponential curve blended with the active elastance by e(t).
                np.multiply(lv_b, x_lv, out=passive)
                passive += log_lv_a
                np.exp(passive, out=passive)
                passive -= LV_A
                np.multiply(lv_emax, x_lv, out=p_lv)
                p_lv -= passive
                p_lv *= ev
                p_lv += passive
                np.multiply(ev, RV_EMAX - RV_EMIN, out=p_rv)
                p_rv += RV_EMIN
                p_rv *= x_rv
                np.multiply(x4[:, 0], atrium[k], out=pressure4[:, 0])
                np.multiply(x4[:, 2:], vessel_elastance, out=pressure4[:, 2:])

                np.subtract(pressure[:-1], pressure[1:], out=flow[:-1])
                np.subtract(pressure[-1], pressure[0], out=flow[-1])
                np.multiply(flow4[:, :2], VALVE_LEAK, out=back)  # a closed valve leaks slightly
                np.maximum(flow4[:, :2], back, out=flow4[:, :2])
                flow4 *= conductance

                if last:  # proximal aortic pressure and LV volume over the final beat
                    np.multiply(flow[lv], z_per_step, out=p_ao)
                    p_ao += pressure[sa]
                    np.maximum(p_ao_max, p_ao, out=p_ao_max)
                    np.minimum(p_ao_min, p_ao, out=p_ao_min)
                    p_ao_sum += p_ao
                    np.maximum(lv_max, x_lv, out=lv_max)
                    np.minimum(lv_min, x_lv, out=lv_min)

                x -= flow
                x[1:] += flow[:-1]
                x[0] += flow[-1]
            residual[beat] = np.abs(x - start).max(axis=0)
            if on_beat is not None:
                on_beat()

    edv, esv = lv_max + LV_V0, lv_min + LV_V0
    sv = edv - esv
    outputs = np.stack(
        [
            p_ao_max,
            p_ao_min,
            p_ao_sum / steps_per_beat,
            edv,
            esv,
            sv,
            100.0 * sv / edv,
            sv * p["hr"] / 1000.0,
        ],
        axis=1,
    )
    return Hemodynamics(outputs, residual, x + _UNSTRESSED[:, None], initial_volume)


def physiological(outputs: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Which samples are a plausible patient at rest: converged, finite and within the limits."""
    ok = np.isfinite(outputs).all(axis=1) & (residual < STEADY_STATE_TOL)
    for j, name in enumerate(OUTPUT_NAMES):
        lo, hi = PHYSIOLOGICAL_LIMITS[name]
        with np.errstate(invalid="ignore"):
            ok &= (outputs[:, j] >= lo) & (outputs[:, j] <= hi)
    return ok


@dataclass(frozen=True)
class WbcDataset:
    """Accepted simulated patients: inputs and outputs in physical units."""

    input_names: tuple[str, ...]
    inputs: np.ndarray  # [N, len(input_names)]
    outputs: np.ndarray  # [N, len(OUTPUT_NAMES)]
    n_simulated: int  # samples drawn and simulated
    n_rejected: int  # of those, samples that failed the physiological filter


def _cache_key(fields: Mapping[str, object]) -> str:
    """Everything the dataset depends on, as canonical JSON (hashed into the file name)."""
    return json.dumps(
        {
            "version": VERSION,
            "baseline": BASELINE,
            "limits": PHYSIOLOGICAL_LIMITS,
            "steady_state_tol": STEADY_STATE_TOL,
            **fields,
        },
        sort_keys=True,
    )


def _load_cached(path: Path, key: str) -> WbcDataset | None:
    """The dataset stored under ``path`` if it is readable and was made with ``key``."""
    try:
        # Own the file handle: np.load leaks it when the archive is truncated.
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            names = tuple(str(name) for name in f["input_names"])
            counts = int(f["n_simulated"]), int(f["n_rejected"])
            return WbcDataset(names, f["inputs"], f["outputs"], *counts)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _save_atomic(path: Path, key: str, data: WbcDataset) -> None:
    """Write the cache atomically, so readers never see a partial file."""
    atomic_write(
        path,
        lambda fh: np.savez(
            fh,
            key=np.array(key),
            input_names=np.array(data.input_names),
            inputs=data.inputs,
            outputs=data.outputs,
            n_simulated=np.array(data.n_simulated),
            n_rejected=np.array(data.n_rejected),
        ),
    )


def generate_dataset(
    n_samples: int,
    *,
    seed: int = 0,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    n_beats: int = 60,
    steps_per_beat: int = 1000,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> WbcDataset:
    """Draw uniform parameters from ``ranges``, simulate, keep the physiological samples.

    Batches are drawn until ``n_samples`` are accepted; each batch is sized from the acceptance
    rate seen so far, so the result depends only on the arguments (a sample's outputs never
    depend on the batch it was simulated in). With ``cache_dir`` the dataset is stored in a
    file named by a hash of everything it depends on, and read back from there next time.
    """
    ranges = dict(INPUT_RANGES if ranges is None else ranges)
    unknown = set(ranges) - set(BASELINE)
    if unknown:
        raise ValueError(f"unknown WBC parameters: {sorted(unknown)}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    key = _cache_key(
        {
            "n_samples": n_samples,
            "seed": seed,
            "ranges": {name: list(bounds) for name, bounds in ranges.items()},
            "n_beats": n_beats,
            "steps_per_beat": steps_per_beat,
        }
    )
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"wbc-{digest}.npz"
        cached = _load_cached(path, key)
        if cached is not None:
            return cached

    names = tuple(ranges)
    lo, hi = np.array([ranges[name] for name in names], dtype=np.float64).T
    rng = np.random.default_rng(seed)
    inputs: list[np.ndarray] = []
    outputs: list[np.ndarray] = []
    n_accepted = n_simulated = 0
    acceptance = 0.9  # first guess; later batches use the observed rate
    with Progress(disable=not progress, transient=True) as bar:
        while n_accepted < n_samples:
            if n_simulated and acceptance < MIN_ACCEPTANCE:
                raise RuntimeError(
                    f"only {n_accepted} of {n_simulated} WBC samples were physiological"
                )
            wanted = math.ceil(1.05 * (n_samples - n_accepted) / acceptance) + 8
            batch = min(wanted, MAX_BATCH)
            x = lo + (hi - lo) * rng.random((batch, len(names)))
            task = bar.add_task(f"WBC: simulating {batch} patients", total=n_beats)
            sim = simulate(
                dict(zip(names, x.T, strict=True)),
                n_beats=n_beats,
                steps_per_beat=steps_per_beat,
                on_beat=lambda task=task: bar.advance(task),
            )
            ok = physiological(sim.outputs, sim.residual[-1])
            inputs.append(x[ok])
            outputs.append(sim.outputs[ok])
            n_simulated += batch
            n_accepted += int(ok.sum())
            acceptance = n_accepted / n_simulated
    data = WbcDataset(
        names,
        np.concatenate(inputs)[:n_samples],
        np.concatenate(outputs)[:n_samples],
        n_simulated,
        n_simulated - n_accepted,
    )
    if path is not None:
        _save_atomic(path, key, data)
    return data


def normalise_inputs(inputs: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Map each input from its sampling range onto [-1, 1] (the declared feature range)."""
    lo, hi = np.array([INPUT_RANGES[name] for name in names], dtype=np.float64).T
    return 2.0 * (inputs - lo) / (hi - lo) - 1.0


def split_sizes(options: Mapping[str, Any]) -> tuple[int, int]:
    """(train, test) example counts ``load_task_data`` will give, without simulating."""
    n = int(options.get("n_samples", DEFAULTS["n_samples"]))
    n_test = round(n * float(options.get("test_fraction", DEFAULTS["test_fraction"])))
    return n - n_test, n_test


def load_task_data(
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    n_samples: int = 10_000,
    test_fraction: float = 0.2,
    cache_dir: str | Path | None = None,
    data_seed: int = 0,
    progress: bool = False,
) -> TaskData:
    """The WBC regression task: normalised parameters -> standardised haemodynamics.

    The dataset comes from ``data_seed`` (so every experiment seed reuses one cached dataset);
    ``seed`` draws the train/test split. Targets are standardised with train statistics, kept
    in ``target_mean``/``target_std`` so metrics come out in physical units.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if cache_dir is None:
        cache_dir = Path(data_dir) / "wbc" if data_dir is not None else DEFAULT_CACHE_DIR
    cache_dir = Path(cache_dir).expanduser()
    data = generate_dataset(n_samples, seed=data_seed, cache_dir=cache_dir, progress=progress)
    n_test = round(n_samples * test_fraction)
    if not 0 < n_test < n_samples:
        raise ValueError(f"{n_samples} samples leave no train or no test split at {test_fraction}")
    order = np.random.default_rng(seed).permutation(n_samples)
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])

    x = normalise_inputs(data.inputs, data.input_names)
    mean = data.outputs[train_idx].mean(axis=0)
    std = data.outputs[train_idx].std(axis=0)
    y = (data.outputs - mean) / std
    y_train = y[train_idx]
    target_range = (
        math.floor(float(y_train.min()) * 10.0) / 10.0,
        math.ceil(float(y_train.max()) * 10.0) / 10.0,
    )
    return TaskData(
        name="wbc",
        kind="regression",
        x_train=torch.as_tensor(x[train_idx], dtype=torch.float32),
        y_train=torch.as_tensor(y_train, dtype=torch.float32),
        x_test=torch.as_tensor(x[test_idx], dtype=torch.float32),
        y_test=torch.as_tensor(y[test_idx], dtype=torch.float32),
        feature_range=(-1.0, 1.0),
        output_names=OUTPUT_NAMES,
        output_units=OUTPUT_UNITS,
        target_mean=mean,
        target_std=std,
        target_range=target_range,
        info={
            "input_names": data.input_names,
            "input_units": tuple(INPUT_UNITS[name] for name in data.input_names),
            "input_ranges": {name: INPUT_RANGES[name] for name in data.input_names},
            "n_simulated": data.n_simulated,
            "n_rejected": data.n_rejected,
            "data_seed": data_seed,
            "partition_feature": PARTITION_FEATURE,
        },
    )


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}


_ALLOWED_OPTIONS: dict[str, set[str]] = {
    "mlp": {"hidden", "depth", "activation"},
    "bn-mlp": {"hidden", "depth"},
}


def build_model(arch: str = "mlp", **options: int | str) -> nn.Sequential:
    """A small MLP made only of layers the encrypted engine supports.

    ``mlp``: 9 normalised inputs -> ``depth`` x (Linear(``hidden``), activation) -> Linear to
    the 8 standardised outputs; options ``hidden``, ``depth``, ``activation`` (tanh, sigmoid
    or softplus). ``bn-mlp``: ``depth`` x (Linear(``hidden``, no bias) -> BatchNorm1d -> ReLU)
    -> Linear to the outputs (the bias would only shift what batch norm subtracts); options
    ``hidden``, ``depth``.
    """
    if arch not in _ALLOWED_OPTIONS:
        choices = ", ".join(repr(name) for name in _ALLOWED_OPTIONS)
        raise ValueError(f"unknown WBC arch {arch!r}; choose {choices}")
    unknown = set(options) - _ALLOWED_OPTIONS[arch]
    if unknown:
        raise TypeError(
            f"unknown option(s) for {arch!r}: {sorted(unknown)} "
            f"(it takes {', '.join(sorted(_ALLOWED_OPTIONS[arch]))})"
        )
    settings = {**_MODEL_DEFAULTS, **options}
    hidden, depth = int(settings["hidden"]), int(settings["depth"])
    layers: list[nn.Module] = []
    width = len(INPUT_RANGES)
    if arch == "bn-mlp":
        for _ in range(depth):
            layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, len(OUTPUT_NAMES)))
        return nn.Sequential(*layers)
    activation = str(settings["activation"])
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), _ACTIVATIONS[activation]()]
        width = hidden
    layers.append(nn.Linear(width, len(OUTPUT_NAMES)))
    return nn.Sequential(*layers)


def site_partition(
    data: TaskData, *, num_sites: int, scheme: str, seed: int, alpha: float = 0.5
) -> list[TaskData]:
    """Each site's share of ``data``: disjoint, covering, deterministic from ``seed``.

    ``"iid"`` shuffles train and test evenly across sites. ``"non-iid"`` gives site i the i-th
    quantile band of arterial compliance (PARTITION_FEATURE, an age-like latent) of the train
    set: the first site treats the stiff, old arteries, the last the young ones. The test set
    stays iid, as for MNIST, so every site evaluates on the whole population and iid and
    non-iid runs are compared on the same kind of test data. ``alpha`` (the Dirichlet skew of
    classification tasks) has no meaning for bands; it is accepted for a uniform signature.
    """
    column = list(data.info["input_names"]).index(PARTITION_FEATURE)
    return partition_sites(
        data,
        num_sites=num_sites,
        scheme=scheme,
        seed=seed,
        non_iid=lambda s: quantile_bands(data.x_train[:, column].numpy(), num_sites, s),
    )
