"""Postier: outgoing e-mail for school software."""

__version__ = "0.1.0"
