"""Fixtures shared by every test: real relays (support.fixtures) and a real server."""

pytest_plugins = ["support.fixtures", "support.server", "support.databases", "support.oauth"]
