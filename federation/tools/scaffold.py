"""``more-fl new DIR``: a study as its own Flower app on top of the installed more-fl.

The study holds an experiment YAML (every key commented), sample data standing in for a
hospital export (a patient table, a folder of images per class, or a folder of DICOM files
with a labels sheet: ``source``), a two-line Flower app module, a pyproject naming them and
a README with the commands. With ``task_module`` it also gets a task module skeleton that
follows the task protocol (:mod:`federation.tasks`). The whole folder is written beside the
target and renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from federation import protocol

SAMPLE = "patients.csv"
FEATURES = ("age", "sex", "systolic_bp", "cholesterol", "bmi", "smoker")
SOURCES = ("tabular", "images", "dicom")
"""What the sample data and the experiment's ``task`` are: a CSV table, one folder of PNG
images per class, or DICOM files with a labels CSV."""
IMAGE_CLASSES = ("normal", "lesion")


class ScaffoldError(ValueError):
    """The study folder cannot be made (the message says why)."""


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ScaffoldError(f"{name!r} makes no project name (use letters or digits)")
    return slug


def sample_table(rows: int = 400, seed: int = 0) -> str:
    """A synthetic patient table (outcome from a logistic model of the features), with three
    missing cholesterol values, as a hospital export might have them."""
    rng = np.random.default_rng(seed)
    age = rng.integers(40, 86, rows)
    sex = rng.choice(["F", "M"], rows)
    sbp = rng.normal(130 + 0.4 * (age - 60), 15, rows).round(0)
    chol = rng.normal(5.2, 1.0, rows).round(1)
    bmi = rng.normal(27, 4, rows).round(1)
    smoker = rng.choice(["no", "yes"], rows, p=[0.7, 0.3])
    logit = (
        0.06 * (age - 62) + 0.03 * (sbp - 135) + 0.5 * (chol - 5.2) + 0.9 * (smoker == "yes") - 0.2
    )
    outcome = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*FEATURES, "outcome"])
    missing = set(rng.choice(rows, 3, replace=False).tolist())
    for i in range(rows):
        cholesterol = "" if i in missing else chol[i]
        writer.writerow([age[i], sex[i], sbp[i], cholesterol, bmi[i], smoker[i], outcome[i]])
    return out.getvalue()


def _picture(rng: np.random.Generator, lesion: bool, side: int) -> np.ndarray:
    """A [side, side] image in [0, 1]: smooth noise, and for a lesion a bright disc."""
    noise = rng.random((side // 4 + 1, side // 4 + 1))
    base = np.kron(noise, np.ones((4, 4)))[:side, :side] * 0.4 + 0.2
    if lesion:
        cy, cx = rng.uniform(side * 0.3, side * 0.7, 2)
        yy, xx = np.mgrid[:side, :side]
        base = base + 0.4 * (((yy - cy) ** 2 + (xx - cx) ** 2) < (side / 6) ** 2)
    return np.clip(base + rng.normal(0, 0.03, (side, side)), 0.0, 1.0)


def sample_images(per_class: int = 60, side: int = 24, seed: int = 0) -> dict[str, bytes]:
    """Grayscale PNGs by relative path ``images/<class>/img-NNN.png``: the ``images``
    source's layout, one folder per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = {}
    for cls, name in enumerate(IMAGE_CLASSES):
        for i in range(per_class):
            pixels = np.rint(_picture(rng, bool(cls), side) * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            files[f"images/{name}/img-{i:03d}.png"] = buf.getvalue()
    return files


def sample_dicom(
    patients: int = 24, per_patient: int = 5, side: int = 32, seed: int = 0
) -> dict[str, bytes]:
    """Digital X-ray DICOM files ``dicom/<patient>/IM<n>.dcm`` (16-bit, MONOCHROME2, with
    patient IDs so the train/test split keeps each patient on one side) and
    ``dicom/labels.csv`` (columns file, label), by relative path."""
    from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

    from federation.tasks.dicom_files import grayscale_dataset

    rng = np.random.default_rng(seed)
    files, rows = {}, []
    for p in range(patients):
        patient = f"PAT{p:03d}"
        for k in range(per_patient):
            lesion = bool(rng.random() < 0.5)
            rel = f"{patient}/IM{k}.dcm"
            uid = generate_uid(entropy_srcs=[patient, str(k), str(seed)])
            ds = grayscale_dataset(
                np.rint(_picture(rng, lesion, side) * 4095).astype(np.uint16),
                sop_class=DigitalXRayImageStorageForPresentation,
                sop_uid=uid,
                modality="DX",
                patient_id=patient,
                study_uid=generate_uid(entropy_srcs=[patient, "study", str(seed)]),
                series_uid=generate_uid(entropy_srcs=[patient, "series", str(seed)]),
            )
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            files[f"dicom/{rel}"] = buf.getvalue()
            rows.append((rel, IMAGE_CLASSES[int(lesion)]))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerows([("file", "label"), *rows])
    files["dicom/labels.csv"] = table.getvalue().encode()
    return files


def _pyproject(name: str) -> str:
    run_config = "".join(f"{k} = {json.dumps(v)}\n" for k, v in protocol.RUN_DEFAULTS.items())
    return f"""[project]
name = "{name}"
version = "0.1.0"
description = "A more-fl study: federated deep learning on MORE-encrypted hospital data"
requires-python = ">=3.11"
dependencies = ["more-fl"]

[tool.flwr.app]
publisher = "{name}"

[tool.flwr.app.components]
serverapp = "study_app:server"
clientapp = "study_app:client"

# Run config (override with `flwr run . --run-config 'key=value'`).
[tool.flwr.app.config]
experiment = "experiment.yaml"
{run_config}
# more-fl and its dependencies are installed already: Flower's per-run `uv sync` must not
# install a second copy (a second torch, GBs).
[tool.uv]
exclude-dependencies = ["more-fl"]
"""


APP = '''"""The study's Flower app: more-fl's aggregator and site agent, rooted at this folder
(where `experiment.yaml` and the task files are)."""

from pathlib import Path

from aggregator.server_app import create_app as create_server_app
from sites.client_app import create_app as create_client_app

HERE = Path(__file__).resolve().parent
server = create_server_app(HERE)
client = create_client_app(HERE)
'''

TASK_OPTIONS = {
    "tabular": f"""\
    file: {SAMPLE}         # relative to data_dir
    features: [{", ".join(FEATURES)}]
    categorical:               # one-hot encoded from the declared values
      sex: [F, M]
      smoker: ["no", "yes"]
    target: outcome
    kind: classification       # classification | regression
    classes: [0, 1]            # the target's values, in order
    missing: impute            # error | drop | impute (column mean); counts are reported
    test_fraction: 0.2
    normalise: auto            # auto (federation statistics) | none | {{mean: [..], std: [..]}}""",
    "images": f"""\
    classes: [{", ".join(IMAGE_CLASSES)}]   # the class folders under data_dir, in order
    image_size: 16             # [height, width] or one side
    channels: 1                # 1: grayscale | 3: RGB
    resample: bilinear         # nearest | box | bilinear | hamming | bicubic | lanczos
    fit: stretch               # stretch | crop | pad (to image_size's aspect ratio)
    extensions: [png, jpg, jpeg]
    on_error: error            # error: refuse an unreadable image | skip (and list it)
    test_fraction: 0.2
    normalise: auto            # auto (federation statistics) | none | {{mean: .., std: ..}}""",
    "dicom": f"""\
    labels: labels.csv         # relative to data_dir; a row per image: file, label
    key: file                  # file (path under data_dir) | sop_instance_uid
    key_column: file
    label_column: label
    classes: [{", ".join(IMAGE_CLASSES)}]
    image_size: 16             # [height, width] or one side
    channels: 1
    resample: bilinear
    fit: stretch
    frame: middle              # a multi-frame image's frame: first | middle | last | index
    intensity: percentile      # percentile | rescaled | {{center: c, width: w}}
    modalities: null           # null: every modality; or e.g. [DX, CR]
    split_by: patient          # patient (no patient on both sides) | image
    delimiter: null            # null: from the file ending (.tsv: tab)
    test_fraction: 0.2
    normalise: auto            # auto (federation statistics) | none | {{mean: .., std: ..}}""",
}

DATA_DIR = {"tabular": "data", "images": "data/images", "dicom": "data/dicom"}
"""Where each source's sample data goes, relative to the study. The experiment names it by
absolute path: Flower runs the app from a copy without its data files."""

MODEL = {
    "tabular": """model:
  arch: mlp                  # the task's build_model: mlp | linear | cnn (images)
  # factory: models.py:build # or a function of this study returning any torch nn.Module
  options:
    hidden: 32
    depth: 2
    activation: relu         # relu | tanh | gelu | silu | sigmoid
    batch_norm: false
    dropout: 0.0""",
    "images": """model:
  arch: cnn                  # the task's build_model: cnn | mlp | linear
  # factory: models.py:build # or a function of this study returning any torch nn.Module
  options:
    channels: [4, 8]         # per entry: Conv3x3 -> BatchNorm -> ReLU -> MaxPool
    batch_norm: true
    dropout: 0.0""",
}
MODEL["dicom"] = MODEL["images"]


def _experiment(name: str, source: str, data_dir: str, task_module: bool) -> str:
    if task_module:
        task = """task:
  module: task.py            # this study's task module (the task protocol: federation.tasks)
  # name: task               # defaults to the module's name
  data_dir: {data_dir}
  options: {{}}                # keyword arguments of task.load_task_data"""
    else:
        task = """task:
  name: {source}{pad}# tabular (CSV) | images | dicom | arrays (.npz) | mnist | wbc | angio
  # module: task.py          # or a task module of this study (see `more-fl new --task-module`)
  data_dir: {data_dir}
  options:
{options}"""
    task = task.format(
        source=source,
        pad=" " * max(1, 21 - len(source)),
        data_dir=json.dumps(data_dir),
        options=TASK_OPTIONS[source],
    )
    return f"""# {name}: every key of a more-fl experiment, with its default where it has one.
# A simulation (`flwr run .`, `more-fl run`) partitions the data in data_dir among the sites;
# a deployed site reads its own folder (`--node-config 'data-dir=...'`) and its own key.
name: {name}
{task}
{MODEL[source]}
sites:
  count: 3                   # a simulation uses as many sites as it has SuperNodes
  partition: iid             # iid | non-iid (label skew by Dirichlet(alpha))
  alpha: 0.5
training:
  rounds: 5
  local_epochs: 2
  batch_size: 32
  optimizer: adam            # sgd (momentum) | adam | adamw
  lr: 0.01
  # momentum: 0.9            # sgd only
  # betas: [0.9, 0.999]      # adam and adamw only
  # eps: 1.0e-8              # adam and adamw only
  weight_decay: 0.0
  keep_optimizer_state: false  # true: the optimiser state is averaged and carried on
  dtype: float64             # float64 | float32
  seed: 0
federation:
  min_sites: 2               # replies needed to aggregate a round
  encrypted: true            # false: the plaintext FedAvg baseline only
  secure_aggregation:        # Flower SecAgg+: the aggregator learns only the sum of updates
    enabled: false
    clipping_range: 32.0
    max_weight: 10000        # >= any site's training examples
    num_shares: 1.0
    reconstruction_threshold: 0.5
encryption:
  target_shadow: auto
  key_file: null             # null: the simulation key from key_seed; real sites need a key
  key_seed: 1234             #   file: `more-fl keygen --out keys/federation.key --parents`
  health_limit: 1.0e4
  # refresh_every: 1        # re-encrypt the model every N steps (default 1 for adam, 10 for sgd)
output_dir: runs/{name}
"""


TASK_MODULE_OPTIONS = {
    "tabular": {
        "file": SAMPLE,
        "features": list(FEATURES),
        "categorical": {"sex": ["F", "M"], "smoker": ["no", "yes"]},
        "target": "outcome",
        "kind": "classification",
        "classes": [0, 1],
        "missing": "impute",
    },
    "images": {"classes": list(IMAGE_CLASSES), "image_size": 16, "channels": 1},
    "dicom": {"labels": "labels.csv", "classes": list(IMAGE_CLASSES), "image_size": 16},
}


def _task_module(source: str) -> str:
    arch = "mlp" if source == "tabular" else "cnn"
    options = json.dumps(TASK_MODULE_OPTIONS[source], indent=4)
    return f'''"""This study's task, following more-fl's task protocol (see `federation.tasks`).

Replace the body of `load_task_data` with your own reader: it returns plain tensors in a
`TaskData`; the site encrypts them, nothing here sees a key or a ciphertext.
"""

from __future__ import annotations

from federation.tasks import models, {source}
from federation.tasks.base import TaskData

OPTIONS = {options}


def load_task_data(*, seed: int, data_dir: str | None = None) -> TaskData:
    """The site's data (a simulation's: all of it, partitioned among the sites)."""
    return {source}.load_task_data(seed=seed, data_dir=data_dir, **OPTIONS)


def model_io(options: dict) -> dict:
    """Input and output sizes, from the options alone (the aggregator has no data)."""
    return {source}.model_io(OPTIONS)


def build_model(arch: str = "{arch}", **options):
    """Any torch module the encrypted engine accepts (`more-fl verify` lists the layers)."""
    return models.build_model(arch, **options)
'''


WHAT_DATA = {
    "tabular": "put your table in `data/` (one CSV per hospital in a deployment)",
    "images": "put your images in `data/images/<class>/` (one folder per class)",
    "dicom": "put your DICOM files and `labels.csv` (file, label) in `data/dicom/`",
}


def _readme(name: str, source: str) -> str:
    return f"""# {name}

A more-fl study: each hospital encrypts its own data with the federation's MORE key, trains
on the ciphertexts, and the aggregator averages encrypted updates without the key.

```bash
more-fl train --config experiment.yaml   # centralised: plaintext and encrypted side by side
flwr run . --stream                       # the federation, simulated
```

(`more-fl run --config experiment.yaml` runs the federation on a SuperLink of its own.)

Edit `experiment.yaml` (every key is commented) and {WHAT_DATA[source]};
`more-fl data inspect --config experiment.yaml` shows what a site would train on.
Results go to `runs/{name}/` (`report.md`).
"""


def sample_data(source: str) -> dict[str, bytes]:
    """The source's sample files by path relative to the study's ``data/``."""
    if source == "images":
        return sample_images()
    if source == "dicom":
        return sample_dicom()
    return {SAMPLE: sample_table().encode()}


def new_study(directory: Path, *, source: str = "tabular", task_module: bool = False) -> list[Path]:
    """Write the study into ``directory`` (which must not exist or be empty); its files."""
    if source not in SOURCES:
        raise ScaffoldError(f"unknown source {source!r}: choose {', '.join(SOURCES)}")
    directory = directory.expanduser().absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ScaffoldError(f"{directory} exists and is not an empty folder; choose a new one")
    name = _slug(directory.name)
    data_dir = directory / DATA_DIR[source]
    files: dict[str, str | bytes] = {
        "pyproject.toml": _pyproject(name),
        "study_app.py": APP,
        "experiment.yaml": _experiment(name, source, str(data_dir), task_module),
        "README.md": _readme(name, source),
        ".gitignore": "runs/\nkeys/\n*.key\n__pycache__/\n",
    }
    if task_module:
        files["task.py"] = _task_module(source)
    files.update({f"data/{rel}": blob for rel, blob in sample_data(source).items()})
    parent = directory.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=parent))
    except OSError as exc:
        raise ScaffoldError(f"cannot write into {parent}: {exc.strerror or exc}") from None
    try:
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(text, bytes):
                path.write_bytes(text)
            else:
                path.write_text(text, encoding="utf-8")
        os.chmod(staging, 0o755)
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.rename(staging, directory)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ScaffoldError(f"cannot write {directory}: {exc.strerror or exc}") from None
    return [directory / relative for relative in files]
