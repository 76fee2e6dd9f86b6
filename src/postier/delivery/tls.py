"""The TLS context for a relay's connections and its OAuth2 token service.

The system's certificate authorities, plus ``POSTIER_CA_FILE`` when set (academic relays
often use an internal CA); certificate checks off only when the relay's settings say so.
"""

from __future__ import annotations

import os
import ssl

from postier.core.settings import RelaySettings


def tls_context(relay: RelaySettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    extra = os.environ.get("POSTIER_CA_FILE")
    if extra:
        # Academic relays often use an internal CA: trust it in addition to the system's.
        ctx.load_verify_locations(cafile=extra)
    if not relay.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
