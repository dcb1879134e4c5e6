"""The ``images`` source: a site's PNG/JPEG images, one folder per class.

.. code-block:: yaml

    task:
      name: images
      data_dir: data/xrays/      # data/xrays/normal/*.png, data/xrays/pneumonia/*.png
      options:
        classes: [normal, pneumonia]
        image_size: [64, 64]     # or 64
        channels: 1              # 1: grayscale, 3: RGB
    model: {arch: cnn}

Options (``task.options``):

- ``classes`` (required): the class folders under ``task.data_dir``, in order (class ``i`` is
  the ``i``-th; at least 2). A folder under ``data_dir`` that is not listed, or a listed
  folder that is missing, is refused naming it: a site without images of a class keeps an
  empty folder of that name. Images in sub-folders of a class folder belong to that class.
- ``image_size`` (required): ``[height, width]``, or one number for a square.
- ``channels`` (required): ``1`` (grayscale: colour images are converted to their luma,
  ITU-R 601) or ``3`` (RGB: grayscale images are repeated in the three channels). An alpha
  channel is dropped.
- ``resample`` (default ``bilinear``): the resizing filter, one of ``nearest``, ``box``,
  ``bilinear``, ``hamming``, ``bicubic``, ``lanczos`` (Pillow's; when shrinking, they
  average over the source pixels each output pixel covers, so there is no aliasing).
- ``fit`` (default ``stretch``): ``stretch`` to ``image_size`` (the aspect ratio may
  change), ``crop`` (centre-crop to the aspect ratio of ``image_size`` first) or ``pad``
  (shrink to fit, pad with the image's minimum, centred).
- ``extensions`` (default ``[png, jpg, jpeg]``): the file endings read as images (any case).
  Other files are not inputs: they are listed in ``info["ignored"]``; hidden files and
  folders (a name starting with ``.``) are passed over.
- ``on_error`` (default ``error``): an unreadable image (empty, truncated, corrupt, not an
  image) is refused with one line naming it and why, so that a study never loses images
  silently; ``skip`` leaves such images out and lists each, with its reason, in
  ``info["skipped"]`` (printed by ``more-fl data inspect`` and by training).
- ``test_fraction`` (default 0.2): held-out share of the images, seeded by the experiment
  seed.
- ``normalise``: ``auto`` (default: one global mean and std, from the data or the
  federation's statistics), ``none``, or ``{mean: ..., std: ...}``.

Pixel values: 8-bit images are divided by 255 and 16-bit grayscale images (PNG) by 65535,
so that images of either depth lie in [0, 1] before normalisation. The EXIF orientation of
a photograph is applied; an animated or multi-page file contributes its first frame.

``load_raw``, ``load_task_data(..., stats=...)`` and the statistics protocol are as for
:mod:`federation.tasks.tabular`. :func:`resize` and the option checks here serve the
``dicom`` source too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from federation.tasks import models
from federation.tasks.base import TaskData, classification_split
from federation.tasks.stats import DataStats, FeatureStats, prepare, split_indices

PRIVATE_DATA_DIR = True
"""A study's own images: the seeded simulation key draws a warning on them."""

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
"""Resizing filters by their option name."""
FITS = ("stretch", "crop", "pad")
ON_ERROR = ("error", "skip")

DEFAULTS: dict[str, object] = {
    "resample": "bilinear",
    "fit": "stretch",
    "extensions": ("png", "jpg", "jpeg"),
    "on_error": "error",
    "test_fraction": 0.2,
    "normalise": "auto",
}
"""Defaults of the optional options (``classes``, ``image_size`` and ``channels`` have
none)."""

REQUIRED = ("classes", "image_size", "channels")
OPTIONS = frozenset({*REQUIRED, *DEFAULTS})


# -- options shared with the dicom source --------------------------------------------------


def option_error(source: str, name: str, expected: str, value: object) -> ValueError:
    return ValueError(f"{source}: task.options.{name} must be {expected}, got {value!r}")


def check_unknown(source: str, options: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"{source}: unknown task.options {', '.join(unknown)} "
            f"(it takes {', '.join(sorted(known))})"
        )


def parse_image_size(source: str, value: object) -> tuple[int, int]:
    """``[height, width]`` or one size for a square."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise option_error(source, "image_size", "[height, width] or one size", value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise option_error(source, "image_size", "positive integers", value)
    return int(value[0]), int(value[1])


def parse_channels(source: str, value: object) -> int:
    if isinstance(value, bool) or value not in (1, 3):
        raise option_error(source, "channels", "1 (grayscale) or 3 (RGB)", value)
    return int(value)  # type: ignore[call-overload]


def parse_choice(source: str, name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise option_error(source, name, "one of " + ", ".join(choices), value)
    return value


def parse_fraction(source: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise option_error(source, "test_fraction", "a number in (0, 1)", value)
    return float(value)


def class_names(source: str, value: object) -> tuple[str, ...]:
    """At least 2 distinct class names (numbers allowed: YAML reads ``[0, 1]`` as such)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) < 2:
        raise option_error(source, "classes", "a list of at least 2 class names", value)
    names = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, str | int | float) or not str(v).strip():
            raise option_error(source, "classes", "names (text or numbers)", value)
        names.append(str(v).strip())
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise option_error(source, "classes", "distinct names", f"{', '.join(twice)} twice")
    return tuple(names)


def resize(
    image: np.ndarray,
    size: tuple[int, int],
    resample: str = "bilinear",
    fit: str = "stretch",
) -> np.ndarray:
    """``image`` ``[C, H, W]`` (any real values) resized to ``size`` (height, width), float32.

    Each channel is resampled in 32-bit floating point with Pillow's ``resample`` filter
    (no rounding to 8 bits in between). ``fit``: ``stretch``, ``crop`` (centre-crop to the
    target aspect ratio) or ``pad`` (shrink to fit, pad with the image's minimum).
    """
    if resample not in RESAMPLE or fit not in FITS:
        raise ValueError(f"resample must be one of {list(RESAMPLE)}, fit one of {FITS}")
    channels, h, w = image.shape
    th, tw = size
    box = (0.0, 0.0, float(w), float(h))
    inner = (th, tw)
    if fit == "crop":
        scale = max(th / h, tw / w)
        bw, bh = tw / scale, th / scale
        box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)
    elif fit == "pad":
        scale = min(th / h, tw / w)
        inner = (min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale))))
    planes = []
    for c in range(channels):
        plane = Image.fromarray(np.ascontiguousarray(image[c], dtype=np.float32))
        out = plane.resize((inner[1], inner[0]), RESAMPLE[resample], box=box)
        planes.append(np.asarray(out, dtype=np.float32))
    resized = np.stack(planes)
    if inner == (th, tw):
        return resized
    canvas = np.full((channels, th, tw), float(image.min()), dtype=np.float32)
    top, left = (th - inner[0]) // 2, (tw - inner[1]) // 2
    canvas[:, top : top + inner[0], left : left + inner[1]] = resized
    return canvas


# -- the images source ---------------------------------------------------------------------


@dataclass(frozen=True)
class ImagesSpec:
    """The parsed ``task.options`` (no data read)."""

    classes: tuple[str, ...]
    image_size: tuple[int, int]
    channels: int
    resample: str
    fit: str
    extensions: tuple[str, ...]
    on_error: str
    test_fraction: float
    normalise: object

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)


def _extensions(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not items:
        raise option_error("images", "extensions", "a file ending or a list of them", value)
    out = []
    for item in items:
        if not isinstance(item, str) or not item.strip().lstrip(".").strip():
            raise option_error("images", "extensions", "file endings such as png", value)
        out.append(item.strip().lstrip(".").lower())
    return tuple(dict.fromkeys(out))


def parse_options(options: Mapping[str, Any]) -> ImagesSpec:
    """Validate ``task.options`` (without reading data); ``ValueError`` names the option."""
    check_unknown("images", options, OPTIONS)
    missing = [name for name in REQUIRED if options.get(name) is None]
    if missing:
        raise ValueError(f"images: task.options needs {', '.join(missing)}")
    o = {**DEFAULTS, **options}
    classes = class_names("images", o["classes"])
    for name in classes:
        if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\"):
            raise option_error(
                "images", "classes", "folder names (no '/', not hidden)", list(classes)
            )
    return ImagesSpec(
        classes=classes,
        image_size=parse_image_size("images", o["image_size"]),
        channels=parse_channels("images", o["channels"]),
        resample=parse_choice("images", "resample", o["resample"], tuple(RESAMPLE)),
        fit=parse_choice("images", "fit", o["fit"], FITS),
        extensions=_extensions(o["extensions"]),
        on_error=parse_choice("images", "on_error", o["on_error"], ON_ERROR),
        test_fraction=parse_fraction("images", o["test_fraction"]),
        normalise=o["normalise"],
    )


def _root(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise ValueError(
            "images: task.data_dir is required: the folder holding one folder of images per class"
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        what = "not a folder" if root.exists() else "folder not found"
        raise ValueError(f"{root}: {what} (task.data_dir)")
    return root


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _scan(root: Path, spec: ImagesSpec) -> tuple[list[tuple[Path, int]], list[tuple[str, str]]]:
    """(image file, class index) in class order then path order, and the files passed over.

    Refuses a folder that is not a class, a class without its folder, and an image lying
    directly in ``root`` (it has no class)."""
    listed = ", ".join(spec.classes)
    ignored: list[tuple[str, str]] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name not in spec.classes:
                near = [c for c in spec.classes if c.lower() == entry.name.lower()]
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(
                    f"{entry}: folder {entry.name!r} is not a class (task.options.classes: "
                    f"{listed}){hint}; list it or move it out of {root}"
                )
        elif entry.suffix.lower().lstrip(".") in spec.extensions:
            raise ValueError(
                f"{entry}: an image outside the class folders has no class; move it into "
                "the folder of its class"
            )
        else:
            ignored.append((str(entry), "not in a class folder"))
    images: list[tuple[Path, int]] = []
    for index, name in enumerate(spec.classes):
        folder = root / name
        if not folder.is_dir():
            raise ValueError(
                f"{folder}: no folder for class {name!r} (task.options.classes: {listed}); a "
                "site without images of a class keeps an empty folder of that name"
            )
        for path in sorted(folder.rglob("*")):
            if _hidden(path, folder) or path.is_dir():
                continue
            ending = path.suffix.lower().lstrip(".")
            if ending in spec.extensions:
                images.append((path, index))
            else:
                ending = f".{ending}" if ending else "no extension"
                ignored.append((str(path), f"{ending} is not in task.options.extensions"))
    return images, ignored


def _gray16(im: Image.Image) -> np.ndarray | None:
    """16-bit (and 32-bit integer or float) grayscale as float32 [H, W], 16-bit scaled to
    [0, 1]; None for the 8-bit modes Pillow converts itself."""
    if im.mode.startswith("I;16") or im.mode == "I":
        return np.asarray(im, dtype=np.float32) / 65535.0
    if im.mode == "F":
        return np.asarray(im, dtype=np.float32)
    return None


def read_image(path: Path, channels: int) -> np.ndarray | str:
    """The image in ``path`` as float32 ``[channels, H, W]`` in [0, 1], or why it is
    unreadable (one line)."""
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as opened:
            opened.load()
            im = ImageOps.exif_transpose(opened)
            gray = _gray16(im)
            if gray is not None:
                pixels = gray[None] if channels == 1 else np.repeat(gray[None], 3, axis=0)
            elif channels == 1:
                pixels = np.asarray(im.convert("L"), dtype=np.float32)[None] / 255.0
            else:
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
                pixels = np.moveaxis(rgb, -1, 0)
    except UnidentifiedImageError:
        return f"not an image Pillow can read ({size} bytes)"
    except Exception as exc:  # truncated or corrupt data surfaces as many exception types
        text = str(exc).replace("\n", " ")
        if "truncated" in text.lower():
            return f"truncated image ({size} bytes: {text})"
        return f"corrupt image ({type(exc).__name__}: {text})"
    if pixels.shape[1] < 1 or pixels.shape[2] < 1 or not np.isfinite(pixels).all():
        return f"unusable pixel values (shape {pixels.shape[1:]}, or not finite)"
    return np.ascontiguousarray(pixels, dtype=np.float32)


def refuse_unusable(
    where: Path, count: int, skipped: Sequence[tuple[str, str]], what: str
) -> ValueError:
    """The refusal of a folder with fewer than 2 usable images, quoting the first reasons."""
    shown = "; ".join(f"{Path(p).name}: {r}" for p, r in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    detail = f" ({len(skipped)} skipped: {shown}{more})" if skipped else ""
    return ValueError(
        f"{where}: {count} usable {what}{detail}: a site needs at least 2 (one train, one test)"
    )


def load_raw(*, seed: int = 0, data_dir: str | Path | None = None, **options: Any) -> TaskData:
    """Every image read, converted, resized and split, in [0, 1] (not standardised)."""
    spec = parse_options(options)
    root = _root(data_dir)
    files, ignored = _scan(root, spec)
    if not files:
        raise ValueError(
            f"{root}: no images ({', '.join(spec.extensions)}) in the class folders "
            f"{', '.join(spec.classes)}"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    for path, index in files:
        result = read_image(path, spec.channels)
        if isinstance(result, str):
            skipped.append((str(path), result))
            continue
        images.append(resize(result, spec.image_size, spec.resample, spec.fit))
        labels.append(index)
    if skipped and spec.on_error == "error":
        path, reason = skipped[0]
        more = f" (and {len(skipped) - 1} more unreadable images)" if len(skipped) > 1 else ""
        raise ValueError(
            f"{path}: {reason}{more}; set task.options.on_error: skip to leave unreadable "
            "images out (each is then listed with its reason)"
        )
    if len(images) < 2:
        raise refuse_unusable(root, len(images), skipped, "image(s)")
    x = np.stack(images)
    y = np.array(labels, dtype=np.int64)
    train, test = split_indices(len(y), spec.test_fraction, seed, str(root))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    counts = np.bincount(y, minlength=len(spec.classes))
    info: dict[str, object] = {
        "source": "images",
        "data_dir": str(root),
        "input_shape": spec.input_shape,
        "class_counts": {name: int(n) for name, n in zip(spec.classes, counts, strict=True)},
        "skipped": skipped,
        "ignored": ignored,
    }
    return classification_split("images", xt, yt, train, test, spec.classes, info)


def load_task_data(
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    stats: DataStats | FeatureStats | None = None,
    **options: Any,
) -> TaskData:
    """The images, ready to train: standardised (``normalise`` option) with ``stats`` (the
    federation's; :mod:`federation.tasks.stats`) or the loaded data's own."""
    spec = parse_options(options)
    raw = load_raw(seed=seed, data_dir=data_dir, **options)
    return prepare(raw, stats, declared=spec.normalise, where=str(_root(data_dir)))


def model_io(options: Mapping[str, Any]) -> dict[str, Any]:
    """``input_shape`` ``(C, H, W)`` and ``num_outputs``, from the options alone."""
    spec = parse_options({k: v for k, v in options.items() if k not in ("data_dir", "seed")})
    return {"input_shape": spec.input_shape, "num_outputs": len(spec.classes)}


def split_sizes(options: Mapping[str, Any]) -> tuple[int, int] | None:
    """(train, test) image counts; None where the folder is not here (an aggregator).

    Under ``on_error: error`` from the file listing (an unreadable image refuses the whole
    folder anyway); under ``skip`` every image is read."""
    opts = dict(options)
    data_dir = opts.pop("data_dir", None)
    opts.pop("seed", None)
    spec = parse_options(opts)
    if data_dir is None or not Path(data_dir).expanduser().is_dir():
        return None
    if spec.on_error == "skip":
        raw = load_raw(data_dir=data_dir, **opts)
        return len(raw.y_train), len(raw.y_test)
    root = _root(data_dir)
    files, _ = _scan(root, spec)
    train, test = split_indices(len(files), spec.test_fraction, 0, str(root))
    return len(train), len(test)


def build_model(arch: str = "cnn", **options: Any) -> nn.Module:
    """A generic model (:mod:`federation.tasks.models`; ``cnn`` by default); the engine
    passes ``input_shape`` and ``num_outputs`` from :func:`model_io`."""
    return models.build_model(arch, **options)
