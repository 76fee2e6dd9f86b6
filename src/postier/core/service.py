"""The service layer: what every door (HTTP API, SMTP submission, CLI, web) calls.

It applies authentication, roles, validation, the sender policy and the queue, and writes
the audit log; a door only translates between its protocol and these methods, so policy
is decided in one place. :class:`Postier` is one installation
(:class:`~postier.core.installation.Installation`: store, secrets, settings) composed of
one part per concept, each in its own module:

- ``authentication``: tokens, passwords, sign-ins, sessions (:mod:`~postier.core.authentication`)
- ``user_accounts``: establishments, users and tokens made without a role check
- ``admin``: what administrators and operators do, audited (:mod:`~postier.core.administration`)
- ``domains``: who holds which domain; ``dkim``: the DKIM keys
- ``senders``: verified sender addresses (:mod:`~postier.core.sender_verification`)
- ``submission``: accepting e-mails; ``queue``: acting on queued ones
- ``notices``: the e-mails Postier itself writes
- ``bounces``: return addresses, the suppression list, what a bounce does

The methods the doors call on :class:`Postier` are those parts' own, bound once here (no
extra call on the submission path).
"""

from __future__ import annotations

from dataclasses import dataclass

from postier.core import first_run
from postier.core.administration import Administration
from postier.core.authentication import Authentication
from postier.core.bounces import Bounces
from postier.core.dkim_keys import DkimKeys
from postier.core.domains import Domains
from postier.core.installation import Installation
from postier.core.notices import Notices
from postier.core.queue_operations import QueueOperations
from postier.core.sender_decision import decide_sender
from postier.core.sender_verification import SenderAddresses
from postier.core.sign_in_throttle import SetupThrottle
from postier.core.submission import Submission
from postier.core.user_accounts import UserAccounts
from postier.server.config import ServerConfig
from postier.store.base import Store, User


@dataclass
class Preview:
    """The sender an account's e-mails would leave with, and why."""

    from_: str
    reply_to: list[str]
    envelope_from: str
    rule: str
    explanation: str


class Postier(Installation):
    """One installation: its store, its secrets, its settings; shared by all doors."""

    def __init__(
        self, config: ServerConfig, store: Store | None = None, store_role: str = "all"
    ) -> None:
        super().__init__(config, store, store_role)
        self.authentication = Authentication(self)
        self.user_accounts = UserAccounts(self)
        self.domains = Domains(self)
        self.dkim = DkimKeys(self, self.domains)
        self.notices = Notices(self)
        self.senders = SenderAddresses(self, self.domains, self.notices)
        self.admin = Administration(self, self.user_accounts, self.domains, self.senders,
                                    self.dkim)
        self.bounces = Bounces(self)
        self.submission = Submission(self, self.senders, self.bounces, self.notices)
        self.queue = QueueOperations(self)
        self.setup_throttle = SetupThrottle(self.store)

        # -- authentication
        self.authenticate_token = self.authentication.authenticate_token
        self.login_candidates = self.authentication.login_candidates
        self.check_password = self.authentication.check_password
        self.authenticate_password = self.authentication.authenticate_password
        self.sign_in = self.authentication.sign_in
        self.act_in = self.authentication.act_in
        self.session_user = self.authentication.session_user
        self.end_session = self.authentication.end_session
        # -- establishments, users and tokens (no role check: the console, tests)
        self.add_establishment = self.user_accounts.add_establishment
        self.add_user = self.user_accounts.add_user
        self.find_user = self.user_accounts.find_user
        self.create_token = self.user_accounts.create_token
        # -- DKIM
        self.dkim_keys = self.dkim.keys
        self.dkim_generate = self.dkim.generate
        self.dkim_remove = self.dkim.remove
        self.dkim_sign = self.dkim.sign
        # -- settings
        self.get_settings = self.admin.get_settings
        self.put_settings = self.admin.put_settings
        self.test_warnings = self.admin.test_warnings
        # -- submission and the queue
        self.submit = self.submission.submit
        self.submit_raw = self.submission.submit_raw
        self.get_message = self.queue.get_message
        self.list_messages = self.queue.list_messages
        self.retry = self.queue.retry
        self.cancel = self.queue.cancel
        self.retry_all = self.queue.retry_all
        self.resend = self.queue.resend
        # -- notices
        self.failure_notice = self.notices.failure_notice
        self.delay_notice = self.notices.delay_notice
        self.bounce_notice = self.notices.bounce_notice
        self.system_email = self.notices.system_email
        # -- bounces and the suppression list
        self.suppressions = self.bounces.suppressions
        self.suppress = self.bounces.suppress
        self.lift_suppression = self.bounces.lift

    decide_sender = staticmethod(decide_sender)

    async def preview(self, user: User, username: str | None, lang: str) -> Preview:
        """The sender ``username``'s e-mails (the caller's own by default) would leave
        with, and why."""
        target = user
        if username and username != user.username:
            target = await self.admin.target(user, username)
        settings = await self.delivery_settings(user.establishment_id)
        d = decide_sender(target, settings, verified=await self.senders.verified(target, settings))
        return Preview(d.formatted_from, list(d.reply_to), d.envelope_from, d.rule,
                       d.explain(lang))

    async def check_setup_token(self, token: str) -> first_run.Check:
        """What the setup page's one-time ``token`` opens now."""
        return await first_run.check(self.store, token)
