"""Fixtures shared by every test: real relays, servers, databases, a token endpoint."""

import os

from hypothesis import settings

pytest_plugins = ["support.fixtures", "support.server", "support.databases", "support.oauth"]

# In CI the property tests are reproducible (same examples each run); on a developer's
# machine they keep exploring new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
