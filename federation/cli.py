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
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite == "full":
        from federation.bench_suite import run_suite

        path = run_suite(args.out, quick=args.quick)
        print(f"wrote {path}")
        return 0
    from federation import bench

    bench.run(quick=args.quick)
    return 0


def _train(args: argparse.Namespace) -> int:
    from federation.config import load_experiment
    from federation.experiment import compare_centralised, federation_key

    config = load_experiment(args.config)
    key = federation_key(config)
    print(
        f"{config.name}: task {config.task.name}, model {config.model.arch}, "
        f"{config.training.dtype}, key {key.fingerprint}"
    )

    def show(mode: str, epoch: int, metrics: dict[str, float]) -> None:
        shown = {k: v for k, v in metrics.items() if k != "epoch"}
        head = ", ".join(f"{k} {v:.4f}" for k, v in list(shown.items())[:4])
        print(f"  {mode:9} epoch {epoch + 1:3d}: {head}", flush=True)

    result = compare_centralised(config, key, epochs=args.epochs, on_epoch=show)
    final_p, final_e = result.plaintext.history[-1], result.encrypted.history[-1]
    print("\n| metric | plaintext | encrypted | abs. difference |\n|---|---:|---:|---:|")
    for name, value in final_p.items():
        if name != "epoch":
            print(
                f"| {name} | {value:.4f} | {final_e[name]:.4f} | {abs(value - final_e[name]):.2e} |"
            )
    print(
        f"\ntraining time: plaintext {result.plaintext.seconds:.1f} s, "
        f"encrypted {result.encrypted.seconds:.1f} s "
        f"(ratio {result.encrypted.seconds / result.plaintext.seconds:.1f})"
    )
    print(
        f"max weight deviation (decrypted vs plaintext): {result.param_abs:.3e} "
        f"(relative {result.param_rel:.3e})"
    )
    print(
        "control, plaintext vs plaintext with initial weights moved by one ulp: "
        f"{result.control_abs:.3e} (how much this training amplifies round-off)"
    )
    return 0


def _data(args: argparse.Namespace) -> int:
    from federation.tasks import get_task

    task = get_task(args.task)
    if args.task == "angio":
        if args.preview is None:
            print("more-fl data angio: pass --preview FILE.png", file=sys.stderr)
            return 2
        path = task.save_preview(args.preview, image_size=args.image_size, seed=args.seed)
        print(f"wrote {path}")
        return 0
    data = task.load_task_data(
        seed=args.seed, data_dir=args.data_dir, **({"progress": True} if args.task == "wbc" else {})
    )
    print(
        f"{args.task}: {len(data.x_train)} train and {len(data.x_test)} test examples, "
        f"features {tuple(data.x_train.shape[1:])}, {data.info}"
    )
    return 0


def _attack(args: argparse.Namespace) -> int:
    from federation.attacks import run_attack
    from federation.config import load_experiment

    report = run_attack(load_experiment(args.config), args.out, max_examples=args.max_examples)
    for line in report.summary_lines():
        print(line)
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from federation.deploy import cli_deploy

    return cli_deploy(args.config)


def _site(args: argparse.Namespace) -> int:
    from federation.deploy import cli_site

    return cli_site(args.config, args.site, print_only=args.print_only)


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

    p = sub.add_parser("train", help="centralised training, plaintext and encrypted side by side")
    p.add_argument("--config", type=Path, required=True, help="experiment YAML (configs/*.yaml)")
    p.add_argument("--epochs", type=int, default=None, help="default: rounds x local_epochs")
    p.set_defaults(func=_train)

    p = sub.add_parser("data", help="prepare or inspect a task's data")
    p.add_argument("task", choices=("mnist", "wbc", "angio"))
    p.add_argument("--preview", type=Path, default=None, help="angio: save a PNG montage")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_data)

    p = sub.add_parser("deploy", help="run a whole federation on this machine (SuperLink + sites)")
    p.add_argument("config", type=Path, help="deployment YAML (configs/deployments/*.yaml)")
    p.set_defaults(func=_deploy)

    p = sub.add_parser("site", help="the command a hospital runs to join a deployed federation")
    p.add_argument("--config", type=Path, required=True, help="deployment YAML")
    p.add_argument("--site", required=True, help="this site's name in the deployment")
    p.add_argument("--print", dest="print_only", action="store_true", help="only print it")
    p.set_defaults(func=_site)

    p = sub.add_parser("attack", help="run the known attacks on MORE against an experiment")
    p.add_argument("--config", type=Path, required=True, help="experiment YAML (configs/*.yaml)")
    p.add_argument("--out", type=Path, default=None, help="default: <output_dir>/attack")
    p.add_argument("--max-examples", type=int, default=2000)
    p.set_defaults(func=_attack)

    p = sub.add_parser("bench", help="plaintext vs encrypted training-step time and memory")
    p.add_argument("--quick", action="store_true", help="float32 only, fewer steps (< 1 min)")
    p.add_argument(
        "--suite",
        choices=("steps", "full"),
        default="steps",
        help="steps: the MLP/CNN step table; full: tasks, aggregation vs CKKS, scaling",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="full suite output dir")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
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
