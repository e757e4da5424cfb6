"""dpfpl.plan: the one decision of protocol and local steps, shared by the engine and the audits."""

from types import SimpleNamespace

import pytest

from dpfpl.config import RunConfig
from dpfpl.errors import ConfigError
from dpfpl.plan import effective_protocol, plan_engine


def _clients(*sizes):
    return [SimpleNamespace(client_id=i, train_idx=range(n)) for i, n in enumerate(sizes)]


def test_local_steps_are_one_pass_over_the_mean_client_unless_set():
    cfg = RunConfig()
    cfg.update({"method": "dpfpl", "batch_size": 8}, source="test")
    assert plan_engine(cfg, _clients(64, 80)).local_steps == 9  # ceil(72 / 8)
    assert plan_engine(cfg, _clients(3)).local_steps == 1
    cfg.update({"local_steps": 5}, source="test")
    assert plan_engine(cfg, _clients(64, 80)).local_steps == 5
    with pytest.raises(ConfigError, match="no clients"):
        plan_engine(cfg, [])


def test_protocol_is_the_methods_default_and_fedavg_needs_a_global_prompt():
    glob = SimpleNamespace(default_protocol="fedavg", uses_global=True)
    local_only = SimpleNamespace(default_protocol="fedavg", uses_global=False)
    assert effective_protocol(None, glob) == "fedavg" and effective_protocol("grad", glob) == "grad"
    assert effective_protocol(None, local_only) == "grad" and effective_protocol("fedavg", local_only) == "grad"
    cfg = RunConfig()
    cfg.update({"method": "dpfpl"}, source="test")
    plan = plan_engine(cfg, _clients(10))
    assert plan.protocol == plan.method.default_protocol and plan.method.name == "dpfpl"
