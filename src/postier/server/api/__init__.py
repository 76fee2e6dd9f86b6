"""The HTTP JSON API (FastAPI). Routers only translate HTTP to the service layer."""

from postier.server.api.app import create_app

__all__ = ["create_app"]
