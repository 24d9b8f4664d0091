"""Settings of every service (SPEC §1): pydantic-settings classes plus their CLI flags.

Precedence: a command-line flag beats the environment variable, which beats ``.env``,
which beats the default. Each field ``some_name`` of a settings class has the flag
``--some-name`` and the variable ``<PREFIX>SOME_NAME``.

Over 400 lines: one class per service, their shared fields (Kafka's security of SPEC §11
declared again in each class with its prefix and principal) and the flag machinery that
reads them are one precedence rule, kept in one place.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from evcharging.common.centrals import parse_centrals
from evcharging.common.messages import ID_PATTERN

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Port = Annotated[int, Field(ge=0, le=65535)]
Positive = Annotated[float, Field(gt=0)]


def _central_list(value: str) -> str:
    parse_centrals(value, 1)  # the items' syntax; each client applies its default port
    return value


def _central_urls(value: str) -> str:
    for item in value.split(","):
        if item.strip() and not item.strip().startswith(("http://", "https://")):
            raise ValueError(f"{item.strip()!r}: expected an http:// or https:// URL "
                             "(several separated by commas)")
    parse_centrals(value, 1)
    return value


CentralHosts = Annotated[str, AfterValidator(_central_list)]
"""Central's address, or several separated by commas (``h1,h2``, ``h1:8000,h2:8001``):
the clients move to the next one when one does not answer (SPEC §9)."""
CENTRAL_HOSTS_HELP = (
    "host of Central's HTTP API, or several separated by commas (h1,h2 with this port, or "
    "h1:8000,h2:8001): the next is tried when one does not answer"
)
LogLevel = Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"]

SHARED_TOKEN_ENV = "EVCHARGING_API_TOKEN"  # noqa: S105 - a variable's name, not a secret
"""Every service's token falls back to this variable when its own is not set."""

SecurityProtocol = Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL"]


# The Kafka security settings of SPEC §11. Each service declares them with its own prefix
# and its principal: ``<PREFIX>KAFKA_SECURITY_PROTOCOL`` beats the shared
# ``KAFKA_SECURITY_PROTOCOL``; the user name defaults to the principal (central, cp,
# driver) and the password falls back to that principal's ``KAFKA_<PRINCIPAL>_PASSWORD``,
# which `kafka_broker start --sasl` and `make up` write into .env.
def _choices(*names: str) -> AliasChoices:
    """The variables a field reads, first one first (duplicates and blanks dropped)."""
    return AliasChoices(*dict.fromkeys(n for n in names if n and "__" not in n))


def kafka_protocol_field(prefix: str) -> Any:
    return Field(
        "PLAINTEXT",
        validation_alias=_choices(f"{prefix}KAFKA_SECURITY_PROTOCOL", "KAFKA_SECURITY_PROTOCOL"),
        description="how to reach Kafka: PLAINTEXT, SASL_PLAINTEXT or SASL_SSL (SCRAM-SHA-512)",
    )


def kafka_username_field(prefix: str, principal: str) -> Any:
    return Field(
        principal or None,
        validation_alias=_choices(f"{prefix}KAFKA_SASL_USERNAME", "KAFKA_SASL_USERNAME"),
        description="SASL user (the service's principal of SPEC §11)",
    )


def kafka_password_field(prefix: str, principal: str) -> Any:
    return Field(
        None,
        validation_alias=_choices(
            f"{prefix}KAFKA_SASL_PASSWORD",
            "KAFKA_SASL_PASSWORD",
            f"KAFKA_{principal.upper()}_PASSWORD",
        ),
        description="SASL password (prefer a variable or .env: flags show in ps)",
    )


def kafka_cafile_field(prefix: str) -> Any:
    return Field(
        None,
        validation_alias=_choices(f"{prefix}KAFKA_SSL_CAFILE", "KAFKA_SSL_CAFILE"),
        description="CA file that signed the broker's certificate (SASL_SSL; unset: the "
        "system's CAs)",
    )


class ServiceSettings(BaseSettings):
    """What every Kafka-connected service shares."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, populate_by_name=True, env_ignore_empty=True
    )

    kafka_bootstrap: str = Field("localhost:9092", description="Kafka broker list host:port[,...]")
    topic_prefix: str = Field(
        "", description="prefix for every topic name (isolates several systems on one broker)"
    )
    topic_partitions: int = Field(3, ge=1, description="partitions of each topic created at start")
    log_level: LogLevel = Field("INFO", description="log level")
    log_json: bool = Field(False, description="write logs as JSON lines")
    # SPEC §11; every subclass declares them again with its prefix and principal.
    kafka_security_protocol: SecurityProtocol = kafka_protocol_field("")
    kafka_sasl_username: str | None = kafka_username_field("", "")
    kafka_sasl_password: SecretStr | None = kafka_password_field("", "")
    kafka_ssl_cafile: Path | None = kafka_cafile_field("")

    @model_validator(mode="after")
    def _sasl_needs_a_password(self) -> ServiceSettings:
        if self.kafka_security_protocol != "PLAINTEXT" and (
            not self.kafka_sasl_username or self.kafka_sasl_password is None
        ):
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs a SASL user "
                f"and password (KAFKA_SASL_PASSWORD, or the KAFKA_<PRINCIPAL>_PASSWORD that "
                "`python -m evcharging.devtools.kafka_broker start --sasl` writes to .env)"
            )
        return self


DB_URL_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")
"""The databases Central speaks (SPEC §9)."""


class CentralSettings(ServiceSettings):
    """EV Central: the controller."""

    model_config = SettingsConfigDict(env_prefix="CENTRAL_")

    kafka_security_protocol: SecurityProtocol = kafka_protocol_field("CENTRAL_")
    kafka_sasl_username: str | None = kafka_username_field("CENTRAL_", "central")
    kafka_sasl_password: SecretStr | None = kafka_password_field("CENTRAL_", "central")
    kafka_ssl_cafile: Path | None = kafka_cafile_field("CENTRAL_")

    http_host: str = Field("127.0.0.1", description="address of the dashboard and HTTP API")
    http_port: Port = Field(8000, description="port of the dashboard and HTTP API")
    listen_host: str = Field("127.0.0.1", description="address of the TCP control plane")
    listen_port: Port = Field(9999, description="port of the TCP control plane")
    db_path: Path = Field(Path("ev_charging.db"), description="SQLite file")
    db_url: SecretStr | None = Field(
        None, description="the database: sqlite:///PATH or postgresql://user:password@host:5432/db"
        " (default: sqlite:/// + CENTRAL_DB_PATH)",
    )
    api_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("CENTRAL_API_TOKEN", SHARED_TOKEN_ENV),
        description="when set, mutating HTTP calls and the TCP plane need it",
    )
    allow_anonymous: bool = Field(
        False, description="with no token, listen on a non-loopback address anyway and accept "
        "changes from any client (protected mode off)"
    )
    start_timeout: Positive = Field(5.0, description="seconds for a CP to confirm START_SUPPLY")
    breaker_failure_threshold: int = Field(
        3, ge=1, description="failed starts that open a CP's circuit breaker"
    )
    breaker_reset_timeout: Positive = Field(
        30.0, description="seconds after which an open breaker lets one trial through"
    )
    health_snapshot_interval: Positive = Field(
        5.0, description="seconds between CP health snapshots in the database"
    )
    cp_silence_timeout: Positive = Field(
        30.0,
        description="a CP not heard from for this long is taken as DISCONNECTED "
        "(keep it above the engines' status interval)",
    )
    request_max_age: Positive = Field(
        120.0, description="requests older than this (e.g. replayed after downtime) are refused"
    )
    shed_after: Positive = Field(
        1.0,
        description="when Central reads a request this many seconds after it was sent, it is "
        "behind: the request is DENIED 'Central overloaded' instead of accepted and failed",
    )
    history_retention_days: Positive = Field(
        7.0, description="days of CP health history kept in the database"
    )
    group_id: str = Field("ev-central", description="Kafka consumer group of Central")
    instance_id: str | None = Field(
        None, min_length=1, max_length=64, pattern=ID_PATTERN,
        description="this Central among those sharing the work (SPEC §9): in logs, /health "
        "and the group (its static member id; keep it across restarts so that a restart "
        "takes its place at once); default: host name and process id",
    )
    topic_partitions: int = Field(
        12, ge=1, description="partitions of each topic Central creates (SPEC §9: the CPs "
        "spread over the Centrals by partition)"
    )
    peer_url: str | None = Field(
        None, description="the base URL the other Centrals reach this one's HTTP API at "
        "(default http://127.0.0.1:CENTRAL_HTTP_PORT; set it when they run on other hosts)"
    )
    max_cps: int = Field(
        100_000, ge=1, description="most registered CPs Central holds: registering a new one "
        "beyond it gets 409 (updates of CPs it holds do not; CPs known only from the bus do "
        "not count)"
    )
    max_unregistered: int = Field(
        1_000, ge=0, description="most CPs known only from the bus (never registered by a "
        "monitor, the fleet or the gateway); statuses of more are counted and ignored, and "
        "such a CP is forgotten after an hour of silence"
    )
    site_limits: str = Field(
        "", description="sites' power limits in kW set at start, over those persisted "
        "(SPEC §10), e.g. site-A=66,site-B=150"
    )
    allocation: Literal["equal", "least_laxity"] = Field(
        "equal", description="how a limited site's power is shared among its sessions: equal "
        "shares, or least_laxity (the least slack before departure first)"
    )
    allocation_interval: Positive = Field(
        2.0, description="seconds between reallocations of the limited sites' power"
    )

    @field_validator("db_url")
    @classmethod
    def _known_db_url(cls, value: SecretStr | None) -> SecretStr | None:
        text = "" if value is None else value.get_secret_value()
        if text and not text.startswith(DB_URL_SCHEMES):
            raise ValueError(f"must start with one of {', '.join(DB_URL_SCHEMES)}")
        return value

    @property
    def database_url(self) -> str:
        """CENTRAL_DB_URL, else ``sqlite:///`` + CENTRAL_DB_PATH (SPEC §9)."""
        if self.db_url is None or not self.db_url.get_secret_value():
            return f"sqlite:///{self.db_path}"
        return self.db_url.get_secret_value()

    @property
    def instance(self) -> str:
        """CENTRAL_INSTANCE_ID, else this host's name and this process's id."""
        return self.instance_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def own_url(self) -> str:
        """CENTRAL_PEER_URL, or this host's loopback address and the HTTP port."""
        return (self.peer_url or f"http://127.0.0.1:{self.http_port}").rstrip("/")

    @field_validator("site_limits")
    @classmethod
    def _valid_site_limits(cls, value: str) -> str:
        parse_site_limits(value)
        return value

    @property
    def site_limit_map(self) -> dict[str, float]:
        """``site_limits`` as a mapping of site to kW."""
        return parse_site_limits(self.site_limits)


SITE_MAX = 64
"""The longest site name (as ``CPRegistration.site``)."""


def parse_site_limits(text: str) -> dict[str, float]:
    """``site-A=66,site-B=150`` as ``{"site-A": 66.0, "site-B": 150.0}`` (blank: none).

    ValueError names the item at fault: no ``=``, an empty or too long site name, a site
    named twice, a limit that is not a finite number >= 0."""
    limits: dict[str, float] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        site, equals, kw_text = item.rpartition("=")
        site = site.strip()
        if not equals or not site:
            raise ValueError(f"{item!r} is not site=kW (e.g. site-A=66)")
        if len(site) > SITE_MAX:
            raise ValueError(f"site name {site[:20]!r}... is longer than {SITE_MAX} characters")
        if site in limits:
            raise ValueError(f"site {site!r} is given twice")
        try:
            kw = float(kw_text)
        except ValueError:
            raise ValueError(f"{item!r}: the limit {kw_text.strip()!r} is not a number of kW"
                             ) from None
        if not math.isfinite(kw) or kw < 0:
            raise ValueError(f"{item!r}: the limit must be a finite number of kW >= 0")
        limits[site] = kw
    return limits


class CPEngineSettings(ServiceSettings):
    """CP Engine: one charging point."""

    model_config = SettingsConfigDict(env_prefix="CP_ENGINE_")

    kafka_security_protocol: SecurityProtocol = kafka_protocol_field("CP_ENGINE_")
    kafka_sasl_username: str | None = kafka_username_field("CP_ENGINE_", "cp")
    kafka_sasl_password: SecretStr | None = kafka_password_field("CP_ENGINE_", "cp")
    kafka_ssl_cafile: Path | None = kafka_cafile_field("CP_ENGINE_")

    cp_id: Identifier = Field(description="charging point id")
    health_host: str = Field("127.0.0.1", description="address of the health endpoint")
    health_port: Port = Field(8001, description="port of the health endpoint")
    api_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("CP_ENGINE_API_TOKEN", SHARED_TOKEN_ENV),
        description="when set, POST /fault and /recover need it",
    )
    allow_anonymous: bool = Field(
        False, description="with no token, listen on a non-loopback address anyway and accept "
        "/fault and /recover from any client (protected mode off)"
    )
    kw_rate: Annotated[float, Field(gt=0)] = Field(22.0, description="power while supplying (kW)")
    euro_rate: Annotated[float, Field(ge=0)] = Field(0.30, description="price per kWh (€)")
    session_seconds: Positive = Field(10.0, description="simulated session length (s)")
    telemetry_interval: Positive = Field(1.0, description="seconds between telemetry messages")
    status_interval: Positive = Field(
        5.0, description="seconds between heartbeats that re-announce the CP's state"
    )


class CPMonitorSettings(BaseSettings):
    """CP Monitor: the watchdog of one CP. It speaks HTTP only (no Kafka)."""

    model_config = SettingsConfigDict(
        env_prefix="CP_MONITOR_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        env_ignore_empty=True,
    )

    cp_id: Identifier = Field(description="charging point id")
    cp_e_host: str = Field("localhost", description="host of the CP Engine's health endpoint")
    cp_e_port: Port = Field(8001, description="port of the CP Engine's health endpoint")
    central_host: CentralHosts = Field("localhost", description=CENTRAL_HOSTS_HELP)
    central_port: Port = Field(8000, description="port of Central's HTTP API")
    health_interval: Positive = Field(5.0, description="seconds between health checks")
    health_timeout: Positive = Field(2.0, description="timeout of one health check (s)")
    failure_threshold: int = Field(3, ge=1, description="consecutive failures that make a fault")
    api_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("CP_MONITOR_API_TOKEN", SHARED_TOKEN_ENV),
        description="token sent to Central when it has one",
    )
    metrics_host: str = Field("127.0.0.1", description="address of GET /metrics (Prometheus)")
    metrics_port: Port = Field(
        0, description="port of GET /metrics for Prometheus (0: no metrics port)"
    )
    log_level: LogLevel = Field("INFO", description="log level")
    log_json: bool = Field(False, description="write logs as JSON lines")


class DriverSettings(ServiceSettings):
    """EV Driver: a client that charges at the CPs listed in a requests file."""

    model_config = SettingsConfigDict(env_prefix="DRIVER_")

    kafka_security_protocol: SecurityProtocol = kafka_protocol_field("DRIVER_")
    kafka_sasl_username: str | None = kafka_username_field("DRIVER_", "driver")
    kafka_sasl_password: SecretStr | None = kafka_password_field("DRIVER_", "driver")
    kafka_ssl_cafile: Path | None = kafka_cafile_field("DRIVER_")

    driver_id: Identifier = Field(description="driver id")
    requests_file: Path = Field(Path("requests.txt"), description="file of CP ids, one per line")
    request_interval: Annotated[float, Field(ge=0)] = Field(
        4.0, description="seconds between requests"
    )
    request_timeout: Positive = Field(60.0, description="give up on a request with no final status")


class LoadSettings(ServiceSettings):
    """Driver load: many drivers in one process, arriving at random (Poisson) times."""

    model_config = SettingsConfigDict(env_prefix="LOAD_")

    kafka_security_protocol: SecurityProtocol = kafka_protocol_field("LOAD_")
    kafka_sasl_username: str | None = kafka_username_field("LOAD_", "driver")
    kafka_sasl_password: SecretStr | None = kafka_password_field("LOAD_", "driver")
    kafka_ssl_cafile: Path | None = kafka_cafile_field("LOAD_")

    rate: Positive = Field(10.0, description="driver arrivals per second (Poisson)")
    duration: Positive = Field(60.0, description="seconds during which drivers arrive")
    seed: int | None = Field(
        None, description="seed of the arrivals and CP choices (unset: a new one, shown in "
        "the summary)"
    )
    driver_prefix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{0,56}$")] = Field(
        "load-", description="driver ids are this prefix and a 6-digit number"
    )
    request_timeout: Positive = Field(
        60.0, description="give up on a request with no final status this many seconds "
        "after it was sent"
    )
    central_url: Annotated[str, AfterValidator(_central_urls)] = Field(
        "http://localhost:8000", description="Central's HTTP API, where the CPs are listed; "
        "several URLs separated by commas: the next is tried when one does not answer"
    )
    refresh_interval: Positive = Field(
        5.0, description="seconds between two readings of Central's ACTIVATED CPs"
    )
    site: str | None = Field(None, description="only the CPs of this site")
    cps: str | None = Field(
        None, description="only these CPs: ids separated by commas, or a count N for "
        "<cp-prefix>00001 to N (as ev_fleet names them)"
    )
    cp_prefix: Identifier = Field("CP-", description="id prefix of --cps given as a count")
    allow_busy: bool = Field(
        False, description="with no free CP, send the request to a random known CP anyway "
        "(loads Central's DENIED path) instead of counting it as 'no free CP'"
    )
    cars: bool = Field(
        False, description="give each driver a car, kWh wanted and departure (SPEC §10), "
        "drawn from the seed: batteries 40-100 kWh, state of charge 0.1-0.6, 7.4-150 kW, "
        "workplace stays of 2-9 h; sessions then last until the car has its energy"
    )
    progress_interval: Positive = Field(5.0, description="seconds between progress lines")
    json_summary: bool = Field(
        False, description="write only the summary, as one JSON object, on stdout (--json)"
    )
    connect_timeout: Positive = Field(
        30.0, description="seconds to keep trying to reach Kafka and Central at start"
    )
    metrics_host: str = Field("127.0.0.1", description="address of GET /metrics (Prometheus)")
    metrics_port: Port = Field(
        0, description="port of GET /metrics for Prometheus while the run lasts (0: none)"
    )


class FleetSettings(ServiceSettings):
    """CP Fleet: many CP Engines and their monitoring in one process.

    Its CPs behave as the engine's and the monitor's settings say (``CP_ENGINE_*``:
    rates, session length, intervals, the token of its HTTP port; ``CP_MONITOR_*``: the
    health interval, the failure threshold, the token sent to Central); these are the
    fleet's own.
    """

    model_config = SettingsConfigDict(env_prefix="FLEET_")

    kafka_security_protocol: SecurityProtocol = kafka_protocol_field("FLEET_")
    kafka_sasl_username: str | None = kafka_username_field("FLEET_", "cp")
    kafka_sasl_password: SecretStr | None = kafka_password_field("FLEET_", "cp")
    kafka_ssl_cafile: Path | None = kafka_cafile_field("FLEET_")

    cps: int = Field(100, ge=1, le=100_000, description="how many CPs the fleet runs")
    id_prefix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{0,56}$")] = Field(
        "CP-", description="CP ids are this prefix and a 5-digit number (CP-00001, …)"
    )
    first: int = Field(
        1, ge=1, le=999_999, description="number of the first CP (two fleets can split a "
        "network: --cps 5000 and --cps 5000 --first 5001)"
    )
    sites: int = Field(1, ge=1, le=10_000, description="sites the CPs are grouped into, in "
                       "blocks of consecutive ids, each with its location")
    site_prefix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._ -]{0,56}$")] = Field(
        "site-", description="site names are this prefix and a 2-digit number (site-01, …)"
    )
    http_host: str = Field("127.0.0.1", description="address of the fleet's HTTP port")
    http_port: Port = Field(
        8100, description="port of the fleet's HTTP API (/health, /cp/{id}/health, "
        "/cp/{id}/fault, /cp/{id}/recover)"
    )
    allow_anonymous: bool = Field(
        False, description="with no token, listen on a non-loopback address anyway and "
        "accept /fault and /recover from any client (protected mode off)"
    )
    central_host: CentralHosts = Field("localhost", description=CENTRAL_HOSTS_HELP)
    central_port: Port = Field(8000, description="port of Central's HTTP API")
    fault_rate: Annotated[float, Field(ge=0, le=3600)] = Field(
        0.0, description="random hardware faults per CP-hour (0: none)"
    )
    repair_after: Positive = Field(30.0, description="seconds until a random fault is repaired")
    seed: int | None = Field(
        None, description="seed of the random faults and heartbeat phases (unset: a new one, "
        "logged at start)"
    )
    connect_batch: int = Field(
        250, ge=1, le=10_000, description="CPs connected (and stopped) at a time"
    )
    stall_after: Positive = Field(
        30.0, description="a CP whose heartbeat has not gone out for this many seconds counts "
        "as stuck: its health checks fail (keep it above twice CP_ENGINE_STATUS_INTERVAL)"
    )
    protocol: Literal["kafka", "ocpp1.6", "ocpp2.0.1"] = Field(
        "kafka", description="how the CPs join: kafka (the engine's protocol), or as OCPP "
        "chargers with one connector each, connected to an OCPP gateway at --ocpp-url "
        "(ocpp1.6 or ocpp2.0.1; the gateway makes charger X the CP X.1)"
    )
    ocpp_url: Annotated[str, StringConstraints(pattern=r"^wss?://[^\s]+$")] = Field(
        "ws://127.0.0.1:9000/ocpp/", description="with an OCPP protocol: the gateway's URL; "
        "each charger connects to it followed by its id"
    )
    ocpp_password: SecretStr | None = Field(
        None, description="with an OCPP protocol: the Basic-auth password every charger "
        "sends (the gateway's OCPP_PASSWORDS_FILE); unset: none"
    )


class OcppSettings(ServiceSettings):
    """OCPP gateway (SPEC §8): real chargers over OCPP-J 1.6 and 2.0.1, turned into CPs."""

    model_config = SettingsConfigDict(env_prefix="OCPP_")

    kafka_security_protocol: SecurityProtocol = kafka_protocol_field("OCPP_")
    kafka_sasl_username: str | None = kafka_username_field("OCPP_", "cp")
    kafka_sasl_password: SecretStr | None = kafka_password_field("OCPP_", "cp")
    kafka_ssl_cafile: Path | None = kafka_cafile_field("OCPP_")

    host: str = Field("127.0.0.1", description="address chargers connect to")
    ws_port: Port = Field(9000, description="WebSocket port: ws://HOST:PORT/ocpp/{charger_id}")
    passwords_file: Path | None = Field(
        None, description="Basic-auth passwords, 'charger_id:password' or "
        "'charger_id:sha256:<hex>' a line (unset: protected mode, loopback chargers only)"
    )
    tls_cert: Path | None = Field(None, description="TLS certificate (with tls_key: wss:// only)")
    tls_key: Path | None = Field(None, description="TLS private key (with tls_cert)")
    allow_anonymous: bool = Field(
        False, description="with no passwords file, listen on a non-loopback address anyway "
        "and accept chargers from any address (protected mode off)"
    )
    heartbeat_interval: int = Field(
        60, ge=1, le=86_400, description="the interval a BootNotification is answered with (s)"
    )
    status_interval: Positive = Field(
        5.0, description="seconds between the heartbeat statuses the gateway publishes for "
        "each of its CPs (keep it well below Central's CENTRAL_CP_SILENCE_TIMEOUT)"
    )
    euro_rate: Annotated[float, Field(ge=0)] = Field(
        0.30, description="price per kWh of the gateway's CPs (€)"
    )
    site: Annotated[str, StringConstraints(min_length=1, max_length=SITE_MAX)] | None = Field(
        None, description="the site every charger's CPs belong to at Central, whose power "
        "limit smart charging shares among them (SPEC §10); unset: no site"
    )
    sites_file: Path | None = Field(
        None, description="'charger_id:site' a line: those chargers' site, over OCPP_SITE "
        "(read at start)"
    )
    call_timeout: Positive = Field(
        30.0, description="seconds a CALL to a charger waits for its answer"
    )
    decision_timeout: Positive = Field(
        5.0, description="seconds a charger's own start waits for Central's verdict before "
        "its id tag is answered (then Accepted; keep it well under the chargers' CALL timeout)"
    )
    http_host: str = Field("127.0.0.1", description="address of /health and /metrics")
    http_port: Port = Field(9001, description="port of the gateway's /health and /metrics")
    state_file: Path = Field(
        Path("ev_ocpp_state.json"), description="where the gateway keeps its CPs, running "
        "sessions and recent transactions across restarts"
    )
    central_host: CentralHosts = Field("localhost", description=CENTRAL_HOSTS_HELP)
    central_port: Port = Field(8000, description="port of Central's HTTP API")
    api_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("OCPP_API_TOKEN", SHARED_TOKEN_ENV),
        description="token sent to Central's API when it has one",
    )

    @model_validator(mode="after")
    def _tls_needs_both(self) -> OcppSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("OCPP_TLS_CERT and OCPP_TLS_KEY go together: set both or neither")
        return self


class CtlSettings(BaseSettings):
    """ctl, the operator CLI of Central's TCP control plane: where Central is, and its token.

    It reads Central's own variables (``CENTRAL_LISTEN_PORT``, ``CENTRAL_API_TOKEN``, then
    the shared ``EVCHARGING_API_TOKEN``), so one ``.env`` serves both.
    """

    model_config = SettingsConfigDict(
        env_prefix="CENTRAL_CTL_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        env_ignore_empty=True,
    )

    host: CentralHosts = Field(
        "localhost", description="Central's host, or several separated by commas (h1,h2 "
        "with this port, or h1:9999,h2:9998): the next is tried when one does not answer"
    )
    port: Annotated[int, Field(ge=1, le=65535)] = Field(
        9999, validation_alias="CENTRAL_LISTEN_PORT", description="Central's TCP control port"
    )
    token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("CENTRAL_API_TOKEN", SHARED_TOKEN_ENV),
        description="API token when Central requires one (prefer a variable: flags show in ps)",
    )
    timeout: Positive = Field(5.0, description="seconds to wait for Central")


S = TypeVar("S", bound=BaseSettings)


def _aliases(cls: type[BaseSettings], field: str) -> list[str]:
    """The variables named by a field's ``validation_alias`` (none: prefix + field name)."""
    alias = cls.model_fields[field].validation_alias
    if isinstance(alias, str):
        return [alias.upper()]
    if isinstance(alias, AliasChoices):
        return [str(choice).upper() for choice in alias.choices if isinstance(choice, str)]
    return []


def _env_name(cls: type[BaseSettings], field: str) -> str:
    """The variable of a field, or ``A or B`` when it reads several, first one first."""
    if aliases := _aliases(cls, field):
        return " or ".join(aliases)
    prefix = str(cls.model_config.get("env_prefix", ""))
    return f"{prefix}{field}".upper()


def _field_name(cls: type[BaseSettings], key: str) -> str:
    """The field that an error location names (by field name, or by variable for aliases)."""
    if key in cls.model_fields:
        return key
    return next((f for f in cls.model_fields if key.upper() in _aliases(cls, f)), key)


def settings_problems(cls: type[BaseSettings], exc: ValidationError) -> str:
    """What is wrong with some settings, one ``field (VARIABLE): message`` per problem."""
    problems = []
    for err in exc.errors():
        if not err["loc"]:
            problems.append(f"settings: {err['msg']}")
            continue
        field = _field_name(cls, str(err["loc"][0]))
        where = ".".join([field, *(str(p) for p in err["loc"][1:])])
        env = _env_name(cls, field) if field in cls.model_fields else field.upper()
        problems.append(f"{where} ({env}): {err['msg']}")
    return "; ".join(problems)


def build_parser(cls: type[BaseSettings], prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per settings field; absent flags stay absent."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Every flag can also be set by its environment variable or in .env; "
        "a flag beats the variable, the variable beats the default.",
        argument_default=argparse.SUPPRESS,
    )
    add_settings_flags(parser, cls)
    return parser


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[BaseSettings]) -> None:
    """One flag per settings field on ``parser`` (or a subcommand's); absent flags stay absent."""
    for name, info in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = _env_name(cls, name)
        required = info.is_required()
        default = "required" if required else f"default: {_show_default(info.default)}"
        help_text = f"{info.description or name} [{env}; {default}]"
        if info.annotation is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag, dest=name, metavar=name.upper(), default=argparse.SUPPRESS, help=help_text
            )


def _show_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, Path):
        return str(value)
    return repr(value) if isinstance(value, str) else str(value)


def load_settings(
    cls: type[S], argv: Sequence[str] | None, prog: str, description: str
) -> S:
    """Parse flags over the environment into a validated settings object.

    Invalid settings end the program with a clear message (exit code 2), like a bad flag.
    """
    parser = build_parser(cls, prog, description)
    flags = vars(parser.parse_args(argv))
    try:
        return cls(**flags)
    except ValidationError as exc:
        parser.error(f"invalid settings: {settings_problems(cls, exc)}")
