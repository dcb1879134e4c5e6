"""An in-process Flower Grid for fast tests of the real ClientApp, strategy and ServerApp.

Each message goes through Flower's own wire encoding (deflate to object contents, inflate
back) to an in-process ``ClientApp`` with the node's ``Context``, and the reply comes back
the same way, as a SuperNode would deliver it; an exception escaping the ClientApp becomes
an ``Error`` reply exactly as ``flwr-clientapp`` builds it. ``tamper`` edits or drops replies
(a corrupted update, a site that died mid-round) and ``crash_after`` makes the Grid fail
after that many messages (an aggregator that dies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from uuid import uuid4

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from aggregator.server_app import main
from federation import protocol
from federation.aggregation import Checkpoint, RunStore, initial_arrays
from federation.config import load_experiment
from federation.more.keys import generate_key

SIMULATED = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
"""Node configs of three simulated sites, as Flower's simulation gives them."""


class AggregatorCrash(RuntimeError):
    """The Grid was told to fail (stands in for a killed aggregator process)."""


def over_the_wire(msg: Message) -> Message:
    """The message as the receiver sees it: content serialised and rebuilt by Flower."""
    if msg.has_error():
        return Message(error=msg.error, metadata=msg.metadata)
    objects = get_all_nested_objects(msg.content)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    content = inflate_object_from_contents(msg.content.object_id, contents)
    assert isinstance(content, RecordDict)
    return Message(content=content, metadata=msg.metadata)


class LocalGrid(Grid):
    def __init__(
        self,
        client_app: ClientApp,
        node_configs: list[dict],
        run_config: dict,
        *,
        tamper: Callable[[int, Message], Message | None] | None = None,
        crash_after: int | None = None,
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, cfg in enumerate(node_configs)
        }
        self.tamper = tamper
        self.crash_after = crash_after
        self.delivered = 0
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(1)
        # What the ServerApp process is told by its SuperLink: who sends the messages.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        received = over_the_wire(msg)
        try:
            reply = self.client_app(received, self.contexts[node])
        except Exception as exc:  # what flwr-clientapp does with an escaping exception
            reason = str(type(exc)) + ":<'" + str(exc) + "'>"
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=received)
        if self.tamper is not None:
            reply = self.tamper(node, reply)
        if reply is None:
            return None
        reply.metadata.__dict__["_message_id"] = uuid4().hex
        return over_the_wire(reply)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if self.crash_after is not None and self.delivered >= self.crash_after:
                raise AggregatorCrash(f"aggregator killed after {self.delivered} messages")
            self.delivered += 1
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            reply = self._deliver(msg)
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def server_run_config(experiment: Path, output: Path, **overrides: object) -> dict:
    """A ServerApp run config for ``experiment`` into ``output`` (no baseline, no reference)."""
    return {
        protocol.RUN_EXPERIMENT: str(experiment),
        protocol.RUN_OUTPUT_DIR: str(output),
        protocol.RUN_BASELINE: False,
        protocol.RUN_CENTRALISED: False,
        protocol.RUN_RESUME: True,
        protocol.RUN_ROUND_TIMEOUT: 60.0,
        protocol.RUN_JOIN_TIMEOUT: 0.0,
        **overrides,
    }


def serve(grid: Grid, config: dict) -> None:
    """Run the real ServerApp's main on ``grid``."""
    main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=config))


def decrypt_arrays(arrays: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The data channel of every ciphertext array under the simulation key ``seed``; arrays
    that are not ciphertexts (counters, optimiser steps) are returned as they are."""
    key = generate_key(seed)
    return {
        k: np.einsum("ij,...jk,kl->...il", key.inverse, v, key.matrix)[..., 0, 0]
        if v.shape[-2:] == (2, 2)
        else v
        for k, v in arrays.items()
    }


def assert_decrypts_to_plaintext(
    out: Path, seed: int = 1234, *, rounds: int = 2, atol: float = 1e-9
) -> tuple[Checkpoint, Checkpoint]:
    """The encrypted run under ``out`` decrypts (simulation key ``seed``) to its plaintext
    baseline, array by array, after ``rounds`` rounds; returns both checkpoints."""
    encrypted = RunStore(out / protocol.MODE_ENCRYPTED).load_latest()
    plaintext = RunStore(out / protocol.MODE_PLAINTEXT).load_latest()
    assert encrypted is not None and plaintext is not None
    assert encrypted.server_round == plaintext.server_round == rounds
    decrypted = decrypt_arrays(encrypted.arrays, seed)
    for name, value in plaintext.arrays.items():
        np.testing.assert_allclose(decrypted[name], value, rtol=0, atol=atol, err_msg=name)
    return encrypted, plaintext


def site_message(experiment: Path, kind: str = MessageType.TRAIN, **config: object) -> Message:
    """A round-1 message to one ClientApp, as the wire delivers it: the experiment's initial
    encrypted model and the round's config (``config`` adds or overrides entries)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    arrays = initial_arrays(load_experiment(experiment))
    settings = {protocol.SERVER_ROUND: 1, protocol.MODE: protocol.MODE_ENCRYPTED, **config}
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            protocol.CONFIG: ConfigRecord(settings),
        }
    )
    msg = Message(content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    return over_the_wire(msg)


def site_context(experiment: Path, node_config: dict) -> Context:
    """The ClientApp context of node 7 running ``experiment`` with ``node_config``."""
    return Context(
        run_id=1,
        node_id=7,
        node_config=node_config,
        state=RecordDict(),
        run_config=server_run_config(experiment, experiment.parent),
    )
