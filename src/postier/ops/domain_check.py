"""Is the domain's DNS right for the e-mails Postier sends? SPF, DKIM and DMARC checked
as a receiving server checks them, and said in words an administrator can act on.

For each, :func:`check_domain` returns what is published (``found``), what should be
(``expected``: a whole record, or the term to add to one) and what to do (``hint``, in the
reader's language). DNS trouble never raises: the item says the DNS could not be asked.

Simplifications, as a school's domain rarely needs more: the organisational domain (for
DMARC) is the last two labels of the name, three under :data:`SHARED_SUFFIXES` (no Public
Suffix List); SPF counts the DNS-querying terms of the whole policy (every include read), as
the usual checkers do, so a policy over the limit is reported even when the relay matches
early; SPF macros (``%{i}``) and ``ptr`` never match. A check makes at most
:data:`MAX_QUERIES` queries and lasts at most about three times ``timeout``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from postier.errors import InvalidInput
from postier.i18n import N_, translate

MAX_QUERIES = 20
SPF_QUERIES = 14  # the rest (6) is for the domain itself, DKIM and DMARC's fallbacks
SPF_LOOKUP_LIMIT = 10  # RFC 7208 §4.6.4
# Providers whose submission host is not where their e-mails leave from: receivers see
# their sending servers, which the provider publishes under this SPF name.
PROVIDER_INCLUDES = {
    "smtp.office365.com": "spf.protection.outlook.com",
    "outlook.office365.com": "spf.protection.outlook.com",
    "smtp.gmail.com": "_spf.google.com",
    "smtp-relay.gmail.com": "_spf.google.com",
}
# Registries' shared second levels under which each name is a different organisation.
SHARED_SUFFIXES = frozenset({"sch.uk", "ac.uk", "co.uk", "org.uk", "gov.uk", "gouv.fr",
                             "edu.au", "com.au", "qc.ca", "ac.be"})
# A relay at such an address passes e-mails on to another server, the one receivers see.
# Listed rather than ipaddress's is_private, which also counts the documentation ranges.
_LOCAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
    "169.254.0.0/16", "::1/128", "fc00::/7", "fe80::/10"))

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_SERVER = re.compile(r"\[(?P<v6>[^\]]*)\](?::(?P<p6>.*))?|(?P<host>[^:]*)(?::(?P<port>[^:]*))?")

_DNS_FAILED = N_("The DNS could not be asked about {name} (no answer in time, or a server "
                 "error). Try again in a moment; if it lasts, check the DNS servers Postier "
                 "uses (POSTIER_DNS_SERVERS).")
_NO_DOMAIN = N_("{domain} does not exist in the DNS: check the domain of the sender address, "
                "or ask whoever manages the domain to create it.")

_FAILURES: dict[str, tuple[bool, str]] = {"dns": (False, _DNS_FAILED),
                                           "nxdomain": (False, _NO_DOMAIN)}
_SPF_HINTS: dict[str, tuple[bool, str]] = {
    **_FAILURES,
    "ok": (True, N_("The SPF record of {domain} authorises your relay {relay}.")),
    "local": (True, N_("Your relay {relay} is on your local network, so SPF only needs to name "
                       "the server it passes e-mails on to; the record of {domain} is valid.")),
    "no_relay": (False, N_("No relay server is set in Postier, so there is nothing to check: "
                           "set it (relay.host) in the settings, then check again.")),
    "relay_unknown": (False, N_("Your relay {relay} cannot be found in the DNS: check the relay "
                                "server (relay.host) in the settings.")),
    "missing": (False, N_("{domain} publishes no SPF record: receivers cannot tell that your "
                          "relay may send for it. Publish this TXT record on {domain}.")),
    "missing_local": (False, N_("{domain} publishes no SPF record. Your relay {relay} is on your "
                                "network: authorise the server it passes e-mails on to.")),
    "several": (False, N_("{domain} publishes {count} SPF records, so receivers ignore them "
                          "all: merge them into one that contains the expected terms.")),
    "lookups": (False, N_("The SPF record of {domain} needs more than 10 DNS lookups, so "
                          "receivers treat it as an error: remove unused includes.")),
    "no_target": (False, N_("The SPF record of {domain} names {target}, which has no SPF record, "
                            "so receivers treat it as an error: correct that term.")),
    "syntax": (False, N_("The SPF record of {domain} contains a term receivers do not "
                         "understand ({term}), so they treat it as an error: correct it.")),
    "budget": (False, N_("The SPF record of {domain} needs more DNS queries than this check "
                         "makes: check it with your DNS provider's tools.")),
    "not_authorised": (False, N_("The SPF record of {domain} does not authorise your relay "
                                 "{relay}: add the expected term, before the final all.")),
    "open": (False, N_("The SPF record of {domain} ends with {all}, which lets any server send "
                       "as {domain} unhindered: end it with ~all or -all instead.")),
}
_DKIM_HINTS: dict[str, tuple[bool, str]] = {
    **_FAILURES,
    "ok": (True, N_("The DKIM record at {name} matches the key Postier signs with.")),
    "no_key": (False, N_("Postier does not sign the e-mails of {domain}: make its key (postier "
                         "dkim generate {domain}, or the settings page), then publish the "
                         "record shown.")),
    "missing": (False, N_("There is no DKIM record at {name}: publish this TXT record there so "
                          "that receivers can check Postier's signature.")),
    "several": (False, N_("{count} DKIM records are published at {name}, and receivers may "
                          "read any of them: keep only this one.")),
    "different": (False, N_("The key published at {name} is not the one Postier signs with, "
                            "so receivers reject the signature: publish this record instead.")),
}
_DMARC_HINTS: dict[str, tuple[bool, str]] = {
    **_FAILURES,
    "ok": (True, N_("The DMARC policy of {domain} (p={policy}) is in force, and your e-mails "
                    "pass it through SPF or DKIM.")),
    "monitor": (True, N_("The DMARC policy of {domain} only monitors (p=none). Once its reports "
                         "show your e-mails pass, move to p=quarantine.")),
    "missing": (False, N_("{domain} has no DMARC policy, so Gmail or Yahoo may refuse its "
                          "e-mails: publish this TXT record at _dmarc.{domain}.")),
    "several": (False, N_("{count} DMARC records are published at {name}, and receivers then "
                          "ignore them all: keep only one.")),
    "invalid": (False, N_("The DMARC record at {name} has no valid policy (p=none, quarantine "
                          "or reject), so receivers ignore it: correct it as shown.")),
    "unaligned": (False, N_("Your e-mails cannot pass DMARC: their return address is on "
                            "{envelope}, outside {domain}, and they are not signed. Make a DKIM "
                            "key for {domain}.")),
    "failing": (False, N_("Your e-mails fail the DMARC policy of {domain}, as neither SPF nor "
                          "DKIM passes for {domain}: correct them first.")),
}
_INHERITED = N_("The policy is published at {where} and applies to {domain} as well.")


@dataclass(frozen=True)
class DkimKey:
    """What Postier signs with for a domain."""

    selector: str
    public_key: str  # base64 of the DER SubjectPublicKeyInfo, as published in p=

    @property
    def record(self) -> str:
        return f"v=DKIM1; k=rsa; p={self.public_key}"


def dns_servers(value: str) -> list[tuple[str, int]]:
    """Parse ``POSTIER_DNS_SERVERS`` (``"127.0.0.1:5353,192.0.2.53,[::1]:53"``); a blank
    value means the system's resolvers (``[]``). Servers are IP addresses: naming them would
    need a DNS to find the DNS."""
    servers: list[tuple[str, int]] = []
    for entry in filter(None, (e.strip() for e in value.split(","))):
        # A bare IPv6 address has several colons and matches neither form: it is the host.
        match = _SERVER.fullmatch(entry)
        host, port = (match["v6"] or match["host"], match["p6"] or match["port"] or "53"
                      ) if match else (entry, "53")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"POSTIER_DNS_SERVERS: {host!r} is not an IP address; write "
                             "servers as 127.0.0.1:5353,192.0.2.53,[::1]:53.") from None
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"POSTIER_DNS_SERVERS: the port of {entry!r} must be a number "
                             "from 1 to 65535.")
        servers.append((str(address), int(port)))
    return servers


async def check_domain(
    domain: str, *, relay_host: str | None, dkim: DkimKey | None,
    envelope_domain: str | None = None,
    servers: Sequence[tuple[str, int]] | None = None,
    lang: str = "en", timeout: float = 3.0,  # noqa: ASYNC109 - each query's, not the call's
) -> dict[str, Any]:
    """SPF, DKIM and DMARC of ``domain`` (the From's) as receivers see them.

    SPF is read at ``envelope_domain`` (the return path) when given. ``servers``: the DNS
    servers to ask, ``None`` for the system's. Raises :class:`InvalidInput` only when
    ``domain`` or ``envelope_domain`` is not a domain name.
    """
    domain = _domain_name(domain)
    spf_domain = _domain_name(envelope_domain) if envelope_domain else domain
    dns_ = _Dns(_resolver(servers, timeout), timeout, MAX_QUERIES - SPF_QUERIES,
                time.monotonic() + 3 * timeout)
    relay = relay_host.strip().lower().rstrip(".") if relay_host else None
    root = await dns_.query(domain, "TXT")
    if root.status in ("error", "budget"):
        # The server is down or unusable: asking more would only multiply the wait.
        return {"domain": domain, **_failed(domain, relay, dkim, lang, "dns")}
    spf, dkim_item, dmarc_found = await asyncio.gather(
        _check_spf(dns_.share(SPF_QUERIES), spf_domain, relay, lang),
        _check_dkim(dns_, domain, dkim, lang),
        _find_dmarc(dns_, domain),
    )
    dmarc = _dmarc_item(domain, spf_domain, dkim, dmarc_found, spf["ok"], dkim_item["ok"], lang)
    if root.status == "nxdomain":  # nothing can be published under a name that does not exist
        return {"domain": domain, **_failed(domain, relay, dkim, lang, "nxdomain"), "spf": spf}
    return {"domain": domain, "spf": spf, "dkim": dkim_item, "dmarc": dmarc}


def _failed(domain: str, relay: str | None, dkim: DkimKey | None, lang: str,
            key: str) -> dict[str, Any]:
    """The three items when the DNS cannot tell ("dns") or the domain does not exist."""
    fragment = f"include:{PROVIDER_INCLUDES[relay]}" if relay in PROVIDER_INCLUDES else ""
    params = {"domain": domain, "name": domain}
    return {"spf": _item(_SPF_HINTS, key, lang, None, fragment, **params),
            "dkim": _item(_DKIM_HINTS, key, lang, None, dkim.record if dkim else "", **params),
            "dmarc": _item(_DMARC_HINTS, key, lang, None, _default_dmarc(domain), **params)}


def _item(table: dict[str, tuple[bool, str]], key: str, lang: str, found: str | None,
          expected: str, **params: Any) -> dict[str, Any]:
    """One answer: ``key`` picks its verdict and hint in ``table``."""
    ok, template = table[key]
    return {"ok": ok, "found": None if key in _FAILURES else found, "expected": expected,
            "hint": translate(lang, template, **params)}


def _domain_name(value: str) -> str:
    name = value.strip().lower().rstrip(".")
    try:
        labels = dns.name.from_text(name).labels
    except dns.exception.DNSException:
        labels = ()
    if len(labels) < 3 or "*" in name or "@" in name or any(c.isspace() for c in name):
        raise InvalidInput(N_("{value} is not a domain name: write the part of the sender "
                              "address after the @, e.g. clg-moulin.ac-lyon.fr."),
                           field="domain", value=value)
    return name


def organisational_domain(name: str) -> str:
    """The registered domain ``name`` belongs to: its last two labels, three under a
    shared suffix (see the module's docstring)."""
    labels = name.lower().rstrip(".").split(".")
    size = 3 if ".".join(labels[-2:]) in SHARED_SUFFIXES else 2
    return ".".join(labels[-size:])


# --------------------------------------------------------------------------- DNS
@dataclass(frozen=True)
class _Answer:
    status: str  # "ok", "nxdomain", "nodata", "error" or "budget" (this check asked enough)
    values: tuple[str, ...] = ()
    where: str = ""  # for DMARC: the domain whose _dmarc name holds the values


def _resolver(servers: Sequence[tuple[str, int]] | None,
              timeout: float) -> dns.asyncresolver.Resolver | None:
    try:
        resolver = dns.asyncresolver.Resolver(configure=not servers)
    except dns.exception.DNSException:  # no /etc/resolv.conf, or no server in it
        return None
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                for host, port in servers]
    # A 2048-bit DKIM record does not fit in 512 bytes: EDNS avoids a retry over TCP.
    resolver.use_edns(0, 0, 1232)
    resolver.lifetime = timeout
    resolver.timeout = min(resolver.timeout, timeout)
    resolver.cache = None
    return resolver


_STATUSES = ((dns.resolver.NXDOMAIN, "nxdomain"), (dns.resolver.NoAnswer, "nodata"),
             (dns.exception.DNSException, "error"))  # timeouts, SERVFAIL, no server...


@dataclass
class _Dns:
    """Queries with a budget, a common deadline and a cache shared by the three checks."""

    resolver: dns.asyncresolver.Resolver | None
    timeout: float
    left: int  # queries this check may still make
    deadline: float
    cache: dict[tuple[str, str], _Answer] = field(default_factory=dict)

    def share(self, budget: int) -> _Dns:
        """The same resolver, deadline and cache with a budget of its own, so one check
        cannot leave another without queries."""
        return _Dns(self.resolver, self.timeout, budget, self.deadline, self.cache)

    async def query(self, name: str, rdtype: str) -> _Answer:
        key = (name.lower().rstrip("."), rdtype)
        if key in self.cache:
            return self.cache[key]
        remaining = self.deadline - time.monotonic()
        if self.resolver is None or remaining <= 0:
            return _Answer("error")
        if self.left <= 0:
            return _Answer("budget")
        self.left -= 1
        try:
            answer = await self.resolver.resolve(key[0] + ".", rdtype, search=False,
                                                 lifetime=min(self.timeout, remaining))
        except dns.exception.DNSException as exc:
            result = _Answer(next(s for kind, s in _STATUSES if isinstance(exc, kind)))
        else:
            result = _Answer("ok", tuple(_rdata_text(r) for r in answer))
        self.cache[key] = result
        return result


def _rdata_text(rdata: Any) -> str:
    if hasattr(rdata, "strings"):  # TXT: one record may be split into several strings
        return b"".join(rdata.strings).decode("utf-8", "replace")
    return str(rdata.exchange.to_text(omit_final_dot=True) if hasattr(rdata, "exchange")
               else rdata.to_text())


# --------------------------------------------------------------------------- SPF
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_LOOKUP_TERMS = {"include", "a", "mx", "ptr", "exists", "redirect"}
_MECHANISM = re.compile(r"([+?~-]?)(all|include|a|mx|ptr|ip4|ip6|exists)"
                        r"(?::([^/]+))?(?:/(\d+))?(?://(\d+))?", re.IGNORECASE)
_MODIFIER = re.compile(r"([a-z][a-z0-9_.-]*)=(.*)", re.IGNORECASE)


@dataclass(frozen=True)
class _Term:
    qualifier: str
    name: str  # mechanism, or "redirect"
    value: str  # the domain or address after ":" or "=", "" when none
    prefix4: int | None = None
    prefix6: int | None = None


class _SpfError(Exception):
    """The policy cannot give a result: ``kind`` is a key of the SPF hints."""

    def __init__(self, kind: str, **params: Any) -> None:
        super().__init__(kind)
        self.kind, self.params = kind, params


def _spf_records(answer: _Answer) -> list[str]:
    return [v for v in answer.values if re.match(r"v=spf1(\s|$)", v, re.IGNORECASE)]


def _parse_spf(record: str) -> list[_Term]:
    terms: list[_Term] = []
    for word in record.split()[1:]:
        modifier = _MODIFIER.fullmatch(word)
        mechanism = _MECHANISM.fullmatch(word)
        if mechanism:
            qualifier, name, value, p4, p6 = mechanism.groups()
            name = name.lower()
            if name in ("ip4", "ip6") and not value:
                raise _SpfError("syntax", term=word)
            terms.append(_Term(qualifier or "+", name, value or "",
                               int(p4) if p4 else None, int(p6) if p6 else None))
        elif modifier and modifier.group(1).lower() == "redirect":
            terms.append(_Term("+", "redirect", modifier.group(2)))
        elif not modifier:  # other modifiers (exp=...) do not change the result
            raise _SpfError("syntax", term=word)
    return terms


@dataclass
class _SpfPolicy:
    """One walk of a domain's SPF policy for the relay's addresses: the result for each
    address, the include names reached and the final ``all``."""

    dns: _Dns
    lookups: int = 0
    reached: set[str] = field(default_factory=set)
    final_all: str | None = None

    def _count(self) -> None:
        self.lookups += 1
        if self.lookups > SPF_LOOKUP_LIMIT:
            raise _SpfError("lookups")

    async def _answer(self, name: str, rdtype: str) -> _Answer:
        answer = await self.dns.query(name, rdtype)
        if answer.status == "error":
            raise _SpfError("dns", name=name)
        if answer.status == "budget":
            raise _SpfError("budget")
        return answer

    async def evaluate(self, domain: str, ips: list[IP], main: bool) -> dict[IP, str]:
        """``main``: the checked domain or its redirect, whose ``all`` ends the policy."""
        records = _spf_records(await self._answer(domain, "TXT"))
        if len(records) != 1:
            raise _SpfError("no_target", target=domain)
        results: dict[IP, str] = {}
        redirect: _Term | None = None
        for term in _parse_spf(records[0]):
            if term.name in _LOOKUP_TERMS:
                self._count()
            if term.name == "redirect":
                redirect = term
                continue
            if term.name == "all":
                # A receiver reads nothing after all, not even redirect=.
                self.final_all = term.qualifier if main else self.final_all
                return {ip: results.get(ip, _QUALIFIERS[term.qualifier]) for ip in ips}
            undecided = [ip for ip in ips if ip not in results]
            for ip in await self._matching(term, domain, undecided):
                results[ip] = _QUALIFIERS[term.qualifier]
        if redirect is not None and "%" not in redirect.value:
            self.reached.add(redirect.value.lower())
            rest = [ip for ip in ips if ip not in results]
            results.update(await self.evaluate(redirect.value, rest, main))
        return {ip: results.get(ip, "neutral") for ip in ips}

    async def _matching(self, term: _Term, domain: str, ips: list[IP]) -> list[IP]:
        if term.name in ("ip4", "ip6"):
            try:
                network = ipaddress.ip_network(
                    f"{term.value}/{term.prefix4}" if term.prefix4 is not None else term.value,
                    strict=False)
            except ValueError:
                raise _SpfError("syntax", term=f"{term.name}:{term.value}") from None
            return [ip for ip in ips if ip in network]
        target = term.value or domain
        if "%" in target:  # a macro: depends on each message, not knowable here
            return []
        if term.name == "include":
            self.reached.add(target.lower())
            included = await self.evaluate(target, ips, main=False)
            return [ip for ip, result in included.items() if result == "pass"]
        if not ips or term.name == "ptr":
            return []
        if term.name == "exists":
            return ips if (await self._answer(target, "A")).values else []
        hosts = [target]
        if term.name == "mx":
            hosts = list((await self._answer(target, "MX")).values)
            if len(hosts) > SPF_LOOKUP_LIMIT:
                raise _SpfError("lookups")
        return await self._in_hosts(hosts, term, ips)

    async def _in_hosts(self, hosts: list[str], term: _Term, ips: list[IP]) -> list[IP]:
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for host in hosts:
            for rdtype, version, prefix in (("A", 4, term.prefix4), ("AAAA", 6, term.prefix6)):
                if any(ip.version == version for ip in ips):
                    for address in (await self._answer(host, rdtype)).values:
                        width = prefix if prefix is not None else (32 if version == 4 else 128)
                        networks.append(ipaddress.ip_network(f"{address}/{width}",
                                                             strict=False))
        return [ip for ip in ips if any(ip in n for n in networks)]


@dataclass(frozen=True)
class _Relay:
    kind: str  # "provider", "local", "addresses", "unknown" (not in the DNS) or "error"
    fragment: str = ""  # the SPF term(s) authorising it
    ips: tuple[IP, ...] = ()


async def _find_relay(dns_: _Dns, host: str) -> _Relay:
    if host in PROVIDER_INCLUDES:
        return _Relay("provider", f"include:{PROVIDER_INCLUDES[host]}")
    try:
        ips: list[IP] = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        answers = await asyncio.gather(dns_.query(host, "A"), dns_.query(host, "AAAA"))
        if any(a.status in ("error", "budget") for a in answers):
            return _Relay("error")
        ips = [ipaddress.ip_address(v) for a in answers for v in a.values]
    if not ips:
        return _Relay("unknown")
    if all(any(ip in n for n in _LOCAL_NETWORKS) for ip in ips):
        return _Relay("local", "", tuple(ips))
    return _Relay("addresses", " ".join(f"ip{ip.version}:{ip}" for ip in ips), tuple(ips))


async def _spf_verdict(dns_: _Dns, domain: str, relay_host: str | None,
                       relay: _Relay) -> tuple[str, dict[str, Any]]:
    """The key of the SPF hint that applies, and its parameters."""
    answer = await dns_.query(domain, "TXT")
    records = _spf_records(answer)
    if answer.status in ("error", "budget", "nxdomain"):
        return ("nxdomain", {}) if answer.status == "nxdomain" else ("dns", {"name": domain})
    if relay_host is None:
        return "no_relay", {}
    if relay.kind in ("error", "unknown"):
        return ("dns", {"name": relay_host}) if relay.kind == "error" else ("relay_unknown", {})
    if not records:
        return ("missing_local" if relay.kind == "local" else "missing"), {}
    if len(records) > 1:
        return "several", {"count": len(records)}
    policy = _SpfPolicy(dns_)
    try:
        # A provider's or a local relay's own addresses are not the ones receivers see.
        ips = list(relay.ips) if relay.kind == "addresses" else []
        results = await policy.evaluate(domain, ips, main=True)
    except _SpfError as exc:
        return exc.kind, exc.params
    authorised = {"provider": relay.fragment.partition(":")[2] in policy.reached,
                  "local": True}.get(relay.kind, all(r == "pass" for r in results.values()))
    if not authorised:
        return "not_authorised", {}
    if policy.final_all in ("+", "?"):
        return "open", {"all": f"{policy.final_all}all"}
    return ("local" if relay.kind == "local" else "ok"), {}


async def _check_spf(dns_: _Dns, domain: str, relay_host: str | None,
                     lang: str) -> dict[str, Any]:
    relay = await _find_relay(dns_, relay_host) if relay_host else _Relay("unknown")
    key, params = await _spf_verdict(dns_, domain, relay_host, relay)
    records = _spf_records(dns_.cache.get((domain, "TXT"), _Answer("error")))
    found = "\n".join(records) or None
    expected = relay.fragment
    if key == "missing" or (key == "nxdomain" and expected):
        expected = f"v=spf1 {expected} ~all"
    elif key == "open":
        # The record with its end corrected, or just the end when a redirect holds it.
        fixed = re.sub(r"(^|\s)[+?]?all(\s|$)", r"\1~all\2", found or "", flags=re.IGNORECASE)
        expected = fixed if fixed != found else "~all"
    return _item(_SPF_HINTS, key, lang, found, expected,
                 **{"domain": domain, "relay": relay_host, **params})


# --------------------------------------------------------------------------- DKIM
def _tags(record: str) -> dict[str, str]:
    """``k=v; k=v`` tags (DKIM, DMARC), keys in lower case."""
    pairs = (part.partition("=") for part in record.split(";"))
    return {k.strip().lower(): v.strip() for k, sep, v in pairs if sep}


def _bare_key(value: str) -> str:
    # Quotes and spaces come from records pasted in split form into a DNS host's form.
    return re.sub(r'[\s"]', "", value)


async def _check_dkim(dns_: _Dns, domain: str, dkim: DkimKey | None,
                      lang: str) -> dict[str, Any]:
    if dkim is None:
        return _item(_DKIM_HINTS, "no_key", lang, None, "", domain=domain)
    name = f"{dkim.selector}._domainkey.{domain}"
    answer = await dns_.query(name, "TXT")
    records = [v for v in answer.values if "p" in _tags(_bare_key(v))]
    found = "\n".join(records) or None
    if answer.status in ("error", "budget"):
        key = "dns"
    elif not records:
        key = "missing"
    elif len(records) > 1:
        key = "several"
    else:
        published = _bare_key(_tags(_bare_key(records[0]))["p"])
        key = "ok" if published == _bare_key(dkim.public_key) else "different"
    return _item(_DKIM_HINTS, key, lang, found, dkim.record, name=name, count=len(records))


# --------------------------------------------------------------------------- DMARC
async def _find_dmarc(dns_: _Dns, domain: str) -> _Answer:
    """The records at ``_dmarc.<domain>``, else at its parents down to the organisational
    domain (where a school's academy usually publishes the policy); ``where`` says which."""
    labels = domain.split(".")
    depth = len(organisational_domain(domain).split("."))
    candidates = [".".join(labels[start:]) for start in range(len(labels) - depth + 1)]
    # A long name skips to its organisational domain rather than exceed the query budget.
    for where in candidates if len(candidates) <= 4 else [*candidates[:3], candidates[-1]]:
        answer = await dns_.query(f"_dmarc.{where}", "TXT")
        records = tuple(v for v in answer.values
                        if re.match(r"v\s*=\s*DMARC1\s*(;|$)", v, re.IGNORECASE))
        if answer.status in ("error", "budget") or records:
            return _Answer(answer.status, records, where)
    return _Answer("nodata")


def _default_dmarc(domain: str) -> str:
    return f"v=DMARC1; p=none; rua=mailto:dmarc@{domain}"


def _dmarc_item(domain: str, spf_domain: str, dkim: DkimKey | None, found: _Answer,
                spf_ok: bool, dkim_ok: bool, lang: str) -> dict[str, Any]:
    name = f"_dmarc.{found.where or domain}"
    if found.status != "ok":
        key = "missing" if found.status == "nodata" else "dns"
        return _item(_DMARC_HINTS, key, lang, None, _default_dmarc(domain), domain=domain,
                     name=name)
    record = found.values[0]
    tags = _tags(record)
    # A parent's policy applies to its subdomains through sp= when it has one.
    policy = (tags.get("sp") if found.where != domain else None) or tags.get("p", "")
    spf_aligned = organisational_domain(spf_domain) == organisational_domain(domain)
    if len(found.values) > 1:
        key = "several"
    elif policy.lower() not in ("none", "quarantine", "reject"):
        key = "invalid"
    elif not spf_aligned and dkim is None:
        key = "unaligned"
    elif not ((spf_aligned and spf_ok) or (dkim is not None and dkim_ok)):
        key = "failing"
    else:
        key = "monitor" if policy.lower() == "none" else "ok"
    expected = record if key not in ("several", "invalid") else _default_dmarc(domain)
    item = _item(_DMARC_HINTS, key, lang, "\n".join(found.values), expected, domain=domain,
                 name=name, count=len(found.values), policy=policy.lower(), envelope=spf_domain)
    if found.where != domain:
        item["hint"] += " " + translate(lang, _INHERITED, where=name, domain=domain)
    return item
