"""Postier: outgoing e-mail for school software."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The SDK is imported on first use so that `import postier` stays light.
    if name in ("Client", "send", "pull_profile", "SendResult"):
        from postier.workstation import client

        return getattr(client, name)
    if name in ("flush_outbox", "OutboxFlusher"):
        from postier.workstation import outbox

        return getattr(outbox, name)
    raise AttributeError(name)
