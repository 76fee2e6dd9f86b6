"""A workstation's side: the Python SDK client, its own settings file and its outbox."""
