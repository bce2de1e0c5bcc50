"""sepals-server without processes: configuration, key checks, checkpoints and resume."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from sepals.common.codec import PlainCodec
from sepals.common.config import EncryptionConfig
from sepals.common.errors import SecretKeyExposureError
from sepals.common.federation import FederationConfig
from sepals.common.records import global_record
from sepals.common.scheme import make_client_codec, make_server_codec
from sepals.server.control.cli import main
from sepals.server.control.config import ServerDeployConfig
from sepals.server.control.launcher import ServerLauncher
from sepals.server.control.provision import ProvisionSpec, provision
from sepals.server.serverapp.app import ServerSettings, build_strategy
from sepals.server.serverapp.run_spec import DeployedRun
from sepals.server.serverapp.state import CheckpointError, StateDir
from sepals.server.serverapp.strategy import EncryptedFedAvg, RoundRecord


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


def test_the_run_spec_round_trips_and_holds_nothing_of_tls(bundles: Path, tmp_path: Path) -> None:
    toml = _server_copy(bundles, tmp_path)
    text = toml.read_text()
    toml.write_text(text + '\n[nodes.max_examples]\nclient-1 = 7\n')
    cfg = ServerDeployConfig.from_toml(toml)
    spec = cfg.run_spec()
    path = spec.save()
    assert path.parent == cfg.state_dir and oct(path.stat().st_mode & 0o777) == "0o600"
    loaded = DeployedRun.load(path)
    assert loaded == spec and dict(loaded.max_examples) == {"client-1": 7}
    codec = loaded.codec()
    assert not codec.can_decrypt and codec.fingerprint == cfg.codec().fingerprint
    loaded.signer(codec)  # the plan agrees with the spec
    # The ServerApp is told no TLS file, no address and no node key.
    told = path.read_text()
    for secret in ("server.key", "server.pem", "ca.pem", "nodes", "9092"):
        assert secret not in told


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "cannot read the run spec"),
        ('{"format": "other"}', "not a run spec written by sepals-server"),
        ('{"format": "sepals-run-spec/1", "state_dir": "/x"}', "not a valid run spec"),
    ],
)
def test_a_bad_run_spec_names_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "serverapp.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        DeployedRun.load(path)
    assert str(path) in str(info.value)


def test_the_strategy_refuses_a_codec_that_can_decrypt(bundles: Path) -> None:
    encryption = EncryptionConfig().sized_for(10)
    secret = (bundles / "clients" / "client-1" / "he-secret.ctx").read_bytes()
    settings = ServerSettings(
        federation=FederationConfig(rounds=1),
        codec=make_client_codec(encryption, secret),
        vector_length=10,
    )
    with pytest.raises(SecretKeyExposureError, match="secret HE key"):
        build_strategy(settings)


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
    encryption = EncryptionConfig().sized_for(10)  # the ring provision picks for the model
    codec = make_server_codec(encryption, public)
    client = make_client_codec(
        encryption, (bundles / "clients" / "client-1" / "he-secret.ctx").read_bytes()
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


# ---------------------------------------------------------------- state dir permissions
def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_state_dir_is_0700_and_every_file_written_there_0600(tmp_path: Path) -> None:
    old = os.umask(0)  # the modes must come from sepals, not from the umask
    try:
        state = StateDir(tmp_path / "deep" / "state")
        strategy = EncryptedFedAvg(PlainCodec(), 3, FederationConfig(rounds=2))
        strategy.latest_global = global_record(PlainCodec().encode(np.ones(3)), 1.0)
        state.save_checkpoint(strategy, 1)
        state.append_metrics(RoundRecord(round=1))
        state.mark_done(2)
    finally:
        os.umask(old)
    assert _mode(state.root) == 0o700
    written = sorted(p.name for p in state.root.iterdir())
    assert written == ["checkpoint.json", "done.json", "global-model.spl", "metrics.jsonl"]
    assert {p.name: _mode(p) for p in state.root.iterdir()} == dict.fromkeys(written, 0o600)


def test_an_open_state_dir_and_old_metrics_are_tightened(tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    (root / "metrics.jsonl").write_text("")
    (root / "metrics.jsonl").chmod(0o644)
    state = StateDir(root)
    assert _mode(root) == 0o700
    state.append_metrics(RoundRecord(round=1))
    assert _mode(root / "metrics.jsonl") == 0o600
    assert state.read_metrics()[0]["round"] == 1


def test_an_unusable_state_dir_is_a_one_line_value_error(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state dir should be")
    with pytest.raises(ValueError, match=f"state_dir {blocker} is not a directory") as info:
        StateDir(blocker)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="is not a directory"):
        StateDir(blocker / "below")


def test_metrics_are_never_written_through_a_symlink(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state.metrics_path.symlink_to(victim)
    with pytest.raises(OSError):
        state.append_metrics(RoundRecord(round=1))
    assert victim.read_text() == "precious\n"


def test_parsing_the_config_creates_no_state_dir(bundles: Path, tmp_path: Path) -> None:
    toml = _server_copy(bundles, tmp_path)
    cfg = ServerDeployConfig.from_toml(toml)
    assert not cfg.state_dir.exists()


# ---------------------------------------------------------------- HE parameters vs keys
@pytest.fixture(scope="module")
def ckks_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckks") / "b"
    provision(
        ProvisionSpec(
            out=out,
            clients=1,
            server_host="127.0.0.1",
            model_parameters=10,
            encryption=EncryptionConfig(scheme="ckks"),
        )
    )
    return out


def _set(toml: Path, old: str, new: str) -> None:
    text = toml.read_text()
    assert old in text
    toml.write_text(text.replace(old, new, 1))


def test_ckks_parameters_that_differ_from_the_keys_name_the_key(
    ckks_bundles: Path, tmp_path: Path
) -> None:
    toml = _server_copy(ckks_bundles, tmp_path)
    assert ServerDeployConfig.from_toml(toml).codec().name == "ckks"
    # CKKS loads any context: without the check, a 16384 config would run on 8192 keys.
    _set(toml, "poly_modulus_degree = 8192", "poly_modulus_degree = 16384")
    with pytest.raises(ValueError, match=r"\[encryption\] poly_modulus_degree = 16384") as info:
        ServerDeployConfig.from_toml(toml).codec()
    assert "made with poly_modulus_degree = 8192" in str(info.value)
    _set(toml, "poly_modulus_degree = 16384", "poly_modulus_degree = 8192")
    _set(toml, "coeff_mod_bit_sizes = [60, 40]", "coeff_mod_bit_sizes = [50, 40]")
    with pytest.raises(ValueError, match=r"\[encryption\] coeff_mod_bit_sizes = \[50, 40\]"):
        ServerDeployConfig.from_toml(toml).codec()


def test_bfv_keys_under_a_ckks_config_and_back_name_the_scheme(
    bundles: Path, ckks_bundles: Path, tmp_path: Path
) -> None:
    toml = _server_copy(ckks_bundles, tmp_path)
    shutil.copy(bundles / "server" / "he-public.ctx", toml.parent / "he-public.ctx")
    with pytest.raises(ValueError, match=r"\[encryption\] scheme = 'ckks' .* made for 'bfv'"):
        ServerDeployConfig.from_toml(toml).codec()


def test_a_secret_context_is_still_refused_first_even_with_other_parameters(
    bundles: Path, tmp_path: Path
) -> None:
    toml = _server_copy(bundles, tmp_path)
    shutil.copy(bundles / "clients" / "client-1" / "he-secret.ctx", toml.parent / "he-public.ctx")
    (toml.parent / "he-public.ctx").chmod(0o600)
    _set(toml, "plain_modulus_bits = 44", "plain_modulus_bits = 42")
    with pytest.raises(SecretKeyExposureError):
        ServerDeployConfig.from_toml(toml).codec()


class _DeadServerApp:
    """An executor whose ServerApp process has exited with ``code``."""

    def __init__(self, code: int | None) -> None:
        self.code = code

    def poll(self, run_id: int) -> None:
        pass

    def returncode(self) -> int | None:
        return self.code


@pytest.mark.parametrize("code", [3, -9])
def test_a_dead_serverapp_ends_the_run_without_waiting_for_the_superlink(
    bundles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    cfg = ServerDeployConfig.from_toml(_server_copy(bundles, tmp_path))
    launcher = ServerLauncher(cfg, insecure=True)
    launcher.run_id = "7"
    launcher.executor = _DeadServerApp(code)  # type: ignore[assignment]
    # The SuperLink still reports the run as running: it notices a dead ServerApp only
    # when its heartbeat expires, and follow() must not wait for that.
    asked: list[int] = []

    def still_running() -> tuple[str, str]:
        asked.append(1)
        if len(asked) > 1:
            raise AssertionError("follow() kept waiting for the SuperLink")
        return "running", ""

    monkeypatch.setattr(launcher, "run_status", still_running)
    monkeypatch.setattr(launcher, "_check_children", lambda: None)
    assert launcher.follow(poll=0.01, status_every=0.0) == 1


def test_a_serverapp_that_exited_cleanly_waits_for_the_run_status(
    bundles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ServerDeployConfig.from_toml(_server_copy(bundles, tmp_path))
    launcher = ServerLauncher(cfg, insecure=True)
    launcher.run_id = "7"
    launcher.executor = _DeadServerApp(0)  # type: ignore[assignment]
    statuses = iter([("running", ""), ("finished:completed", "")])
    monkeypatch.setattr(launcher, "run_status", lambda: next(statuses))
    monkeypatch.setattr(launcher, "_check_children", lambda: None)
    assert launcher.follow(poll=0.01, status_every=0.0) == 0
