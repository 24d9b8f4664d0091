"""Assertions shared by the OCPP integration tests: the charging profiles Central's
SET_LIMIT becomes (SPEC §10), as the chargers receive them."""

from __future__ import annotations

from typing import Any


def assert_tx_profile_16(profile: dict[str, Any], transaction_id: int, limit_w: int) -> None:
    """An OCPP 1.6 SetChargingProfile: profile 9001, a TxProfile of `transaction_id`,
    `limit_w` W."""
    assert (profile["charging_profile_id"], profile["transaction_id"]) == (9001, transaction_id)
    assert (profile["charging_profile_purpose"], profile["stack_level"]) == ("TxProfile", 0)
    assert profile["charging_schedule"]["charging_rate_unit"] == "W"
    assert profile["charging_schedule"]["charging_schedule_period"] == [
        {"start_period": 0, "limit": limit_w}]


def assert_tx_profile_201(profile: dict[str, Any], transaction_id: str, limit_w: int) -> None:
    """An OCPP 2.0.1 SetChargingProfile: profile 9001, a TxProfile of `transaction_id`,
    one schedule of `limit_w` W."""
    assert (profile["id"], profile["transaction_id"], profile["charging_profile_purpose"]) == (
        9001, transaction_id, "TxProfile")
    (schedule,) = profile["charging_schedule"]
    assert schedule["charging_rate_unit"] == "W"
    assert schedule["charging_schedule_period"] == [{"start_period": 0, "limit": limit_w}]
