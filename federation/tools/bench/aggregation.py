"""Section 2 of the suite: one FedAvg round of the MNIST MLP update, plaintext against MORE
against CKKS with TenSEAL the way NVIDIA FLARE does it (bytes on the wire, encryption,
aggregation and decryption time, error of the decrypted average)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from federation.aggregation import fedavg
from federation.more import EncryptedTensor, decrypt, encrypt, generate_key
from federation.nn.check import Deviation
from federation.tasks import get_task
from federation.tools.bench.sizes import TENSEAL_PIP, SuiteSizes


@dataclass(frozen=True)
class AggregationRow:
    """One FedAvg round: per-site upload and broadcast sizes, per-site encrypt and decrypt
    time, the aggregator's time, and the decrypted average's error against plaintext."""

    scheme: str
    up_bytes: int | None = None
    down_bytes: int | None = None
    encrypt_ms: float | None = None
    aggregate_ms: float | None = None
    decrypt_ms: float | None = None
    max_error: float | None = None
    note: str = ""


def _site_updates(sizes: SuiteSizes, seed: int) -> list[tuple[dict[str, np.ndarray], int]]:
    """Each site's MNIST MLP update (float32) and its example count."""
    torch.manual_seed(seed)
    state = get_task("mnist").build_model("mlp", hidden=sizes.mlp_hidden).state_dict()
    rng = np.random.default_rng(seed)
    return [
        (
            {k: (v.numpy() + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
             for k, v in state.items()},
            int(n),
        )
        for n in rng.integers(100, 1000, size=sizes.sites)
    ]  # fmt: skip


def _ms(start: float) -> float:
    return 1e3 * (time.perf_counter() - start)


def _max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    def tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(a)) for k, a in arrays.items()}

    return Deviation.between(tensors(got), tensors(want)).abs


def aggregate_plain(
    updates: list[tuple[dict[str, np.ndarray], int]], reference: dict[str, np.ndarray]
) -> AggregationRow:
    """float32 arrays as they are; the error is float32 rounding of the average."""
    start = time.perf_counter()
    average = fedavg(updates)
    aggregate_ms = _ms(start)
    size = sum(a.nbytes for a in updates[0][0].values())
    return AggregationRow(
        "plaintext FedAvg", size, size, 0.0, aggregate_ms, 0.0, _max_error(average, reference)
    )


def aggregate_more(
    updates: list[tuple[dict[str, np.ndarray], int]], reference: dict[str, np.ndarray]
) -> AggregationRow:
    """Sites encrypt with the shared key; the aggregator averages ciphertexts without it."""
    key = generate_key(0)
    start = time.perf_counter()
    sent = [
        ({k: encrypt(torch.from_numpy(a), key).entries.numpy() for k, a in arrays.items()}, n)
        for arrays, n in updates
    ]
    encrypt_ms = _ms(start) / len(updates)
    start = time.perf_counter()
    average = fedavg(sent)
    aggregate_ms = _ms(start)
    start = time.perf_counter()
    plain = {
        k: decrypt(EncryptedTensor(torch.from_numpy(v), key.fingerprint), key).numpy()
        for k, v in average.items()
    }
    decrypt_ms = _ms(start)
    size = sum(a.nbytes for a in sent[0][0].values())
    return AggregationRow(
        "MORE FedAvg", size, size, encrypt_ms, aggregate_ms, decrypt_ms,
        _max_error(plain, reference),
    )  # fmt: skip


def aggregate_ckks(
    ts: ModuleType,
    updates: list[tuple[dict[str, np.ndarray], int]],
    reference: dict[str, np.ndarray],
) -> AggregationRow:
    """NVIDIA FLARE's HE path: FLARE's default context (CKKS, N=8192, [60, 40, 40], scale
    2^40, symmetric), the site multiplies its update by its weight and encrypts it, the
    server deserialises, adds, scales by 1/total and serialises, the site decrypts.

    Arrays are split into vectors of N/2 slots, as TenSEAL does internally for long ones.
    """
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=[60, 40, 40],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    context.generate_relin_keys()
    context.global_scale = 2**40
    slots = 8192 // 2
    start = time.perf_counter()
    sent = [
        {
            k: [
                ts.ckks_vector(context, chunk.tolist()).serialize()
                for chunk in np.array_split(a.astype(np.float64).ravel() * n, -(-a.size // slots))
            ]
            for k, a in arrays.items()
        }
        for arrays, n in updates
    ]
    encrypt_ms = _ms(start) / len(updates)
    total = float(sum(n for _, n in updates))
    start = time.perf_counter()
    wire: dict[str, list[bytes]] = {}
    for k, chunks in sent[0].items():
        wire[k] = []
        for i in range(len(chunks)):
            acc = ts.ckks_vector_from(context, sent[0][k][i])
            for site in sent[1:]:
                acc += ts.ckks_vector_from(context, site[k][i])
            wire[k].append((acc * (1.0 / total)).serialize())
    aggregate_ms = _ms(start)
    start = time.perf_counter()
    plain = {
        k: np.concatenate(
            [ts.ckks_vector_from(context, blob).decrypt() for blob in chunks]
        ).reshape(updates[0][0][k].shape)
        for k, chunks in wire.items()
    }
    decrypt_ms = _ms(start)
    return AggregationRow(
        "CKKS FedAvg (TenSEAL, FLARE-style)",
        sum(len(b) for chunks in sent[0].values() for b in chunks),
        sum(len(b) for chunks in wire.values() for b in chunks),
        encrypt_ms,
        aggregate_ms,
        decrypt_ms,
        _max_error(plain, reference),
    )


def bench_aggregation(
    sizes: SuiteSizes, ts: ModuleType | None, seed: int = 0
) -> tuple[list[AggregationRow], int]:
    """The three schemes on the same site updates; also returns the update's value count.

    The reference is the float64 average of the float32 updates."""
    updates = _site_updates(sizes, seed)
    reference = {
        k: v.astype(np.float64)
        for k, v in fedavg(
            [({k: a.astype(np.float64) for k, a in arr.items()}, n) for arr, n in updates]
        ).items()
    }
    rows = [aggregate_plain(updates, reference), aggregate_more(updates, reference)]
    if ts is None:
        rows.append(AggregationRow("CKKS FedAvg", note=f"TenSEAL not installed ({TENSEAL_PIP})"))
    else:
        rows.append(aggregate_ckks(ts, updates, reference))
    return rows, sum(a.size for a in updates[0][0].values())
