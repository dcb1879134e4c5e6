"""``more-fl bench --suite full``: MORE against plaintext and against CKKS, side by side.

One run measures, on this machine and in one process (so the numbers compare):

1. a training epoch (a fixed number of batches) of every task model, plaintext against
   encrypted: time, memory held by a step, and their ratios (``epochs.py``);
2. one FedAvg round of 3 sites on the MNIST MLP update: bytes on the wire, encryption,
   aggregation and decryption time for plaintext, MORE, and CKKS with TenSEAL the way
   NVIDIA FLARE does it (each site encrypts its weighted flattened update, the server adds
   the ciphertexts and scales, the sites decrypt) (``aggregation.py``);
3. a logistic regression trained on encrypted data with MORE and with CKKS, following the
   TenSEAL tutorial (encrypted features, targets and weights, the degree-3 sigmoid
   approximation, one full-batch update per epoch), with a plaintext reference (``logreg.py``);
4. the encrypted/plaintext step ratio over layer width and batch size, against the 8
   multiply-adds a 2x2 ciphertext product costs per plaintext one (``scaling.py``);
5. section 1 again on a CUDA device, where one is available;
6. simulated federated rounds against the number of sites (``federated.py``; full mode only).

Results go to ``bench-suite.md`` (``markdown.py``: the tables and the headline) and PNG plots
(``plots.py``) in one folder, each file written atomically. Without TenSEAL the CKKS rows say
so instead of failing. How much each section measures is in ``sizes.py``.
"""

from __future__ import annotations

import importlib
import platform
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from federation.atomic import atomic_write_bytes
from federation.tools.bench.aggregation import bench_aggregation
from federation.tools.bench.epochs import bench_epoch, task_models
from federation.tools.bench.federated import bench_federation
from federation.tools.bench.logreg import bench_logreg
from federation.tools.bench.markdown import (
    aggregation_table,
    epoch_table,
    federation_table,
    headline,
    logreg_table,
    scaling_table,
)
from federation.tools.bench.plots import plot_aggregation, plot_logreg, plot_scaling, plot_training
from federation.tools.bench.scaling import GEMM_BOUND, bench_scaling
from federation.tools.bench.sizes import FULL, QUICK, TENSEAL_PIP

REPORT = "bench-suite.md"

Print = Callable[[str], None]


def _tenseal() -> ModuleType | None:
    try:
        return importlib.import_module("tenseal")
    except ImportError:
        return None


def run_suite(
    out_dir: Path, *, quick: bool = False, print_fn: Print = print, threads: int | None = None
) -> Path:
    """Run every section, write ``bench-suite.md`` and the plots into ``out_dir``; returns the
    markdown's path. Each file is replaced atomically, the markdown last.

    ``threads`` pins torch's intra-op threads for the run (restored after): on a machine
    shared with other work, 1 thread keeps small steps from waiting on busy cores.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out_dir), quick, print_fn)
    finally:
        torch.set_num_threads(previous)


def _run(out_dir: Path, quick: bool, print_fn: Print) -> Path:
    sizes = QUICK if quick else FULL
    ts = _tenseal()
    started = time.perf_counter()
    ckks = f"TenSEAL {ts.__version__}" if ts else f"TenSEAL not installed ({TENSEAL_PIP})"
    lines = [
        f"# more-fl benchmark suite ({'quick' if quick else 'full'})",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.machine()} {platform.system()}, Python {platform.python_version()}, {ckks}.",
        "",
    ]

    sections: list[str] = []

    def section(title: str, body: list[str]) -> None:
        sections.extend([f"## {title}", "", *body, ""])
        print_fn(f"\n## {title}\n" + "\n".join(body))

    cpu = torch.device("cpu")
    epochs = [
        bench_epoch(s, batches=sizes.batches, batch=sizes.batch, repeats=sizes.repeats, device=cpu)
        for s in task_models(sizes)
    ]
    plot_training(epochs, out_dir / "training.png")
    section(
        "1. Training epoch per task model (CPU)",
        [
            f"float32, SGD with momentum, median of {sizes.repeats} interleaved epochs. Memory: "
            "what one step holds (parameters, gradients, momentum, batch, saved activations).",
            "",
            *epoch_table(epochs),
            "",
            "![training](training.png)",
        ],
    )

    aggregation, values = bench_aggregation(sizes, ts)
    plot_aggregation(aggregation, out_dir / "aggregation.png")
    section(
        f"2. One FedAvg round, {sizes.sites} sites, MNIST MLP update ({values:,} values)",
        [
            "Plaintext and MORE send float32 arrays (MORE: 4 floats per value); CKKS sends "
            "serialised TenSEAL vectors (FLARE's context: N=8192, [60, 40, 40], scale 2^40, "
            "symmetric). The round counts every upload and every broadcast. In more-fl the "
            "sites train on ciphertexts, so their updates are encrypted already; MORE's encrypt "
            "and decrypt columns show what encrypting a plaintext update would cost.",
            "",
            *aggregation_table(aggregation, sizes.sites),
            "",
            "![aggregation](aggregation.png)",
        ],
    )

    logreg, source = bench_logreg(sizes, ts)
    plot_logreg(logreg, out_dir / "logreg.png")
    section(
        "3. Logistic regression on encrypted data",
        [
            f"{source}, {sizes.logreg_epochs} epoch(s) of full-batch gradient descent "
            "with the TenSEAL tutorial's update and degree-3 sigmoid. Accuracy: the decrypted "
            "model on the plaintext test set.",
            "",
            *logreg_table(logreg),
            "",
            "![logistic regression](logreg.png)",
        ],
    )

    scaling = [
        bench_scaling(w, b, sizes.scale_steps) for w in sizes.widths for b in sizes.scale_batches
    ]
    plot_scaling(scaling, out_dir / "scaling.png")
    section(
        "4. Encrypted / plaintext time ratio against width and batch",
        [
            f"Cells: whole training step / one Linear layer (forward + backward), best of "
            f"{sizes.scale_steps} alternated steps each. A 2x2 ciphertext product costs "
            f"{GEMM_BOUND:g} multiply-adds per plaintext one, so a Linear ratio above "
            f"{GEMM_BOUND:g} is data movement or kernel overhead; the activation and the "
            "softmax gradient add a per-element cost.",
            "",
            *scaling_table(scaling, sizes.scale_batches),
            "",
            "![scaling](scaling.png)",
        ],
    )

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        gpu_rows = [
            bench_epoch(
                s, batches=sizes.batches, batch=sizes.batch, repeats=sizes.repeats, device=gpu
            )
            for s in task_models(sizes)
        ]
        plot_training(gpu_rows, out_dir / "training-gpu.png")
        body = [*epoch_table(gpu_rows), "", "![training on GPU](training-gpu.png)"]
    else:
        body = ["No CUDA device here: skipped."]
    section(f"5. Training epoch per task model on GPU ({_gpu_name()})", body)

    federation = [bench_federation(n, sizes.federated_rounds) for n in sizes.site_counts]
    if sizes.site_counts:
        federation.append(bench_federation(3, sizes.federated_rounds, secure=True))
    section(
        "6. Federated rounds against the number of sites (Flower simulation, CPU)",
        [
            f"`configs/wbc.yaml`, {sizes.federated_rounds} rounds, one `more-fl run` per row "
            "(encrypted and the plaintext baseline); the median of the rounds after the "
            "first, which also loads and encrypts the data. Simulated sites share this "
            "machine's cores, so a round grows with the site count; the last row masks the "
            "updates with SecAgg+.",
            "",
            *(federation_table(federation) if federation else ["Skipped in quick mode."]),
        ],
    )

    lines += [
        "## Headline",
        "",
        *headline(epochs, aggregation, logreg, sizes, federation),
        "",
        *sections,
        f"Suite run time: {time.perf_counter() - started:.1f} s.",
    ]
    report = out_dir / REPORT
    atomic_write_bytes(report, ("\n".join(lines) + "\n").encode())
    print_fn(f"\nwrote {report}")
    return report


def _gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
