"""Central's coded errors. The HTTP API and the TCP plane turn them into replies at one place."""

from __future__ import annotations


class CentralError(Exception):
    """Base of the errors an operator or a client can cause."""

    code = "error"
    http_status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownCP(CentralError):
    code = "unknown_cp"
    http_status = 404

    def __init__(self, cp_id: str) -> None:
        super().__init__(f"unknown CP {cp_id!r}")
        self.cp_id = cp_id


class NotAllowed(CentralError):
    """The CP's state machine refuses the operation in the CP's current state."""

    code = "not_allowed"
    http_status = 409


class Unauthorized(CentralError):
    code = "unauthorized"
    http_status = 401


class Unavailable(CentralError):
    """A dependency (Kafka, the database) did not answer."""

    code = "unavailable"
    http_status = 503


class NotOwner(CentralError):
    """Another Central decides for this CP (SPEC §9), or a rebalance is under way: the
    change goes to the CP's owner (the API forwards it there)."""

    code = "not_owner"
    http_status = 503

    def __init__(self, cp_id: str) -> None:
        super().__init__(f"CP {cp_id!r} is decided by another Central, or its partitions "
                         "are moving between Centrals; try again")
        self.cp_id = cp_id
