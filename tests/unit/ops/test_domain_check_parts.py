"""The domain check's pieces that need no DNS: reading POSTIER_DNS_SERVERS as an operator
writes it, and the organisational domain DMARC aligns on."""

from __future__ import annotations

import pytest

from postier.ops.domain_check import dns_servers, organisational_domain


def test_dns_servers_reads_addresses_with_and_without_ports() -> None:
    assert dns_servers("127.0.0.1:5353, 192.0.2.53,[::1]:53,2001:db8::35,[2001:db8::53]") == [
        ("127.0.0.1", 5353), ("192.0.2.53", 53), ("::1", 53), ("2001:db8::35", 53),
        ("2001:db8::53", 53)]


def test_a_blank_value_means_the_system_resolvers() -> None:
    assert dns_servers("") == []
    assert dns_servers(" , ") == []


@pytest.mark.parametrize(("value", "words"), [
    ("dns.ac-lyon.fr", "'dns.ac-lyon.fr' is not an IP address"),
    ("127.0.0.1:dns", "port of '127.0.0.1:dns' must be a number"),
    ("127.0.0.1:0", "from 1 to 65535"),
    ("192.0.2.53:65536", "from 1 to 65535"),
    ("[::1", "is not an IP address"),
    ("[::1]53", "is not an IP address"),
    ("127.0.0.1;192.0.2.53", "is not an IP address"),
])
def test_dns_servers_says_what_is_wrong(value: str, words: str) -> None:
    with pytest.raises(ValueError, match="POSTIER_DNS_SERVERS") as caught:
        dns_servers(value)
    assert words in str(caught.value)


@pytest.mark.parametrize(("name", "organisation"), [
    ("clg-moulin.ac-lyon.fr", "ac-lyon.fr"),
    ("ac-lyon.fr", "ac-lyon.fr"),
    ("retours.lycee.ac-versailles.fr.", "ac-versailles.fr"),
    ("stmarys.sch.uk", "stmarys.sch.uk"),
    ("mail.stmarys.sch.uk", "stmarys.sch.uk"),
])
def test_the_organisational_domain(name: str, organisation: str) -> None:
    assert organisational_domain(name) == organisation
