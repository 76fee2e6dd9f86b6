"""Shared test infrastructure (fault-injecting SMTP relay, certificates, fixtures)."""
