"""The ``more-fl`` command: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _keygen(args: argparse.Namespace) -> int:
    from federation.more.keys import generate_key, save_key

    key = generate_key(args.seed, max_cond=args.max_cond)
    path = save_key(key, args.out, overwrite=args.force)
    print(f"wrote {path} (mode 0600, condition number {key.condition_number:.2f})")
    print(f"fingerprint: {key.fingerprint}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from federation import verify

    return 0 if verify.run(seed=args.seed) else 1


def _bench(args: argparse.Namespace) -> int:
    from federation import bench

    bench.run(quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="more-fl", description="Federated deep learning on MORE-encrypted data."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="generate a MORE key file and print its fingerprint")
    p.add_argument("--out", type=Path, required=True, help="key file to write (mode 0600)")
    p.add_argument(
        "--seed", type=int, default=None, help="reproducible test key (default: OS randomness)"
    )
    p.add_argument("--max-cond", type=float, default=10.0, help="condition-number bound")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("verify", help="check encrypted training equals plaintext training")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_verify)

    p = sub.add_parser("bench", help="plaintext vs encrypted training-step time and memory")
    p.add_argument("--quick", action="store_true", help="float32 only, fewer steps (< 1 min)")
    p.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError) as exc:
        print(f"more-fl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
