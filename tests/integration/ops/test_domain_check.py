"""The domain check against a real DNS server on 127.0.0.1 (tests/support/dns_server.py):
each test publishes a school's zone as its DNS host would, runs the check as the settings
page does, and reads the answer as the administrator would (ok, found, expected, hint).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from postier.core import dkim_signing
from postier.errors import InvalidInput
from postier.ops.domain_check import MAX_QUERIES, DkimKey, check_domain

from support.dns_server import LocalDns

SCHOOL = "clg-moulin.ac-lyon.fr"
RELAY = "smtp.ac-lyon.fr"
RELAY_IP = "192.0.2.10"
DKIM_NAME = f"postier._domainkey.{SCHOOL}"


@pytest.fixture(scope="module")
def key() -> dkim_signing.DkimKey:
    """A key made as ``postier dkim generate`` makes it."""
    return dkim_signing.generate(SCHOOL, "postier")


@pytest.fixture(scope="module")
def other_key() -> dkim_signing.DkimKey:
    return dkim_signing.generate(SCHOOL, "postier")


@pytest.fixture
def signing(key: dkim_signing.DkimKey) -> DkimKey:
    return DkimKey(key.selector, key.public_b64)


@pytest.fixture
def school(dns_server: LocalDns, key: dkim_signing.DkimKey) -> LocalDns:
    """A school whose DNS is right: SPF names the relay's address, the DKIM record is
    Postier's key, the academy's DMARC policy quarantines."""
    dns_server.add(RELAY, "A", RELAY_IP)
    dns_server.add(SCHOOL, "MX", f"10 mx.{SCHOOL}.")
    dns_server.add(f"_dmarc.{SCHOOL}", "TXT", "v=DMARC1; p=quarantine; rua=mailto:dmarc@ac-lyon.fr")
    dns_server.add(DKIM_NAME, "TXT", key.record_value)  # 410 characters: two strings
    return dns_server


async def check(server: LocalDns, dkim: DkimKey | None, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("relay_host", RELAY)
    kwargs.setdefault("timeout", 2.0)
    return await check_domain(SCHOOL, dkim=dkim, servers=server.servers, **kwargs)


def spf(server: LocalDns, record: str, name: str = SCHOOL) -> None:
    server.add(name, "TXT", record)


# --------------------------------------------------------------------------- everything right


async def test_a_correct_school_domain_is_right_on_all_three(
        school: LocalDns, signing: DkimKey, key: dkim_signing.DkimKey) -> None:
    spf(school, "v=spf1 mx ip4:192.0.2.10 -all")
    school.add(SCHOOL, "TXT", "google-site-verification=abc")  # other TXT records are ignored

    result = await check(school, signing)

    assert result["domain"] == SCHOOL
    assert result["spf"] == {
        "ok": True, "found": "v=spf1 mx ip4:192.0.2.10 -all", "expected": "ip4:192.0.2.10",
        "hint": f"The SPF record of {SCHOOL} authorises your relay {RELAY}."}
    assert result["dkim"]["ok"], result["dkim"]
    assert result["dkim"]["found"] == key.record_value == result["dkim"]["expected"]
    assert "matches the key Postier signs with" in result["dkim"]["hint"]
    assert result["dmarc"]["ok"], result["dmarc"]
    assert result["dmarc"]["found"].startswith("v=DMARC1; p=quarantine")
    assert "p=quarantine" in result["dmarc"]["hint"]
    assert len(school.queries) <= MAX_QUERIES


async def test_the_hints_read_in_french(school: LocalDns, signing: DkimKey) -> None:
    spf(school, "v=spf1 -all")
    school.add(f"_dmarc.{SCHOOL}", "TXT", "v=DMARC1; p=none")  # a second record

    result = await check(school, None, lang="fr")

    assert not result["spf"]["ok"]
    assert result["spf"]["hint"] == (
        f"L'enregistrement SPF de {SCHOOL} n'autorise pas votre serveur d'envoi {RELAY} : "
        "ajoutez-y le terme attendu, avant le all final.")
    assert "Postier ne signe pas les e-mails" in result["dkim"]["hint"]
    assert "postier dkim generate" in result["dkim"]["hint"]
    assert "2 enregistrements DMARC" in result["dmarc"]["hint"]


# --------------------------------------------------------------------------- SPF


async def test_a_domain_without_spf_is_told_the_record_to_publish(
        school: LocalDns, signing: DkimKey) -> None:
    result = (await check(school, signing))["spf"]

    assert not result["ok"]
    assert result["found"] is None
    assert result["expected"] == "v=spf1 ip4:192.0.2.10 ~all"
    assert "publishes no SPF record" in result["hint"]


async def test_spf_is_followed_through_include_and_redirect_chains(
        school: LocalDns, signing: DkimKey) -> None:
    spf(school, "v=spf1 include:_spf.ac-lyon.fr ~all")
    spf(school, "v=spf1 redirect=_relais.ac-lyon.fr", "_spf.ac-lyon.fr")
    spf(school, "v=spf1 a:smtp.ac-lyon.fr/28 ip6:2001:db8::/32 -all", "_relais.ac-lyon.fr")

    result = (await check(school, signing))["spf"]

    assert result["ok"], result
    assert result["expected"] == "ip4:192.0.2.10"


async def test_a_chain_that_misses_the_relay_says_what_to_add(
        school: LocalDns, signing: DkimKey) -> None:
    school.add(RELAY, "AAAA", "2001:db8::25")
    spf(school, "v=spf1 include:_spf.ac-lyon.fr -all")
    spf(school, "v=spf1 ip4:192.0.2.10 ip6:2001:db8:ffff::/48 -all", "_spf.ac-lyon.fr")

    result = (await check(school, signing))["spf"]

    assert not result["ok"]
    assert result["found"] == "v=spf1 include:_spf.ac-lyon.fr -all"
    assert result["expected"] == "ip4:192.0.2.10 ip6:2001:db8::25"
    assert f"does not authorise your relay {RELAY}" in result["hint"]


async def test_more_than_ten_lookups_is_an_error_receivers_see(
        school: LocalDns, signing: DkimKey) -> None:
    # Eleven includes, each with the relay's address: only the count is wrong.
    spf(school, "v=spf1 " + " ".join(f"include:s{i}.ac-lyon.fr" for i in range(11)) + " -all")
    for i in range(11):
        spf(school, "v=spf1 ip4:192.0.2.10 -all", f"s{i}.ac-lyon.fr")

    result = (await check(school, signing))["spf"]

    assert not result["ok"]
    assert result["found"].startswith("v=spf1 include:s0.ac-lyon.fr")
    assert "more than 10 DNS lookups" in result["hint"]
    assert len(school.queries) <= MAX_QUERIES


async def test_an_include_loop_ends_on_the_lookup_limit(
        school: LocalDns, signing: DkimKey) -> None:
    spf(school, "v=spf1 include:_spf.ac-lyon.fr -all")
    spf(school, "v=spf1 include:clg-moulin.ac-lyon.fr -all", "_spf.ac-lyon.fr")

    result = (await check(school, signing))["spf"]

    assert not result["ok"]
    assert "more than 10 DNS lookups" in result["hint"]


async def test_microsoft_365_needs_its_include_not_its_submission_host(
        school: LocalDns, signing: DkimKey) -> None:
    # smtp.office365.com has no address in this zone: its sending servers are elsewhere.
    spf(school, "v=spf1 include:spf.protection.outlook.com -all")
    spf(school, "v=spf1 ip4:40.92.0.0/15 ip6:2a01:111:f400::/48 -all",
        "spf.protection.outlook.com")

    result = (await check(school, signing, relay_host="smtp.office365.com"))["spf"]

    assert result["ok"], result
    assert result["expected"] == "include:spf.protection.outlook.com"
    assert "authorises your relay smtp.office365.com" in result["hint"]


async def test_microsoft_365_without_its_include_is_told_the_term(
        school: LocalDns, signing: DkimKey) -> None:
    spf(school, "v=spf1 ip4:192.0.2.10 -all")

    result = (await check(school, signing, relay_host="smtp.office365.com"))["spf"]

    assert not result["ok"]
    assert result["expected"] == "include:spf.protection.outlook.com"
    assert "does not authorise your relay smtp.office365.com" in result["hint"]


async def test_plus_all_is_too_permissive(school: LocalDns, signing: DkimKey) -> None:
    spf(school, "v=spf1 ip4:192.0.2.10 +all")

    result = (await check(school, signing))["spf"]

    assert not result["ok"]
    assert result["expected"] == "v=spf1 ip4:192.0.2.10 ~all"
    assert "ends with +all" in result["hint"] and "~all or -all" in result["hint"]


async def test_a_relay_on_the_local_network_needs_no_spf_mention(
        school: LocalDns, signing: DkimKey) -> None:
    spf(school, "v=spf1 include:_spf.ac-lyon.fr -all")
    spf(school, "v=spf1 ip4:198.51.100.0/24 -all", "_spf.ac-lyon.fr")

    result = (await check(school, signing, relay_host="192.168.1.20"))["spf"]

    assert result["ok"], result
    assert result["expected"] == ""
    assert "local network" in result["hint"]


async def test_several_spf_records_and_a_missing_relay_setting(
        school: LocalDns, signing: DkimKey) -> None:
    spf(school, "v=spf1 ip4:192.0.2.10 -all")
    spf(school, "v=spf1 include:_spf.google.com ~all")

    several = (await check(school, signing))["spf"]
    unset = (await check(school, signing, relay_host=None))["spf"]

    assert not several["ok"]
    assert several["found"] is not None and several["found"].count("v=spf1") == 2
    assert "2 SPF records" in several["hint"]
    assert not unset["ok"]
    assert unset["expected"] == ""
    assert "relay.host" in unset["hint"]


async def test_spf_is_read_on_the_envelope_domain_when_it_differs(
        school: LocalDns, signing: DkimKey) -> None:
    spf(school, "v=spf1 -all")
    spf(school, "v=spf1 ip4:192.0.2.10 -all", "retours.ac-lyon.fr")

    result = await check(school, signing, envelope_domain="retours.ac-lyon.fr")

    assert result["spf"]["ok"], result["spf"]
    assert result["spf"]["found"] == "v=spf1 ip4:192.0.2.10 -all"
    assert "retours.ac-lyon.fr authorises" in result["spf"]["hint"]
    assert result["dmarc"]["ok"]  # same organisational domain: aligned


# --------------------------------------------------------------------------- DKIM


async def test_dkim_absent_gives_the_whole_record(school: LocalDns,
                                                  key: dkim_signing.DkimKey) -> None:
    result = (await check(school, DkimKey("autre", key.public_b64)))["dkim"]

    assert not result["ok"]
    assert result["found"] is None
    assert result["expected"] == f"v=DKIM1; k=rsa; p={key.public_b64}"
    assert f"no DKIM record at autre._domainkey.{SCHOOL}" in result["hint"]


async def test_dkim_with_another_key_is_not_the_one_postier_signs_with(
        school: LocalDns, other_key: dkim_signing.DkimKey, key: dkim_signing.DkimKey) -> None:
    result = (await check(school, DkimKey("postier", other_key.public_b64)))["dkim"]

    assert not result["ok"]
    assert result["found"] == key.record_value
    assert result["expected"] == other_key.record_value
    assert "not the one Postier signs with" in result["hint"]


async def test_dkim_split_and_spaced_as_dns_hosts_store_it_still_matches(
        dns_server: LocalDns, key: dkim_signing.DkimKey, signing: DkimKey) -> None:
    value = key.public_b64
    # Three strings, spaces around the tags, the key cut mid-way with a space inside.
    dns_server.add(DKIM_NAME, "TXT", f'"v=DKIM1; k=rsa; " "p={value[:200]}" " {value[200:]}"')
    dns_server.add(SCHOOL, "TXT", "v=spf1 ip4:192.0.2.10 -all")
    dns_server.add(RELAY, "A", RELAY_IP)

    result = (await check(dns_server, signing))["dkim"]

    assert result["ok"], result
    assert result["found"] == f"v=DKIM1; k=rsa; p={value[:200]} {value[200:]}"


async def test_no_dkim_key_in_postier_says_how_to_make_one(school: LocalDns) -> None:
    spf(school, "v=spf1 ip4:192.0.2.10 -all")

    result = await check(school, None)

    assert result["dkim"]["ok"] is False and result["dkim"]["found"] is None
    assert f"postier dkim generate {SCHOOL}" in result["dkim"]["hint"]
    assert result["dmarc"]["ok"]  # SPF alone passes DMARC, aligned on the same domain


# --------------------------------------------------------------------------- DMARC


async def test_dmarc_absent_gives_a_first_record(dns_server: LocalDns, signing: DkimKey) -> None:
    spf(dns_server, "v=spf1 ip4:192.0.2.10 -all")
    dns_server.add(RELAY, "A", RELAY_IP)

    result = (await check(dns_server, signing))["dmarc"]

    assert not result["ok"]
    assert result["found"] is None
    assert result["expected"] == f"v=DMARC1; p=none; rua=mailto:dmarc@{SCHOOL}"
    assert "no DMARC policy" in result["hint"]


async def test_dmarc_of_the_academy_applies_to_the_school(
        dns_server: LocalDns, key: dkim_signing.DkimKey, signing: DkimKey) -> None:
    dns_server.add(DKIM_NAME, "TXT", key.record_value)
    dns_server.add("_dmarc.ac-lyon.fr", "TXT", "v=DMARC1; p=none; sp=reject")

    result = (await check(dns_server, signing))["dmarc"]

    assert result["ok"], result  # DKIM passes, aligned: no SPF needed
    assert result["found"] == "v=DMARC1; p=none; sp=reject"
    assert "(p=reject)" in result["hint"]
    assert "published at _dmarc.ac-lyon.fr" in result["hint"]


async def test_dmarc_p_none_only_monitors(dns_server: LocalDns, signing: DkimKey) -> None:
    spf(dns_server, "v=spf1 ip4:192.0.2.10 -all")
    dns_server.add(RELAY, "A", RELAY_IP)
    dns_server.add(f"_dmarc.{SCHOOL}", "TXT", "v=DMARC1; p=none; rua=mailto:d@ac-lyon.fr")

    result = (await check(dns_server, signing))["dmarc"]

    assert result["ok"], result  # SPF passes, aligned: DKIM absent does not matter
    assert result["expected"] == result["found"] == "v=DMARC1; p=none; rua=mailto:d@ac-lyon.fr"
    assert "only monitors" in result["hint"]


async def test_dmarc_fails_when_nothing_aligned_passes(school: LocalDns) -> None:
    # The return address is on another organisation and nothing is signed.
    spf(school, "v=spf1 ip4:192.0.2.10 -all", "bounces.example.net")

    result = (await check(school, None, envelope_domain="bounces.example.net"))["dmarc"]

    assert not result["ok"]
    assert "bounces.example.net, outside" in result["hint"]
    assert "DKIM key" in result["hint"]


# --------------------------------------------------------------------------- DNS trouble


async def test_a_dns_server_that_never_answers_gives_the_dns_hint_in_bounded_time(
        school: LocalDns, signing: DkimKey) -> None:
    school.fail(how="timeout")
    started = time.monotonic()

    result = await check(school, signing, timeout=0.3)

    assert time.monotonic() - started < 1.5
    for part in ("spf", "dkim", "dmarc"):
        assert result[part]["ok"] is False, part
        assert result[part]["found"] is None, part
        assert "could not be asked" in result[part]["hint"], part
        assert "POSTIER_DNS_SERVERS" in result[part]["hint"], part
    assert result["dkim"]["expected"] == signing.record  # known without the DNS


async def test_one_name_in_servfail_fails_only_its_item(school: LocalDns,
                                                        signing: DkimKey) -> None:
    spf(school, "v=spf1 ip4:192.0.2.10 -all")
    school.fail(DKIM_NAME, "servfail")

    result = await check(school, signing)

    assert result["spf"]["ok"] and result["dmarc"]["ok"]
    assert not result["dkim"]["ok"]
    assert f"could not be asked about {DKIM_NAME}" in result["dkim"]["hint"]


async def test_a_domain_that_does_not_exist_is_said_so(dns_server: LocalDns,
                                                       signing: DkimKey) -> None:
    dns_server.add(RELAY, "A", RELAY_IP)

    result = await check_domain("clg-mouiln.ac-lyon.fr", relay_host=RELAY, dkim=signing,
                                servers=dns_server.servers, lang="fr")

    for part in ("spf", "dkim", "dmarc"):
        assert result[part]["ok"] is False, part
        assert "clg-mouiln.ac-lyon.fr n'existe pas dans le DNS" in result[part]["hint"], part
    assert result["spf"]["expected"] == "v=spf1 ip4:192.0.2.10 ~all"


async def test_long_answers_come_over_tcp(school: LocalDns, signing: DkimKey) -> None:
    spf(school, "v=spf1 ip4:192.0.2.10 -all")
    school.max_udp = 200  # the DKIM record no longer fits in a datagram

    result = await check(school, signing)

    assert result["dkim"]["ok"], result["dkim"]
    assert (DKIM_NAME, "TXT", "tcp") in school.queries


async def test_a_name_that_is_not_a_domain_is_refused(dns_server: LocalDns) -> None:
    for bad in ("", "localhost", "secretariat@clg-moulin.ac-lyon.fr", "*.ac-lyon.fr"):
        with pytest.raises(InvalidInput) as caught:
            await check_domain(bad, relay_host=RELAY, dkim=None, servers=dns_server.servers)
        assert "is not a domain name" in caught.value.message("en")
    assert dns_server.queries == []
