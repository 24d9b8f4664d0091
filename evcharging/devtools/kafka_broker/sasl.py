"""A broker that authenticates and authorizes its clients (SPEC §11): ``start --sasl``.

Listeners
    The client listener (``SASL_PLAINTEXT`` on the broker's port) takes SASL SCRAM-SHA-512
    only; the broker also uses it to talk to itself (inter-broker, as the super user
    ``broker``). The controller listener takes SASL PLAIN with one user, ``broker``, defined in
    the broker's own JAAS configuration (KRaft cannot check SCRAM on the controller listener:
    the credentials live in the metadata the controller serves), so no anonymous client is
    let in anywhere.

Users
    ``broker`` and ``admin`` are super users (``admin`` is for tooling and tests); ``central``,
    ``cp`` and ``driver`` are the principals of §11. Their SCRAM credentials are written into
    the KRaft storage when it is formatted (``kafka.tools.StorageTool format --add-scram``),
    with random passwords kept in ``<data dir>/evcharging-sasl.json`` (mode 0600), so the
    passwords live and die with the data they belong to (``start --reset`` makes new ones).

ACLs
    KRaft's ``StandardAuthorizer`` with ``allow.everyone.if.no.acl.found=false``: what is not
    granted is refused. :func:`acl_entries` is the §11 table as ACL bindings on *literal* topic
    names (``<topic prefix><topic>``; the broker grants them for each prefix it is given),
    which the bundled ``AclSetup.java`` creates through the Admin API in one JVM. Each
    principal may also DESCRIBE the other topics (their names and partitions, never their
    messages), so every service can see that the topics Central creates exist.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from evcharging.devtools.kafka_broker.errors import KafkaBrokerError, summary

SERVICE_PRINCIPALS = ("central", "cp", "driver")
"""The principals of SPEC §11, one per kind of service."""
SUPER_USERS = ("broker", "admin")
MECHANISM = "SCRAM-SHA-512"
CREDENTIALS_FILE = "evcharging-sasl.json"
ACL_TOOL = Path(__file__).resolve().with_name("AclSetup.java")
ACL_TIMEOUT = 180.0

TOPICS = ("driver.requests", "driver.updates", "central.commands", "cp.status", "cp.telemetry")

# principal -> (topics it writes, topics it reads), as SPEC §11's table says.
_TOPIC_RIGHTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "central": (
        ("central.commands", "driver.updates"),
        ("driver.requests", "cp.status", "cp.telemetry"),
    ),
    "cp": (("cp.status", "cp.telemetry"), ("central.commands",)),
    "driver": (("driver.requests",), ("driver.updates",)),
}
CENTRAL_GROUP_PREFIX = "ev-central"
"""Central's consumer groups and transactional ids start with this (``CENTRAL_GROUP_ID``)."""


def env_variable(principal: str) -> str:
    """The ``.env`` variable of a principal's password: ``KAFKA_CENTRAL_PASSWORD`` etc."""
    return f"KAFKA_{principal.upper()}_PASSWORD"


@dataclass(frozen=True)
class AclEntry:
    """One ALLOW binding for any host."""

    principal: str
    resource_type: str  # TOPIC, GROUP, TRANSACTIONAL_ID, CLUSTER
    pattern_type: str  # LITERAL or PREFIXED
    name: str
    operation: str

    def line(self) -> str:
        return "\t".join(
            (self.principal, self.resource_type, self.pattern_type, self.name, self.operation)
        )


def acl_entries(topic_prefix: str = "") -> list[AclEntry]:
    """The ACLs of SPEC §11 for the topics named ``<topic_prefix><topic>``."""
    entries: list[AclEntry] = []

    def topic(principal: str, name: str, *operations: str) -> None:
        entries.extend(
            AclEntry(principal, "TOPIC", "LITERAL", topic_prefix + name, op) for op in operations
        )

    for principal, (writes, reads) in _TOPIC_RIGHTS.items():
        for name in TOPICS:
            topic(principal, name, "DESCRIBE")
        for name in writes:
            topic(principal, name, "WRITE")
        for name in reads:
            topic(principal, name, "READ")
    for name in TOPICS:  # Central creates and configures the topics
        topic("central", name, "CREATE", "DESCRIBE_CONFIGS", "ALTER_CONFIGS")
    entries += [
        AclEntry("central", "GROUP", "PREFIXED", CENTRAL_GROUP_PREFIX, "READ"),
        AclEntry("central", "GROUP", "PREFIXED", CENTRAL_GROUP_PREFIX, "DESCRIBE"),
        AclEntry("central", "TRANSACTIONAL_ID", "PREFIXED", CENTRAL_GROUP_PREFIX, "WRITE"),
        AclEntry("central", "TRANSACTIONAL_ID", "PREFIXED", CENTRAL_GROUP_PREFIX, "DESCRIBE"),
        # Since Kafka 3.0 WRITE on a topic implies it; granted for older clients' sake.
        AclEntry("central", "CLUSTER", "LITERAL", "kafka-cluster", "IDEMPOTENT_WRITE"),
    ]
    return entries


@dataclass(frozen=True)
class SaslUsers:
    """The SCRAM users of one broker's storage and their passwords."""

    passwords: Mapping[str, str]

    @classmethod
    def new(cls, given: Mapping[str, str] | None = None) -> SaslUsers:
        """Every user with a random password, or the one ``given`` for it."""
        given = given or {}
        return cls({name: given.get(name) or secrets.token_urlsafe(24)
                    for name in SUPER_USERS + SERVICE_PRINCIPALS})

    @classmethod
    def load(cls, data_dir: Path) -> SaslUsers | None:
        """The users stored with this KRaft storage, or None if it has none."""
        path = data_dir / CREDENTIALS_FILE
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise KafkaBrokerError(f"cannot read the SASL users in {path}: {exc}") from exc
        missing = [n for n in SUPER_USERS + SERVICE_PRINCIPALS if not stored.get(n)]
        if missing:
            raise KafkaBrokerError(f"{path} lacks the users {', '.join(missing)}")
        return cls({str(k): str(v) for k, v in stored.items()})

    def save(self, data_dir: Path) -> None:
        path = data_dir / CREDENTIALS_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(dict(self.passwords), out, indent=2)
            out.write("\n")

    def password(self, principal: str) -> str:
        try:
            return self.passwords[principal]
        except KeyError:
            raise KafkaBrokerError(f"no SASL user {principal!r}") from None

    def format_args(self) -> list[str]:
        """``StorageTool format`` arguments that create the SCRAM credentials."""
        args: list[str] = []
        for name, password in self.passwords.items():
            args += ["--add-scram", f"{MECHANISM}=[name={name},password={password}]"]
        return args


def _jaas(module: str, username: str, password: str, **users: str) -> str:
    extra = "".join(f' user_{name}="{secret}"' for name, secret in users.items())
    return f'{module} required username="{username}" password="{password}"{extra};'


def broker_properties(
    users: SaslUsers, host: str, port: int, controller_port: int
) -> dict[str, str]:
    """The ``server.properties`` entries of a SASL broker (over the PLAINTEXT defaults)."""
    secret = users.password("broker")
    return {
        "listeners": f"SASL_PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"SASL_PLAINTEXT://{host}:{port}",
        "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
        "inter.broker.listener.name": "SASL_PLAINTEXT",
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.sasl_plaintext.sasl.enabled.mechanisms": MECHANISM,
        "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": _jaas(
            "org.apache.kafka.common.security.scram.ScramLoginModule", "broker", secret
        ),
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": _jaas(
            "org.apache.kafka.common.security.plain.PlainLoginModule", "broker", secret,
            broker=secret,
        ),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": ";".join(f"User:{name}" for name in SUPER_USERS),
        "allow.everyone.if.no.acl.found": "false",
    }


def admin_kwargs(users: SaslUsers) -> dict[str, str]:
    """aiokafka client arguments of the super user ``admin``."""
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": MECHANISM,
        "sasl_plain_username": "admin",
        "sasl_plain_password": users.password("admin"),
    }


def create_acls(
    java: str,
    classpath: str,
    bootstrap: str,
    users: SaslUsers,
    entries: Iterable[AclEntry],
    *,
    cwd: Path,
    jvm_opts: Sequence[str] = (),
) -> None:
    """Create ``entries`` on the broker at ``bootstrap`` (one JVM running ``AclSetup.java``)."""
    cmd = [
        java,
        *jvm_opts,
        "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
        "-cp",
        classpath,
        str(ACL_TOOL),
        bootstrap,
    ]
    env = {**os.environ, "EVCHARGING_KAFKA_ADMIN_PASSWORD": users.password("admin")}
    try:
        result = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            input="\n".join(entry.line() for entry in entries) + "\n",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=ACL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaBrokerError(f"creating the ACLs on {bootstrap} timed out") from exc
    if result.returncode != 0:
        raise KafkaBrokerError(
            f"creating the ACLs on {bootstrap} failed (exit code {result.returncode}):\n"
            f"{summary(result.stdout)}"
        )


def read_env_passwords(path: Path) -> dict[str, str]:
    """The service principals' passwords that the ``.env`` at ``path`` sets (e.g. by
    ``make up``), so that a new SASL broker takes them instead of making new ones."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    found: dict[str, str] = {}
    for principal in SERVICE_PRINCIPALS:
        name = re.escape(env_variable(principal))
        pattern = rf"^[ \t]*(?:export[ \t]+)?{name}[ \t]*=[ \t]*([A-Za-z0-9._~+/-]+)[ \t]*$"
        match = re.search(pattern, text, re.MULTILINE)
        if match:
            found[principal] = match[1]
    return found


def write_env(path: Path, users: SaslUsers) -> list[str]:
    """Set ``KAFKA_<PRINCIPAL>_PASSWORD`` for the service principals in the ``.env`` at
    ``path`` (created 0600 if missing); other lines are kept. Returns the variables changed."""
    values = {env_variable(p): users.password(p) for p in SERVICE_PRINCIPALS}
    return set_env_values(
        path, values, "# Written by `kafka_broker start --sasl`: Kafka passwords (SPEC §11)."
    )


def set_env_values(path: Path, values: Mapping[str, str], comment: str) -> list[str]:
    """Give each variable of ``values`` its value in the ``.env`` at ``path``: a line that
    sets it is rewritten in place, a missing one is appended under ``comment``."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    changed: list[str] = []
    missing: dict[str, str] = {}
    for name, value in values.items():
        line = re.compile(rf"^[ \t]*(?:export[ \t]+)?{re.escape(name)}[ \t]*=.*$", re.MULTILINE)
        if line.search(text):
            replacement = f"{name}={value}".replace("\\", "\\\\")  # a literal text
            new_text = line.sub(replacement, text)
            if new_text != text:
                changed.append(name)
            text = new_text
        else:
            missing[name] = value
    if missing:
        if text and not text.endswith("\n"):
            text += "\n"
        text += comment + "\n" + "".join(f"{n}={v}\n" for n, v in missing.items())
        changed += list(missing)
    if changed:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        path.chmod(0o600)
    return changed
