"""The OCPP gateway's CPs at their sites (SPEC §10): OCPP_SITE, OCPP_SITES_FILE and the
registrations that carry them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest
from pydantic import ValidationError

from evcharging.apps.ev_fleet.central import CentralClient, Outcome
from evcharging.apps.ev_ocpp.central import OcppRegistration, Registrar, SiteBook
from evcharging.common.config import OcppSettings, load_settings, settings_problems
from evcharging.common.messages import CPRegistration
from tests.polling import poll


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in ("OCPP_SITE", "OCPP_SITES_FILE"):
        monkeypatch.delenv(name, raising=False)


def test_the_site_is_unset_by_default_and_read_from_its_variable_or_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(OcppSettings, [], "ev_ocpp", "")
    assert settings.site is None and settings.sites_file is None
    monkeypatch.setenv("OCPP_SITE", "depot north")
    monkeypatch.setenv("OCPP_SITES_FILE", "sites.txt")
    settings = load_settings(OcppSettings, [], "ev_ocpp", "")
    assert settings.site == "depot north" and settings.sites_file == Path("sites.txt")
    assert load_settings(OcppSettings, ["--site", "site-B"], "ev_ocpp", "").site == "site-B"


def test_a_site_longer_than_a_registrations_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValidationError) as info:
        OcppSettings(site="s" * 65)
    assert "site (OCPP_SITE): String should have at most 64 characters" in settings_problems(
        OcppSettings, info.value)
    assert OcppSettings(site="s" * 64).site == "s" * 64


def test_the_sites_file_names_a_chargers_site_over_the_default(tmp_path: Path) -> None:
    path = tmp_path / "sites.txt"
    path.write_text("# charger:site\n\nCH-1:site-A\n  CH.2 : depot: north  \n", encoding="utf-8")
    book = SiteBook.load("site-Z", path)
    assert book.by_charger == {"CH-1": "site-A", "CH.2": "depot: north"}
    assert book.site_of("CH-1.1") == "site-A"
    assert book.site_of("CH.2.3") == "depot: north"
    assert book.site_of("CH-3.1") == "site-Z"
    assert SiteBook.load(None, path).site_of("CH-3.1") is None
    assert SiteBook().site_of("CH-1.1") is None


@pytest.mark.parametrize(("text", "problem"), [
    ("CH-1 site-A\n", "line 1: expected 'charger_id:site'"),
    ("CH-1:site-A\nbad id:x\n", "line 2: expected 'charger_id:site'"),
    ("CH-1:   \n", "line 1: expected 'charger_id:site'"),
    ("CH-1:" + "s" * 65, "line 1: the site is longer than 64 characters"),
    ("CH-1:a\n# x\nCH-1:b\n", "line 3: charger 'CH-1' is given twice"),
])
def test_a_bad_sites_file_line_is_named(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        SiteBook.parse(text)


def test_a_missing_sites_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        SiteBook.load(None, tmp_path / "absent.txt")


class RecordingCentral:
    """Takes every registration (the Registrar's side of CentralClient)."""

    def __init__(self) -> None:
        self.registered: list[CPRegistration] = []

    async def register(self, cps: Sequence[CPRegistration]) -> tuple[Outcome, int]:
        self.registered.extend(cps)
        return Outcome.OK, len(cps)


async def test_registrations_carry_their_chargers_site() -> None:
    central = RecordingCentral()
    registrar = Registrar(cast(CentralClient, central),
                          sites=SiteBook("site-Z", {"CH-1": "site-A"}))
    registrar.add(OcppRegistration(cp_id="CH-1.1", protocol="ocpp1.6"))
    registrar.add(OcppRegistration(cp_id="CH-2.1", protocol="ocpp2.0.1"))
    registrar.add(OcppRegistration(cp_id="CH-3.1", site="given"))  # a site given stays
    task = asyncio.create_task(registrar.run())
    try:
        await poll(lambda: len(central.registered) == 3, timeout=5, what="3 registrations")
    finally:
        task.cancel()
    by_cp = {r.cp_id: r for r in central.registered}
    assert {cp: r.site for cp, r in by_cp.items()} == {
        "CH-1.1": "site-A", "CH-2.1": "site-Z", "CH-3.1": "given"}
    assert isinstance(by_cp["CH-1.1"], OcppRegistration)
    assert by_cp["CH-1.1"].protocol == "ocpp1.6"
    assert '"site":"site-A"' in by_cp["CH-1.1"].model_dump_json(exclude_none=True)


async def test_without_a_site_registrations_have_none() -> None:
    central = RecordingCentral()
    registrar = Registrar(cast(CentralClient, central))
    registrar.add(OcppRegistration(cp_id="CH-1.1"))
    task = asyncio.create_task(registrar.run())
    try:
        await poll(lambda: central.registered, timeout=5, what="the registration")
    finally:
        task.cancel()
    assert central.registered[0].site is None
