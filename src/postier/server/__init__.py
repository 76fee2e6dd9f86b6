"""The server's processes and doors: configuration, ``postier serve`` and its supervisors,
SMTP submission, the HTTP API and the web interface."""
