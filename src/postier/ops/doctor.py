"""``postier doctor``: is this installation healthy, and if not, what to do.

Every check reads; none repairs or changes anything (the store is not migrated, the key
file not created, no e-mail sent: the relay is only greeted, then told QUIT). Each result
is ``ok``, ``warn`` (works, but needs attention) or ``fail`` (something does not work or
will not), with a remedy, in the language of the person at the terminal. The exit status
follows the monitoring plugins' convention, so cron or a supervisor can act on it:
0 all is well, 1 a warning, 2 a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from postier.core.accounts import OPERATORS_ESTABLISHMENT
from postier.core.crypto import KEY_FILE, KeyError_, SecretBox
from postier.core.domains import all_holdings, overlaps
from postier.core.settings import DeliverySettings, RelaySettings
from postier.delivery.connection import open_smtp
from postier.errors import PostierError
from postier.i18n import N_, translate
from postier.ops.doctor_checks import (
    FAIL,
    OK,
    WARN,
    Check,
    decrypted,
    duration_text,
    encrypted_values,
    exit_status,
    greeting_date,
    process_alive,
    short_reason,
    size_text,
)
from postier.ops.doctor_dns import domain_checks
from postier.server.config import ServerConfig
from postier.store import create_store, database_url
from postier.store.base import Store

__all__ = ["Check", "Doctor", "diagnose", "exit_status", "greeting_date"]

GIB = 1024**3
DISK_WARN_BYTES = GIB
DISK_WARN_RATIO = 0.05
DISK_FAIL_BYTES = 100 * 1024**2
QUEUE_WARN_AGE = 3600.0  # an e-mail waiting longer than this needs a look
CLOCK_TOLERANCE = 120.0  # seconds of disagreement with the relay before we say so


class Doctor:
    """Runs the checks in order, each adding its results; later checks skip what an
    earlier one found missing (no store, no readable key)."""

    def __init__(self, config: ServerConfig, lang: str = "en", dns: bool = False) -> None:
        self.config = config
        self.lang = lang
        self.dns = dns  # check each sending domain's SPF, DKIM and DMARC (DNS queries)
        self.data_dir = Path(config.data_dir)
        self.checks: list[Check] = []
        self.store: Store | None = None
        self.box: SecretBox | None = None
        self.store_ok = False
        self.relay_clock: tuple[str, float, float] | None = None  # relay, its time, ours
        self._read_settings: list[tuple[int, str, bool, DeliverySettings | str]] | None = None

    def _(self, template: str, **params: Any) -> str:
        return translate(self.lang, template, **params)

    def add(self, key: str, label: str, level: str, result: str,
            remedy: str | None = None) -> None:
        self.checks.append(Check(key, label, level, result, remedy))

    async def run(self) -> list[Check]:
        self.check_configuration()
        self.check_data_dir()
        try:
            await self.check_store()
            self.check_key_file()
            await self.check_secrets()
            self.check_disk()
            await self.check_queue()
            await self.check_relays()
            await self.check_domains()
            if self.dns and self.store_ok and self.store is not None:
                self.checks.extend(await domain_checks(
                    self.store, await self._settings(), self.config.dns_servers, self.lang))
            await self.check_operators()
            await self.check_clock()
            self.check_server()
        finally:
            if self.store is not None:
                await self.store.close()
        return self.checks

    # -- configuration ---------------------------------------------------------------------
    def check_configuration(self) -> None:
        c, label = self.config, self._(N_("Configuration"))
        problems: list[tuple[str, str, str]] = []
        host = c.hostname.strip().lower()
        if "." not in host or host.startswith("localhost"):
            problems.append((WARN, self._(
                N_("POSTIER_HOSTNAME is {name!r}, not a full domain name: relays may refuse "
                   "this name when Postier introduces itself (EHLO)."), name=c.hostname),
                self._(N_("Set POSTIER_HOSTNAME to this machine's full DNS name, for example "
                          "postier.college-exemple.fr."))))
        for path in (c.tls_cert, c.tls_key):
            if path is not None and not Path(path).is_file():
                problems.append((FAIL, self._(
                    N_("The SMTP submission TLS file {path} does not exist."), path=str(path)),
                    self._(N_("Fix POSTIER_TLS_CERT and POSTIER_TLS_KEY, or remove them to use "
                              "a self-signed certificate."))))
        if c.metrics_token is not None and len(c.metrics_token) < 16:
            problems.append((WARN, self._(
                N_("POSTIER_METRICS_TOKEN is short ({n} characters): it can be guessed."),
                n=len(c.metrics_token)),
                self._(N_("Use a random token of at least 32 characters, for example from "
                          "openssl rand -hex 32."))))
        if not problems:
            self.add("configuration", label, OK, self._(
                N_("Valid: data in {path}, database {database}."),
                path=str(self.data_dir), database=self._database_name()))
        for level, result, remedy in problems:
            self.add("configuration", label, level, result, remedy)

    def _database_name(self) -> str:
        url = self.config.database_url
        if not url:
            return "SQLite"
        return "PostgreSQL" if url.startswith("postgres") else url.split(":", 1)[0]

    def _embedded(self) -> bool:
        return not self.config.database_url or self.config.database_url.startswith("sqlite")

    def check_data_dir(self) -> None:
        label, d = self._(N_("Data directory")), self.data_dir
        if not d.is_dir():
            self.add("data_dir", label, FAIL,
                     self._(N_("{path} does not exist."), path=str(d)),
                     self._(N_("Check --data-dir or POSTIER_DATA_DIR; the server creates the "
                               "directory when it first starts.")))
            return
        mode = stat.S_IMODE(d.stat().st_mode)
        if mode & 0o077:
            self.add("data_dir", label, WARN,
                     self._(N_("{path} can be read by other users of this machine (mode "
                               "{mode}): it holds pupils' and parents' e-mails."),
                            path=str(d), mode=f"{mode:03o}"),
                     self._(N_("Run: chmod 700 {path}"), path=str(d)))
            return
        self.add("data_dir", label, OK, self._(N_("{path}, private (mode {mode})."),
                                                path=str(d), mode=f"{mode:03o}"))

    # -- store -----------------------------------------------------------------------------
    async def check_store(self) -> None:
        label = self._(N_("Database"))
        db_file = self.data_dir / "postier.db"
        if self._embedded() and not self.config.database_url and not db_file.is_file():
            self.add("store", label, FAIL,
                     self._(N_("There is no database in {path}."), path=str(self.data_dir)),
                     self._(N_("Check --data-dir or POSTIER_DATA_DIR; the server creates the "
                               "database when it first starts.")))
            return
        url = database_url(self.data_dir, self.config.database_url)
        try:
            store = create_store(url)
        except (ValueError, ImportError) as exc:
            self.add("store", label, FAIL, str(exc),
                     self._(N_("Check --database-url or POSTIER_DATABASE_URL.")))
            return
        self.store = store
        try:
            current, head = await store.migration_status()
        except Exception as exc:
            self.add("store", label, FAIL,
                     self._(N_("The database cannot be read: {reason}."), reason=short_reason(exc)),
                     self._(N_("Check that the database server runs and that this account "
                               "may read it (--database-url).")))
            return
        if current != head:
            if current is None:
                result = self._(N_("The database is empty (never migrated)."))
            else:
                result = self._(N_("The database is at revision {current}; this Postier "
                                   "needs {head}."), current=current, head=head)
            self.add("migrations", label, FAIL, result,
                     self._(N_("Back the database up, then start postier serve once: it "
                               "migrates the database at start-up. A database migrated by "
                               "a newer Postier needs that version.")))
            return
        try:
            await asyncio.wait_for(store.probe_write_access(), 15)
        except Exception as exc:
            self.add("store", label, FAIL,
                     self._(N_("The database cannot be written: {reason}."),
                            reason=short_reason(exc)),
                     self._(N_("Check free disk space, the permissions of the database "
                               "files, and that no other program holds a lock on it.")))
            return
        self.store_ok = True
        self.add("store", label, OK, self._(
            N_("{database} reachable and writable; schema up to date (revision {head})."),
            database=self._database_name(), head=head))

    async def check_queue(self) -> None:
        if not self.store_ok or self.store is None:
            return
        queue, oldest = await self.store.waiting_now()
        waiting = sum(queue.values())
        label = self._(N_("Queue"))
        if oldest is not None and time.time() - oldest > QUEUE_WARN_AGE:
            self.add("queue", label, WARN, self._(
                N_("{count} e-mails are waiting; the oldest for {age}."),
                count=waiting, age=duration_text(time.time() - oldest, self.lang)),
                self._(N_("Look at their last error (postier web pages or GET "
                          "/api/v1/messages?status=deferred) and test the relay with "
                          "postier settings test.")))
        else:
            self.add("queue", label, OK, self._(N_("{count} e-mails waiting."), count=waiting))

    # -- secrets ---------------------------------------------------------------------------
    def _key_path(self) -> Path:
        return Path(os.environ.get("POSTIER_SECRET_KEY_FILE") or self.data_dir / KEY_FILE)

    def check_key_file(self) -> None:
        label = self._(N_("Secret key file"))
        if os.environ.get("POSTIER_SECRET_KEY"):
            self.add("key_file", label, OK, self._(N_("The key comes from POSTIER_SECRET_KEY.")))
            self._load_box(os.environ["POSTIER_SECRET_KEY"].encode())
            return
        path = self._key_path()
        if not path.exists():
            self.add("key_file", label, OK, self._(
                N_("{path} does not exist yet; the server creates it when it first starts."),
                path=str(path)))
            return
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            self.add("key_file", label, FAIL, self._(
                N_("{path} can be read by other users of this machine (mode {mode}): they "
                   "could decrypt the SMTP passwords."), path=str(path), mode=f"{mode:03o}"),
                self._(N_("Run: chmod 600 {path}"), path=str(path)))
        else:
            self.add("key_file", label, OK, self._(N_("{path}, mode {mode}."),
                                                    path=str(path), mode=f"{mode:03o}"))
        try:
            self._load_box(path.read_bytes().strip())
        except OSError as exc:
            self.add("key_file", label, FAIL,
                     self._(N_("{path} cannot be read: {reason}."), path=str(path),
                            reason=short_reason(exc)),
                     self._(N_("Run doctor as the account that runs the server.")))

    def _load_box(self, key: bytes) -> None:
        try:
            self.box = SecretBox(key)
        except KeyError_:
            self.box = None

    async def _stored_secrets(self) -> list[str]:
        """Every encrypted value stored: ``*_enc`` fields of the settings and profiles
        documents, ``*_enc`` columns (DKIM keys), and the key check value."""

        assert self.store is not None
        documents, values = await self.store.stored_secrets()
        return [v for doc in documents for v in encrypted_values(json.loads(doc))] + values

    def _decrypt(self, token: Any) -> str | None:
        if not isinstance(token, str) or self.box is None:
            return None
        try:
            return self.box.decrypt(token)
        except KeyError_:
            return None

    async def check_secrets(self) -> None:
        if not self.store_ok:
            return
        label = self._(N_("Stored secrets"))
        stored = await self._stored_secrets()
        if not stored:
            self.add("secrets", label, OK, self._(N_("No secret stored yet.")))
            return
        if self.box is None:
            self.add("secrets", label, FAIL, self._(
                N_("{count} secrets are stored but there is no usable key to read them."),
                count=len(stored)),
                self._(N_("Restore secret.key from your backup into the data directory, or "
                          "set POSTIER_SECRET_KEY to the key the data was encrypted with.")))
            return
        bad = 0
        for token in stored:
            try:
                self.box.decrypt(token)
            except KeyError_:
                bad += 1
        if bad:
            self.add("secrets", label, FAIL, self._(
                N_("{bad} of {count} stored secrets cannot be decrypted with this key."),
                bad=bad, count=len(stored)),
                self._(N_("Use the key the data was encrypted with: restore secret.key from "
                          "your backup, or check POSTIER_SECRET_KEY.")))
        else:
            self.add("secrets", label, OK, self._(
                N_("Every stored secret ({count}) decrypts with this key."), count=len(stored)))

    # -- disk ------------------------------------------------------------------------------
    def check_disk(self) -> None:
        label = self._(N_("Disk space"))
        if not self.data_dir.is_dir():
            return
        usage = shutil.disk_usage(self.data_dir)
        free, ratio = usage.free, usage.free / usage.total if usage.total else 0.0
        text = self._(N_("{free} free in {path} ({percent} of the disk)."),
                      free=size_text(free), path=str(self.data_dir), percent=f"{ratio:.0%}")
        remedy = self._(N_("Free some space or enlarge the disk: when it is full, Postier "
                           "refuses new e-mails (it never accepts and drops them)."))
        if free < DISK_FAIL_BYTES:
            self.add("disk", label, FAIL, text, remedy)
        elif free < DISK_WARN_BYTES or ratio < DISK_WARN_RATIO:
            self.add("disk", label, WARN, text, remedy)
        else:
            self.add("disk", label, OK, text)

    # -- relays ----------------------------------------------------------------------------
    async def _settings(self) -> list[tuple[int, str, bool, DeliverySettings | str]]:
        """Each establishment's settings, secrets decrypted (or why they cannot be read);
        read once for every check that needs them."""
        assert self.store is not None
        if self._read_settings is None:
            self._read_settings = []
            for est_id, slug, hosted, data in await self.store.settings_documents(
                    disabled=False):
                doc = decrypted(json.loads(data) if data else {}, self._decrypt)
                try:
                    settings: DeliverySettings | str = DeliverySettings.model_validate(doc)
                except ValidationError as exc:
                    settings = str(exc.errors()[0].get("msg", exc))
                self._read_settings.append((est_id, slug, hosted, settings))
        return self._read_settings

    async def check_relays(self) -> None:
        if not self.store_ok:
            return
        platform: RelaySettings | None = getattr(self.config, "platform_relay", None)
        for _id, slug, hosted, settings in await self._settings():
            label = self._(N_("SMTP relay ({establishment})"), establishment=slug)
            if isinstance(settings, str):
                self.add("relay", label, FAIL,
                         self._(N_("The stored settings are not valid: {reason}."),
                                reason=settings),
                         self._(N_("Correct them in Paramètres d'envoi des e-mails or with "
                                   "postier settings set.")))
                continue
            relay = platform if (hosted and platform is not None) else settings.relay
            if not settings.delegation and not hosted:
                self.add("relay", label, OK, self._(
                    N_("Central sending is off: the server sends nothing for it.")))
                continue
            if not getattr(relay, "configured", relay.host):
                self.add("relay", label, WARN, self._(
                    N_("No SMTP server is configured: accepted e-mails wait in the queue.")),
                    self._(N_("Enter the SMTP server in Paramètres d'envoi des e-mails, or "
                              "with postier settings set relay.host.")))
                continue
            await self._greet(label, relay)

    # -- domains of a hosted installation --------------------------------------------------
    async def check_domains(self) -> None:
        """Domains that more than one establishment holds (made before the rule, or by two
        saves at the same moment): each establishment's e-mails may then leave signed or
        sent for another's domain. Only said when the installation hosts several."""
        if not self.store_ok:
            return

        if self.store is None:
            return
        slugs = {e.id: e.slug for e in await self.store.list_establishments()}
        if len(slugs) < 2:
            return
        found = overlaps(all_holdings(await self.store.all_settings(),
                                      await self.store.all_dkim_domains()))
        label = self._(N_("Domains of the establishments"))
        if not found:
            self.add("domains", label, OK, self._(
                N_("Each domain belongs to one establishment.")))
            return
        lines = [f"{domain}: {', '.join(sorted(slugs.get(i, str(i)) for i in ids))}"
                 for domain, ids in sorted(found.items())]
        self.add("domains", label, WARN, self._(
            N_("Domains held by several establishments:\n{domains}"),
            domains="\n".join(lines)),
            self._(N_("Decide which establishment each domain belongs to, then give it to "
                      "that one: postier domains move DOMAIN --to ESTABLISHMENT.")))

    async def check_operators(self) -> None:
        """Operator accounts made in a school's establishment before they could live only
        in ``default``: that school's administrators would hold an account of every
        establishment. Only said when the installation has several."""
        if not self.store_ok:
            return

        if self.store is None:
            return
        count, misplaced = await self.store.misplaced_operators(OPERATORS_ESTABLISHMENT)
        if count < 2:
            return
        label = self._(N_("Operator accounts"))
        if not misplaced:
            self.add("operators", label, OK, self._(
                N_("Every operator account is in the installation's own establishment.")))
            return
        self.add("operators", label, WARN, self._(
            N_("Operator accounts in a school's establishment: {accounts}"),
            accounts=", ".join(f"{slug}:{name}" for slug, name in misplaced)),
            self._(N_("Create each operator again in the default establishment (postier "
                      "users add NAME --role operator), then disable these accounts.")))

    async def _greet(self, label: str, relay: RelaySettings) -> None:
        name = relay.describe()
        if str(getattr(relay, "kind", "smtp")) == "postier":
            await self._upstream(label, name, relay)
            return
        greeting: list[str] = []

        def on_step(step: str, ok: bool, _ms: int, detail: str) -> None:
            if ok and step in ("greeting", "tls") and not greeting:
                greeting.append(detail)

        t0 = time.perf_counter()
        try:
            smtp = await asyncio.wait_for(
                open_smtp(relay, local_hostname=self.config.hostname, on_step=on_step),
                3 * relay.timeout,
            )
        except TimeoutError:
            self.add("relay", label, FAIL,
                     self._(N_("{relay}: no answer within {seconds} s."),
                            relay=name, seconds=3 * relay.timeout),
                     self._(N_("Check the server name and port, and that this machine may "
                               "reach it (firewall).")))
            return
        except PostierError as exc:  # a DeliveryError, classified step by step
            self.add("relay", label, FAIL,
                     self._(N_("{relay}: {problem}"), relay=name, problem=exc.message(self.lang)),
                     exc.hint(self.lang))
            return
        ms = int((time.perf_counter() - t0) * 1000)
        now = time.time()
        try:
            await asyncio.wait_for(smtp.quit(), 5)
        except Exception:  # noqa: S110 - a relay that hangs up first is fine
            pass
        finally:
            smtp.close()
        said = (greeting[0] if greeting else "").strip()
        when = greeting_date(said)
        if when is not None:
            self.relay_clock = (name, when, now)
        steps = ["TLS" if relay.security.value != "none" else None,
                 self._(N_("authentication")) if relay.auth.value != "none" else None]
        done = ", ".join(s for s in steps if s)
        self.add("relay", label, OK, self._(
            N_("{relay} answers ({greeting}){steps} in {ms} ms; nothing was sent."),
            relay=name, greeting=said[:80], steps=f"; {done}" if done else "", ms=ms))

    async def _upstream(self, label: str, name: str, relay: RelaySettings) -> None:
        """Another Postier server this one hands its e-mails on to: it must answer."""
        url = str(getattr(relay, "url", "")).rstrip("/") + "/api/v1/health"
        try:
            async with httpx.AsyncClient(timeout=relay.timeout,
                                         verify=relay.verify_tls) as client:
                answer = await client.get(url)
            ok = answer.status_code == 200
            problem = f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            ok, problem = False, short_reason(exc) or type(exc).__name__
        if ok:
            self.add("relay", label, OK, self._(
                N_("{relay} answers; nothing was sent."), relay=name))
        else:
            self.add("relay", label, FAIL,
                     self._(N_("{relay}: {problem}"), relay=name, problem=problem),
                     self._(N_("Check the upstream Postier server's address and that it "
                               "runs.")))

    # -- clock -----------------------------------------------------------------------------
    async def check_clock(self) -> None:
        if not self.store_ok and self.relay_clock is None:
            return  # nothing to compare with
        label = self._(N_("Clock"))
        now = time.time()
        if self.relay_clock is not None:
            relay, theirs, ours = self.relay_clock
            skew = ours - theirs
            if abs(skew) > CLOCK_TOLERANCE:
                template = (
                    N_("This machine's clock is {delta} ahead of {relay}'s.") if skew > 0
                    else N_("This machine's clock is {delta} behind {relay}'s.")
                )
                self.add("clock", label, WARN, self._(
                    template, delta=duration_text(skew, self.lang), relay=relay),
                    self._(N_("Synchronise the clock (NTP: timedatectl set-ntp true, or "
                              "chrony): retries, retention and the e-mails' Date use it.")))
                return
        newest: float | None = None
        if self.store_ok and self.store is not None:
            newest = await self.store.newest_activity()
        if newest is not None and newest - now > CLOCK_TOLERANCE:
            self.add("clock", label, FAIL, self._(
                N_("The clock is {delta} behind the newest e-mail in the database: it was "
                   "set back."), delta=duration_text(newest - now, self.lang)),
                self._(N_("Set the clock right (NTP: timedatectl set-ntp true, or chrony): "
                          "retries, retention and the e-mails' Date use it.")))
            return
        if self.relay_clock is not None:
            self.add("clock", label, OK, self._(
                N_("Agrees with {relay}'s clock within {seconds} s."),
                relay=self.relay_clock[0], seconds=int(CLOCK_TOLERANCE)))
        else:
            self.add("clock", label, OK, self._(
                N_("Not behind the newest e-mail in the database.")))

    # -- the server ------------------------------------------------------------------------
    def check_server(self) -> None:
        if not self._embedded() or not self.data_dir.is_dir():
            return
        label = self._(N_("Server"))
        lock = self.data_dir / "serve.lock"
        pid = ""
        try:
            pid = lock.read_text().strip()
        except OSError:
            pass
        if pid.isdigit() and process_alive(int(pid)):
            self.add("server", label, OK, self._(
                N_("postier serve is delivering (process {pid})."), pid=pid))
            return
        self.add("server", label, WARN, self._(
            N_("No postier serve is delivering from this data directory: accepted e-mails "
               "wait.")),
            self._(N_("Start it (for example systemctl start postier, or postier serve "
                      "--data-dir {path})."), path=str(self.data_dir)))


async def diagnose(config: ServerConfig, lang: str = "en", dns: bool = False) -> list[Check]:
    return await Doctor(config, lang, dns).run()
