"""The attack's ``report.md``: recovery per target and how the data channel was found."""

from __future__ import annotations

from federation.config import ExperimentConfig
from federation.tools.attacks.results import RTOL, AttackReport, Recovery, pct


def _fmt_recovery(r: Recovery | None) -> str:
    if r is None:
        return "(defines the truth)"
    return f"{pct(r.rate)} (max {r.max_err:.1e}, mean {r.mean_err:.1e})"


def markdown(config: ExperimentConfig, report: AttackReport) -> str:
    lines = [
        f"# {config.name}: attacks on MORE ciphertexts",
        "",
        f"Task `{config.task.name}`, {config.training.dtype} ciphertexts, key fingerprint "
        f"`{report.fingerprint}`. Reproduce with `more-fl attack --config {config.source}`.",
        "",
        f"Attacked: the encrypted features and targets of {report.examples} training examples "
        f"of site 0 (encrypted as the site does), and the encrypted updates of "
        f"{report.updates} site(s) after one local round (what the aggregator receives). The "
        "attacks read ciphertext entries only; the key made the ciphertexts and scores the "
        "result.",
        *(f"Refused to send (health check): {reason}" for reason in report.refused),
        "",
        f"A value counts as recovered when it is within {RTOL:g} of the plaintext, relative "
        "to the largest plaintext magnitude of its target. Errors are absolute.",
        "",
        "## Recovery",
        "",
        "| target | values | eigenvalues contain x | equivalent key + 1 known pair | "
        "key + pair from 1 feature ciphertext | ciphertext only | key holder's decryption |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in report.targets:
        lines.append(
            f"| {t.name} | {t.values} | {_fmt_recovery(t.eigenvalues)} | "
            f"{_fmt_recovery(t.known_pair)} | {_fmt_recovery(t.feature_key)} | "
            f"{_fmt_recovery(t.blind)} by {t.blind_by} | {_fmt_recovery(t.key_holder)} |"
        )
    lines += [
        "",
        "- *eigenvalues contain x*: trace and determinant of each ciphertext give {x, r}; "
        "the closer one is scored (this step alone does not say which is x).",
        "- *equivalent key*: eigenvectors of one ciphertext of the target, then every other "
        "ciphertext decrypted with them; one known plaintext/ciphertext pair picks the channel.",
        "- *ciphertext only*: no pair. The data's channel is the one in which targets are "
        "predictable from features (*supervision*); an update's is the one whose model has "
        "the lower loss on public data of the task (*evaluation*; the task's held-out test "
        "split stands in for public data).",
        "",
        "## Which eigenvalue is the plaintext",
        "",
        "One bit per key: which channel of the equivalent key is the data. Each way of "
        "deciding it was tried on disjoint chunks of examples (or once per site update); ties "
        "count as failures.",
        "",
        "| target | method | right | undecided | trials | examples per trial |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for h in report.resolutions:
        lines.append(
            f"| {h.target} | {h.method} | {h.right}/{h.trials} ({pct(h.rate)}) | "
            f"{h.undecided} | {h.trials} | {h.examples} |"
        )
    lines += [
        "",
        "- *zeros*: image background is exactly 0; a uniform shadow is almost never 0.",
        "- *smoothness*: neighbouring pixels are close; shadows are independent per pixel.",
        "- *distribution*: the shadow policy is public (uniform over a range, or random valid "
        "labels); the channel farther from it is the data. Useless where the data is itself "
        "uniform (WBC inputs) or its labels are balanced.",
        "- *correlation*: dependent columns (e.g. pressures of one patient) are the data's; "
        "shadow entries are independent.",
        "- *supervision*: targets are predictable from features only in the data channel.",
        "- *evaluation*: the update's data-channel model has the lower loss on public data.",
        "",
        "## Figures",
        "",
        *(f"![{p.stem}]({p.name})" for p in report.figures),
        "",
        "MORE hides values from casual exposure only; see SECURITY.md.",
        "",
    ]
    return "\n".join(lines)
