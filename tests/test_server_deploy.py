"""sepals-server without processes: configuration, key checks, checkpoints and resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from sepals.common.codec import PlainCodec, make_client_codec, make_server_codec
from sepals.common.config import EncryptionConfig, FederationConfig
from sepals.common.protocol import global_record
from sepals.common.provision import ProvisionSpec, provision
from sepals.server.cli import main
from sepals.server.config import ServerDeployConfig
from sepals.server.launcher import ServerLauncher
from sepals.server.state import CheckpointError, StateDir
from sepals.server.strategy import EncryptedFedAvg


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("srv") / "b"
    provision(ProvisionSpec(out=out, clients=2, server_host="127.0.0.1", model_parameters=10))
    return out


def _server_copy(bundles: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "server"
    shutil.copytree(bundles / "server", dst)
    return dst / "server.toml"


def test_provisioned_config_parses_with_paths_relative_to_it(bundles: Path) -> None:
    cfg = ServerDeployConfig.from_toml(bundles / "server" / "server.toml")
    assert cfg.parameters == 10
    assert cfg.public_context == (bundles / "server" / "he-public.ctx").resolve()
    assert cfg.state_dir == (bundles / "server" / "state").resolve()
    assert len(cfg.node_keys()) == 2
    assert cfg.min_available_clients == cfg.federation.min_train_clients
    codec = cfg.codec()
    assert codec.name.startswith(EncryptionConfig().scheme) and not codec.can_decrypt


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (("[federation]", "[federation]\nrounds_typo = 3"), "rounds_typo"),
        (("[server]", "[server]\nport = 1"), "port"),
        (("parameters = 10", "parameters = 0"), "parameters"),
        (('address = "0.0.0.0:9092"', 'address = "nohost"'), "HOST:PORT"),
        (("max_clients = 100", "max_clients = 100000"), "max_clients"),
    ],
)
def test_bad_configs_name_the_problem(
    bundles: Path, tmp_path: Path, edit: tuple[str, str], match: str
) -> None:
    toml = _server_copy(bundles, tmp_path)
    text = toml.read_text()
    assert edit[0] in text
    toml.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ValueError, match=match):
        ServerDeployConfig.from_toml(toml)
    assert main(["--config", str(toml)]) == 2


def test_server_refuses_a_secret_context_before_starting_anything(
    bundles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = _server_copy(bundles, tmp_path)
    secret = bundles / "clients" / "client-1" / "he-secret.ctx"
    shutil.copy(secret, toml.parent / "he-public.ctx")
    assert main(["--config", str(toml)]) == 3
    assert "refusing to start" in capsys.readouterr().err
    assert not (toml.parent / "state" / "superlink.db").exists()


def test_tls_files_and_node_keys_are_required_unless_insecure(
    bundles: Path, tmp_path: Path
) -> None:
    toml = _server_copy(bundles, tmp_path)
    shutil.rmtree(toml.parent / "nodes")
    cfg = ServerDeployConfig.from_toml(toml)
    with pytest.raises(ValueError, match="node public keys"):
        ServerLauncher(cfg).preflight()
    ServerLauncher(cfg, insecure=True).preflight()
    (toml.parent / "server.key").unlink()
    with pytest.raises(ValueError, match="server_key"):
        ServerLauncher(ServerDeployConfig.from_toml(toml)).preflight()


def test_checkpoint_round_trip_and_foreign_checkpoints(tmp_path: Path, bundles: Path) -> None:
    public = (bundles / "server" / "he-public.ctx").read_bytes()
    codec = make_server_codec(EncryptionConfig(), public)
    client = make_client_codec(
        EncryptionConfig(), (bundles / "clients" / "client-1" / "he-secret.ctx").read_bytes()
    )
    strategy = EncryptedFedAvg(codec, 10, FederationConfig(rounds=5, seed=3))
    state = StateDir(tmp_path / "state")
    # A round that aggregated nothing still advances the checkpoint (no model yet).
    state.save_checkpoint(strategy, 1)
    first = state.load_checkpoint(codec, 10)
    assert first is not None and first.round == 1 and first.payload is None
    assert first.arrays() == ArrayRecord()

    payload = client.encode(np.arange(10.0))
    strategy.latest_global = global_record(payload, 4.0)
    strategy.rng.random()
    state.save_checkpoint(strategy, 2)
    ckpt = state.load_checkpoint(codec, 10)
    assert ckpt is not None and ckpt.round == 2 and ckpt.weight_total == 4.0
    assert ckpt.payload == payload
    assert np.allclose(
        client.decode(ckpt.payload), np.arange(10.0), atol=EncryptionConfig().quant_step
    )
    resumed = EncryptedFedAvg(codec, 10, FederationConfig(rounds=5, seed=3), round_offset=2)
    resumed.rng.bit_generator.state = ckpt.rng_state
    assert resumed.rng.random() == strategy.rng.random(), "sampling continues, not restarts"

    with pytest.raises(CheckpointError, match="10-parameter"):
        state.load_checkpoint(codec, 11)
    with pytest.raises(CheckpointError, match="fresh state directory"):
        state.load_checkpoint(PlainCodec(), 10)
    model = tmp_path / "state" / "global-model.spl"
    model.write_bytes(model.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="does not match"):
        state.load_checkpoint(codec, 10)


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


@pytest.mark.usefixtures("run_identity")
def test_round_offset_numbers_resumed_rounds_and_too_few_nodes_skip_a_round() -> None:
    fed = FederationConfig(rounds=4, min_train_clients=2)
    strategy = EncryptedFedAvg(PlainCodec(), 3, fed, node_wait_timeout=0.01, round_offset=2)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid([5, 6])))  # type: ignore[arg-type]
    assert len(messages) == 2
    assert messages[0].content["config"]["server-round"] == 3
    assert strategy.current_round is not None and strategy.current_round.round == 3
    # One node connected, two needed: nobody is asked to spend budget on a doomed round.
    lonely = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), _Grid([5])))  # type: ignore[arg-type]
    assert lonely == []
