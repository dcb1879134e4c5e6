"""The Flower internals more-fl relies on, pinned in one place.

`aggregator/secure.py` drives SecAgg+'s stages on Flower's legacy context, the ServerApp
tells a simulation by its Grid class, the test Grid writes message ids and rebuilds messages
as the wire does, and the launcher reads `flwr` CLI output. None of these is a stable public
API: when a Flower upgrade changes one, this file fails and says which, before anything
else breaks in a less readable way. After checking each item below against the new Flower,
move the pin (``FLOWER_SERIES``) and ``pyproject.toml``'s ``flwr`` bound together.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import tomllib

import flwr
import pytest

from tests.paths import ROOT

FLOWER_SERIES = "1.42."

INTERNALS = {
    # aggregator/secure.py: SecAgg+ stage by stage on the legacy context
    "flwr.server.compat.legacy_context": ["LegacyContext"],
    "flwr.server.compat.grid_client_proxy": ["GridClientProxy"],
    "flwr.server.workflow": ["SecAggPlusWorkflow"],
    "flwr.server.workflow.constant": ["MAIN_CONFIGS_RECORD", "MAIN_PARAMS_RECORD", "Key"],
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow": ["WorkflowState"],
    "flwr.server.strategy": ["Strategy"],
    # sites/client_app.py: the SecAgg+ mod and its message keys; the legacy FitRes reply
    "flwr.client.mod": ["secaggplus_mod"],
    "flwr.common.secure_aggregation.secaggplus_constants": ["RECORD_KEY_CONFIGS", "Key", "Stage"],
    "flwr.compat.common.recorddict_compat": ["fitres_to_recorddict"],
    # aggregator/server_app.py: a simulation's Grid
    "flwr.superlink.grid": ["InMemoryGrid"],
    # tests/flower/flower_grid.py: the wire encoding and the ServerApp process identity
    "flwr.supercore.inflatable.inflatable_object": ["get_all_nested_objects"],
    "flwr.supercore.inflatable.inflatable_utils": ["inflate_object_from_contents"],
    "flwr.supercore.run": ["Run"],
    "flwr.supercore.task_identity": ["TaskIdentity"],
    # federation/tools/deploy/pki.py: SuperNode authentication keys
    "flwr.cli.supernode.register": ["try_load_public_key"],
}


def test_the_installed_flower_is_the_series_this_contract_was_checked_on() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (bound,) = [d for d in declared if d.startswith("flwr")]
    assert flwr.__version__.startswith(FLOWER_SERIES), (
        f"Flower {flwr.__version__} is installed, this contract pins {FLOWER_SERIES}x: check "
        "every item in tests/flower/test_contract.py against it, then move the pin"
    )
    assert (
        f"<{FLOWER_SERIES[:-1].rsplit('.', 1)[0]}.{int(FLOWER_SERIES.split('.')[1]) + 1}" in bound
    )


@pytest.mark.parametrize("module", sorted(INTERNALS))
def test_every_internal_the_adapter_imports_is_there(module: str) -> None:
    loaded = importlib.import_module(module)
    missing = [name for name in INTERNALS[module] if not hasattr(loaded, name)]
    assert not missing, f"{module} no longer has {missing}"


def test_the_secaggplus_stages_and_state_the_adapter_drives() -> None:
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    stages = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")
    for stage in stages:
        params = list(inspect.signature(getattr(SecAggPlusWorkflow, stage)).parameters)
        assert params[1:] == ["grid", "context", "state"], (stage, params)
    state = {f.name for f in dataclasses.fields(WorkflowState)}
    assert {"nid_to_fitins", "sampled_node_ids", "active_node_ids"} <= state
    assert {"context", "config", "strategy", "client_manager"} <= set(
        inspect.signature(LegacyContext).parameters
    )


def test_the_message_id_the_test_grid_sets_lives_where_it_writes_it() -> None:
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "abc"
    assert msg.metadata.message_id == "abc"
