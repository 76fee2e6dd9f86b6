"""The service layer: what every door calls (accounts, establishments, settings, sender
policy, message rendering, submission, queue operations, administration, DKIM, secrets)."""
