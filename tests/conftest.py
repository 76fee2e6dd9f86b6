"""Fixtures shared by every test: real relays, servers, databases, a token endpoint."""

import os

from hypothesis import settings

pytest_plugins = ["support.fixtures", "support.server", "support.databases", "support.oauth",
                  "support.dns_server", "support.dovecot"]

# The suite submits far faster than any school (2,000 e-mails in seconds from one account):
# the submission pace (pace.py) is lifted for it, except where a test sets its own limits.
for _limit in ("ACCOUNT_PER_MINUTE", "ACCOUNT_PER_DAY", "ESTABLISHMENT_PER_MINUTE",
               "ESTABLISHMENT_PER_DAY"):
    os.environ.setdefault(f"POSTIER_PACE_{_limit}", "1000000000")

# In CI the property tests are reproducible (same examples each run); on a developer's
# machine they keep exploring new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
