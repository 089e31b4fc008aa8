"""Secrets in service URLs: masked wherever they could be written, read from the environment.

A storage or tracking URL may carry a password (``postgresql+psycopg://user:pw@host/db``).
:func:`mask` hides it in anything transferops writes or prints: logs, files under models/ and
reports/, MLflow params and tags, error messages. Better still, keep it out of params.yaml:
``${NAME}`` in a URL is replaced by the environment variable NAME when the URL is used
(:func:`expand_env`), never when it is stored, so files and Prefect parameters hold only the
placeholder.
"""

from __future__ import annotations

import logging
import os
import re

from transferops.errors import ConfigError

# Anchored on "://" after a scheme character, with no nested or overlapping quantifiers: each
# "://" starts one match attempt whose scans stop at the next "/", so the time is linear in the
# text (a scheme pattern in front made every letter a start: 200 KB took 43 s).
_PASSWORD = re.compile(r"(?<=[A-Za-z0-9+.\-])://(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_ENV = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}")
MASK = "***"


def mask(text: str) -> str:
    """`text` with the password of every ``scheme://user:password@`` replaced by ***."""
    return _PASSWORD.sub(
        lambda m: m[0] if _ENV.fullmatch(m["pw"]) else f"://{m['user']}:{MASK}@", text
    )


def has_password(text: str) -> bool:
    """Whether `text` holds a URL with a literal password (not a ``${NAME}`` placeholder)."""
    return any(not _ENV.fullmatch(m["pw"]) for m in _PASSWORD.finditer(text))


def expand_env(url: str, key: str) -> str:
    """`url` with each ``${NAME}`` replaced by the environment variable NAME (for config key
    `key`, named in the error when NAME is unset)."""

    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in os.environ:
            raise ConfigError(
                f"{key}: environment variable {name} (used as ${{{name}}}) is not set"
            )
        return os.environ[name]

    return _ENV.sub(sub, url)


class MaskFilter(logging.Filter):
    """A logging filter that masks URL passwords in every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if has_password(message):
            record.msg, record.args = mask(message), ()
        return True
