"""Operations: alerts and the webhook, retention, metrics and readiness, ``postier doctor``."""
