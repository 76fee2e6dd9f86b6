"""The package's public face: what ``import postier`` offers an application, and that a
type checker sees those names as what they are (not as ``object``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import postier
from postier import errors
from postier.workstation import client, sending

PUBLIC = [
    "AuthenticationRequired",
    "Client",
    "Conflict",
    "DelegationOff",
    "DeliveryError",
    "Forbidden",
    "InvalidAddress",
    "InvalidDomainPattern",
    "InvalidInput",
    "InvalidSetting",
    "MessageStatus",
    "NotFound",
    "OutboxFlusher",
    "PostierError",
    "Recipient",
    "SendResult",
    "SenderForbidden",
    "SenderNotConfigured",
    "ServerUnreachable",
    "StoreUnavailable",
    "Submission",
    "TooLarge",
    "__version__",
    "flush_outbox",
    "pull_profile",
    "send",
]


def test_the_public_names_are_exactly_these() -> None:
    assert postier.__all__ == PUBLIC, "postier.__all__ changed: a user-visible change"


def test_every_public_name_is_the_object_it_stands_for() -> None:
    namespace: dict[str, object] = {}
    exec(f"from postier import {', '.join(PUBLIC)}", namespace)
    assert all(namespace[name] is getattr(postier, name) for name in PUBLIC)
    assert postier.Client is client.Client and postier.SendResult is client.SendResult
    assert postier.ServerUnreachable is client.ServerUnreachable
    assert postier.send is sending.send and postier.pull_profile is sending.pull_profile
    assert postier.OutboxFlusher is sending.OutboxFlusher
    assert postier.flush_outbox is sending.flush_outbox
    tree = [n for n in PUBLIC if isinstance(getattr(postier, n), type)
            and issubclass(getattr(postier, n), errors.PostierError)]
    in_errors = sorted(n for n, v in vars(errors).items()
                       if isinstance(v, type) and issubclass(v, errors.PostierError))
    assert sorted(set(tree) - {"ServerUnreachable"}) == in_errors, \
        "the error tree of postier.errors and the public errors differ"
    assert all(getattr(postier, n) is getattr(errors, n) for n in in_errors)


# Right for a type checker only if the public names carry their types; the last line is
# wrong on purpose, and mypy can only say so if it knows what ``Client.url`` is.
SNIPPET = '''
import postier
from postier import Client, OutboxFlusher, PostierError, SendResult, send


def submitted(client: Client) -> str:
    return client.submit(["parent@example.org"], "Bonjour", "Texte").id


def sent() -> str:
    try:
        result: SendResult = send(["parent@example.org"], "Bonjour", "Texte")
    except PostierError as exc:
        return exc.code
    with OutboxFlusher(interval=30):
        return result.status


wrong: int = postier.Client("http://serveur-edt:8025", "token").url
'''

MYPY_CONFIG = """
[mypy]
strict = true
follow_imports = skip
[mypy-postier.*]
follow_imports = silent
"""


def test_a_type_checker_sees_the_public_names_typed(tmp_path: Path) -> None:
    (tmp_path / "snippet.py").write_text(SNIPPET)
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--no-incremental",
         "--cache-dir", str(tmp_path / "cache"), "snippet.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    found = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert len(found) == 1 and 'expression has type "str", variable has type "int"' \
        in found[0], "mypy does not see postier's names with their types:\n" + run.stdout
