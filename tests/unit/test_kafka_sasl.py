"""The SASL broker's pure parts: the ACLs of SPEC §11, its properties, and its .env lines."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from evcharging.devtools.kafka_broker import KafkaBroker, KafkaBrokerError
from evcharging.devtools.kafka_broker.sasl import (
    SaslUsers,
    acl_entries,
    broker_properties,
    read_env_passwords,
    set_env_values,
    write_env,
)

TOPICS = {"driver.requests", "driver.updates", "central.commands", "cp.status", "cp.telemetry"}


def topic_rights(operation: str, prefix: str = "") -> dict[str, set[str]]:
    rights: dict[str, set[str]] = {}
    for entry in acl_entries(prefix):
        if entry.resource_type == "TOPIC" and entry.operation == operation:
            assert entry.pattern_type == "LITERAL"
            rights.setdefault(entry.principal, set()).add(entry.name)
    return rights


def test_the_acls_are_the_table_of_spec_11() -> None:
    assert topic_rights("WRITE") == {
        "central": {"central.commands", "driver.updates"},
        "cp": {"cp.status", "cp.telemetry"},
        "driver": {"driver.requests"},
    }
    assert topic_rights("READ") == {
        "central": {"driver.requests", "cp.status", "cp.telemetry"},
        "cp": {"central.commands"},
        "driver": {"driver.updates"},
    }
    for operation in ("CREATE", "ALTER_CONFIGS", "DESCRIBE_CONFIGS"):
        assert topic_rights(operation) == {"central": TOPICS}
    # Metadata only: every service sees that the topics exist.
    assert topic_rights("DESCRIBE") == {p: TOPICS for p in ("central", "cp", "driver")}
    others = {(e.principal, e.resource_type, e.pattern_type, e.name, e.operation)
              for e in acl_entries() if e.resource_type != "TOPIC"}
    assert others == {
        ("central", "GROUP", "PREFIXED", "ev-central", "READ"),
        ("central", "GROUP", "PREFIXED", "ev-central", "DESCRIBE"),
        ("central", "TRANSACTIONAL_ID", "PREFIXED", "ev-central", "WRITE"),
        ("central", "TRANSACTIONAL_ID", "PREFIXED", "ev-central", "DESCRIBE"),
        ("central", "CLUSTER", "LITERAL", "kafka-cluster", "IDEMPOTENT_WRITE"),
    }


def test_a_topic_prefix_names_the_prefixed_topics_literally() -> None:
    assert topic_rights("WRITE", "run1.")["driver"] == {"run1.driver.requests"}
    assert all(len(entry.line().split("\t")) == 5 for entry in acl_entries("run1."))


def test_every_client_listener_needs_scram_and_nothing_is_allowed_by_default() -> None:
    users = SaslUsers.new()
    props = broker_properties(users, "127.0.0.1", 9092, 9093)
    assert props["listeners"] == "SASL_PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert set(props["listener.security.protocol.map"].split(",")) == {
        "SASL_PLAINTEXT:SASL_PLAINTEXT", "CONTROLLER:SASL_PLAINTEXT"}
    assert props["listener.name.sasl_plaintext.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["authorizer.class.name"] == (
        "org.apache.kafka.metadata.authorizer.StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:broker;User:admin"
    assert users.password("broker") in props["listener.name.controller.plain.sasl.jaas.config"]
    assert len(set(users.passwords.values())) == 5


def test_format_args_create_every_scram_user() -> None:
    users = SaslUsers({"admin": "a", "central": "c"})
    assert users.format_args() == [
        "--add-scram", "SCRAM-SHA-512=[name=admin,password=a]",
        "--add-scram", "SCRAM-SHA-512=[name=central,password=c]",
    ]


def test_users_are_saved_privately_and_loaded_back(tmp_path: Path) -> None:
    users = SaslUsers.new()
    users.save(tmp_path)
    assert stat.S_IMODE((tmp_path / "evcharging-sasl.json").stat().st_mode) == 0o600
    assert SaslUsers.load(tmp_path) == users
    assert SaslUsers.load(tmp_path / "nothing") is None
    (tmp_path / "evcharging-sasl.json").write_text('{"admin": "x"}', encoding="utf-8")
    with pytest.raises(KafkaBrokerError, match="lacks the users"):
        SaslUsers.load(tmp_path)


def test_write_env_sets_the_three_passwords_and_keeps_every_other_line(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("EVCHARGING_API_TOKEN=t\nKAFKA_CP_PASSWORD=old\n# comment", encoding="utf-8")
    users = SaslUsers({"central": "c1", "cp": "p1", "driver": "d1"})
    assert write_env(env, users) == [
        "KAFKA_CP_PASSWORD", "KAFKA_CENTRAL_PASSWORD", "KAFKA_DRIVER_PASSWORD"]
    lines = env.read_text(encoding="utf-8").splitlines()
    assert lines[:3] == ["EVCHARGING_API_TOKEN=t", "KAFKA_CP_PASSWORD=p1", "# comment"]
    assert lines[-2:] == ["KAFKA_CENTRAL_PASSWORD=c1", "KAFKA_DRIVER_PASSWORD=d1"]
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert write_env(env, users) == []  # nothing to change


def test_set_env_values_creates_the_file_and_takes_values_literally(tmp_path: Path) -> None:
    env = tmp_path / "new.env"
    assert set_env_values(env, {"A": r"x\1y"}, "# c") == ["A"]
    assert set_env_values(env, {"A": r"\g<0>z"}, "# c") == ["A"]
    assert env.read_text(encoding="utf-8") == "# c\nA=\\g<0>z\n"


def test_a_broker_without_sasl_has_no_users_and_creates_no_topics(tmp_path: Path) -> None:
    broker = KafkaBroker(work_dir=tmp_path)
    assert broker.broker_properties(9093)["auto.create.topics.enable"] == "false"
    assert "authorizer.class.name" not in broker.broker_properties(9093)
    with pytest.raises(KafkaBrokerError, match="no SASL users"):
        _ = broker.sasl_users
    with pytest.raises(KafkaBrokerError, match="running SASL broker"):
        broker.grant("x.")


def test_a_new_broker_takes_the_passwords_env_has(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("KAFKA_CP_PASSWORD=from-make-up\nexport KAFKA_DRIVER_PASSWORD = d-2\n"
                   "KAFKA_CENTRAL_PASSWORD=\n", encoding="utf-8")
    given = read_env_passwords(env)
    assert given == {"cp": "from-make-up", "driver": "d-2"}
    users = SaslUsers.new(given)
    assert (users.password("cp"), users.password("driver")) == ("from-make-up", "d-2")
    assert users.password("central") and users.password("admin")
    assert read_env_passwords(tmp_path / "missing") == {}
