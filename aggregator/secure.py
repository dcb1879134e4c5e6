"""One train round through Flower's SecAgg+ so the aggregator sees only the sum.

Flower 1.41's ``SecAggPlusWorkflow`` runs on the legacy ``LegacyContext``/``Strategy``
path; our round loop is the Message API. This adapter runs the workflow's four public stages
for one round, hands each site the same train content as an unmasked round (the strategy's
own messages), and collects the unmasked *sum* (already divided by the total weight) with
the sites' clear-text metrics. Validation of the result stays with
:meth:`federation.rounds.Aggregator.aggregate_secure`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from federation import protocol
from federation.aggregation import cast_average
from federation.config import SecureAggregationConfig
from federation.rounds import SecureReply, SecureResult
from federation.secagg import MODULUS, error_bound, quantization_range


class _Recorder(Grid):
    """The round's Grid, noting why each node dropped out: SecAgg+ keeps only the errors,
    not whose they were. Everything else is the wrapped Grid's."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.errors: dict[int, str] = {}

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        for reply in replies:
            node = to.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                self.errors[node] = reply.error.reason
        for node in to.values():
            self.errors[node] = "no reply within the round timeout"
        return replies


class _Collect(Strategy):
    """The legacy strategy SecAgg+ calls: sample the round's nodes, keep the sum.

    It serves the fit stages only; evaluation and initial parameters are the round loop's.
    """

    def __init__(self, nodes: list[int], grid: Grid) -> None:
        self.nodes, self.grid = nodes, grid
        self.average: list[np.ndarray] | None = None
        self.replies: list[SecureReply] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        run_id = self.grid.run.run_id
        return [(GridClientProxy(n, self.grid, run_id), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # SecAgg+ has put the unmasked average into every result's parameters.
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)
        self.replies = [
            SecureReply(int(proxy.cid), res.num_examples, dict(res.metrics))
            for proxy, res in results
        ]
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list, failures: list
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def secure_round(
    grid: Grid,
    messages: list[Message],
    server_round: int,
    settings: SecureAggregationConfig,
    timeout: float,
) -> SecureResult:
    """Run SecAgg+ over the strategy's train ``messages`` (one per node, at least one)."""
    nodes = [m.metadata.dst_node_id for m in messages]
    levels = quantization_range(len(nodes))
    workflow = SecAggPlusWorkflow(
        num_shares=settings.num_shares,
        reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=settings.max_weight,
        clipping_range=settings.clipping_range,
        quantization_range=levels,
        modulus_range=MODULUS,
        timeout=timeout,
    )
    recorder = _Recorder(grid)
    collect = _Collect(nodes, recorder)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: messages[0].content[protocol.ARRAYS],
        }
    )
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={}),
        strategy=collect,
    )
    stages = WorkflowState()
    completed = workflow.setup_stage(recorder, context, stages)
    # Each site trains on exactly what an unmasked round sends it (its own copy: the
    # collect stage adds the per-site share record to the content).
    stages.nid_to_fitins = {
        m.metadata.dst_node_id: RecordDict(
            {
                protocol.ARRAYS: m.content[protocol.ARRAYS],
                protocol.CONFIG: ConfigRecord(dict(m.content[protocol.CONFIG])),
            }
        )
        for m in messages
    }
    completed = completed and workflow.share_keys_stage(recorder, context, stages)
    # Flower 1.41 counts a site that left before sharing its keys as a dropout whose masks
    # must be removed, and asks the others for key shares they never got (every one of them
    # fails with a KeyError). No mask involves such a site: leave it out of the round.
    stages.sampled_node_ids = set(stages.active_node_ids)
    for stage in (workflow.collect_masked_vectors_stage, workflow.unmask_stage):
        completed = completed and stage(recorder, context, stages)
    weights = [r.num_examples for r in collect.replies]
    average = None
    if completed and collect.average is not None:
        # Sites send their arrays in the global model's order (the masked vector is nameless);
        # a sum of another length keeps positional names, which validation then refuses.
        model = messages[0].content[protocol.ARRAYS]
        if len(collect.average) == len(model):
            named = zip(model.items(), collect.average, strict=True)
            average = {name: cast_average(a, np.dtype(ref.dtype)) for (name, ref), a in named}
        else:
            average = {f"array {i}": a for i, a in enumerate(collect.average)}
    return SecureResult(
        average=average,
        replies=collect.replies,
        dropped=sorted(set(nodes) - {r.node for r in collect.replies}),
        errors=recorder.errors,
        levels=levels,
        bound=error_bound(
            weights,
            clipping_range=settings.clipping_range,
            max_weight=settings.max_weight,
            levels=levels,
            peak=settings.clipping_range,
        )
        if weights
        else 0.0,
    )
