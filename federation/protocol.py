"""Every name shared by the site (ClientApp) and the aggregator (ServerApp), and nothing else.

One place, so a renamed key cannot silently break the wire format between the two sides.

Train message (aggregator -> site), ``RecordDict``::

    ARRAYS: ArrayRecord   the global model (ciphertexts [..., 2, 2] or plain weights)
    CONFIG: ConfigRecord  {SERVER_ROUND: int, MODE: MODE_ENCRYPTED | MODE_PLAINTEXT,
                           EXPERIMENT_DIGEST: str, NUM_SITES: int,
                           FINGERPRINT: str (the federation's key, once it is known)}

Train reply (site -> aggregator)::

    ARRAYS:  ArrayRecord   the site's update (same names and shapes as the global model)
    METRICS: MetricRecord  {NUM_EXAMPLES: int, <site metrics>...}
    SITE:    ConfigRecord  {SITE_ID: int, FINGERPRINT: str (encrypted mode only)}

Evaluate message: as train. Evaluate reply: METRICS and SITE only (no arrays).
A site that cannot or will not reply with an update answers with an ``Error`` instead.

Secure aggregation (``federation.secure_aggregation``) runs Flower's SecAgg+ around the
train message: its four stages are train messages carrying Flower's ``secaggplus_configs``
record; the third also carries ARRAYS and CONFIG as above, and the site's reply is Flower's
legacy ``fitres`` (masked integer vectors only; METRICS and SITE entries become its metrics).
Federation statistics then come in SecAgg+ rounds too (STATISTICS_PASS below).
"""

from __future__ import annotations

from enum import StrEnum

# Record names inside a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
STATISTICS = "statistics"
"""A site's feature statistics (reply to the statistics query, an ArrayRecord); and, in every
later message's CONFIG, the federation's sum of them as JSON (see ``federation.tasks.stats``)."""

# Secure statistics (``federation.secure_stats``): the query's CONFIG carries STATISTICS_PASS
# = STATISTICS_SHAPE, and the site answers with only its row count (NUM_EXAMPLES) and the
# STATISTICS_FEATURES/PER_ROW/TARGETS sizes in METRICS; then each pass is a SecAgg+ train
# round whose CONFIG carries STATISTICS_PASS = the pass's name and STATISTICS_PARAMETERS (its
# public scales, JSON), and whose ARRAYS are zeros shaped like the site's reply vectors.
STATISTICS_PASS = "statistics-pass"
STATISTICS_SHAPE = "shape"
STATISTICS_PARAMETERS = "statistics-parameters"
STATISTICS_FEATURES = "statistics-features"
STATISTICS_PER_ROW = "statistics-per-row"
STATISTICS_TARGETS = "statistics-targets"

# ConfigRecord entries sent to sites (FINGERPRINT below too, once the federation's is known).
SERVER_ROUND = "server-round"
MODE = "mode"


class Mode(StrEnum):
    """Which federated run a message and a site belong to: on ciphertexts, or the plaintext
    baseline with the same seeds. Its value is what goes on the wire and names the run's
    folder."""

    ENCRYPTED = "encrypted"
    PLAINTEXT = "plaintext"


MODE_ENCRYPTED = Mode.ENCRYPTED
MODE_PLAINTEXT = Mode.PLAINTEXT
MODES = tuple(Mode)
# The aggregator's experiment (digest of :func:`federation.config.experiment_fields`): a site
# that loaded other settings refuses. NUM_SITES: the federation's site count (in simulation,
# Flower's node count).
EXPERIMENT_DIGEST = "experiment-digest"
NUM_SITES = "num-sites"

# The site's own Context.state record of the SecAgg+ settings announced at setup (Flower's
# ``Key.CLIPPING_RANGE``, ``Key.MAX_WEIGHT``, ``Key.TARGET_RANGE``), to check its update.
SECURE_SETTINGS = "more-fl.secure-aggregation"

# MetricRecord / ConfigRecord entries sent back by sites.
NUM_EXAMPLES = "num-examples"
FINGERPRINT = "fingerprint"
SITE_ID = "site-id"

# Node config (``flower-supernode --node-config``): which site a SuperNode is, and its own
# data and key (site-local paths override the experiment's). Simulation sets PARTITION_ID.
NODE_SITE_ID = "site-id"
NODE_DATA_DIR = "data-dir"
NODE_KEY_FILE = "key-file"
# Where a deployed site keeps its ciphertexts between rounds (``federation.ciphercache``;
# "off": re-encrypt in every process).
NODE_CACHE_DIR = "cache-dir"
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"

# Run config (``[tool.flwr.app.config]`` in pyproject.toml, ``flwr run --run-config``).
RUN_EXPERIMENT = "experiment"
RUN_PROJECT_DIR = "project-dir"
RUN_OUTPUT_DIR = "output-dir"
RUN_BASELINE = "baseline"
RUN_CENTRALISED = "centralised"
RUN_RESUME = "resume"
RUN_ROUND_TIMEOUT = "round-timeout"
RUN_JOIN_TIMEOUT = "join-timeout"

RUN_DEFAULTS: dict[str, str | bool | float] = {
    RUN_PROJECT_DIR: "",
    RUN_OUTPUT_DIR: "",
    RUN_BASELINE: True,
    RUN_CENTRALISED: True,
    RUN_RESUME: True,
    RUN_ROUND_TIMEOUT: 3600.0,
    RUN_JOIN_TIMEOUT: 30.0,
}
"""Every run-config key but the experiment, with its default: what an app's
``[tool.flwr.app.config]`` declares (a test holds more-fl's pyproject to it, and
``more-fl new`` writes it into a study's)."""
