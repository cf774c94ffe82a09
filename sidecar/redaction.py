"""A structlog processor that masks secrets in every record, foreign (uvicorn, engine output) ones included."""

from __future__ import annotations

import functools
import re
import threading
from collections import Counter
from collections.abc import Iterable, MutableMapping
from typing import Any

MASK = "***"

# Shorter values are not masked inside free text: "1" or "true" would garble every line and hide nothing.
MIN_SECRET_LENGTH = 6

SENSITIVE_FIELDS = frozenset({"authorization", "x-api-key", "x_api_key", "api_key", "api_keys", "admin_keys", "token"})

# Token-shaped strings (Hugging Face, OpenAI-style) and the values of auth headers written as text.
_TOKEN_PATTERN = r"(?<![A-Za-z0-9])(?:hf_[A-Za-z0-9]{6,}|sk-[A-Za-z0-9_\-]{6,})"
# A URL's user and password (`https://user:pass@host`): the password, wherever a URL is written.
_URL_CREDENTIALS_PATTERN = r"(?<=://)[^\s/@:]+:[^\s/@]+(?=@)"
_HEADER_PATTERN = r"(?i:(?:(?<=authorization)|(?<=x-api-key))([\"']?\s*[:=]\s*[\"']?(?:bearer\s+)?)[^\s\"',;}]+)"


class Redactor:
    """Masks registered secrets, token-shaped strings, passwords in URLs and auth header values. Thread-safe."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._holders: Counter[str] = Counter()  # each secret's registrations not yet forgotten
        self._secrets: frozenset[str] = frozenset()
        self._pattern = self._compile(self._secrets)
        self.register(*secrets)

    def register(self, *secrets: str) -> None:
        """Mask these from now on, until each registration is undone by `forget`."""
        self._count(secrets, 1)

    def forget(self, *secrets: str) -> None:
        """Undo one registration of each. A value registered twice (a data key of the sidecar's that an engine's
        `env` holds too) stays masked until both are undone.

        For what lives as long as an engine: each start's own key would otherwise be kept forever, and every log
        line is searched for every secret kept (1,000 engines started: 130 µs an access line instead of 7)."""
        self._count(secrets, -1)

    def _count(self, secrets: Iterable[str], step: int) -> None:
        counted = [s for s in secrets if len(s) >= MIN_SECRET_LENGTH]
        if not counted:
            return
        with self._lock:
            for secret in counted:
                self._holders[secret] += step
                if self._holders[secret] <= 0:
                    del self._holders[secret]
            held = frozenset(self._holders)
            if held != self._secrets:
                self._secrets = held
                self._pattern = self._compile(held)

    @staticmethod
    def _compile(secrets: frozenset[str]) -> re.Pattern[str]:
        # Longest first, so a secret that contains another is masked whole.
        literal = "|".join(re.escape(s) for s in sorted(secrets, key=len, reverse=True))
        alternatives = [f"(?:{literal})"] if literal else []
        alternatives += [_TOKEN_PATTERN, _URL_CREDENTIALS_PATTERN, _HEADER_PATTERN]
        return re.compile("|".join(alternatives))

    def redact_text(self, text: str) -> str:
        return self._pattern.sub(_mask_match, text) if self._may_hold_secret(text) else text

    def _may_hold_secret(self, text: str) -> bool:
        """What the pattern could match, found by plain substring search: a fraction of the pattern's cost (its
        look-behinds are tried at every position), and most text holds none of it."""
        if "hf_" in text or "sk-" in text or ("://" in text and "@" in text):
            return True
        lower = text.lower()
        if "authorization" in lower or "x-api-key" in lower:
            return True
        return any(secret in text for secret in self._secrets)

    def redact(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, dict):
            return {k: MASK if _is_sensitive(k) else self.redact(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.redact(v) for v in value)
        return value

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if self._clean(event_dict):  # most records (every access line): one search instead of one per value
            return event_dict
        return {
            key: MASK if _is_sensitive(key) and value is not None else self.redact(value)
            for key, value in event_dict.items()
        }

    def _clean(self, event_dict: MutableMapping[str, Any]) -> bool:
        """Whether the record holds nothing to mask: no sensitive field set, and no secret in any of its text.

        The text is searched joined: a match in one value is a match in the whole (the reverse may be a false
        alarm, which only sends the record through the value-by-value walk)."""
        texts: list[str] = []
        if not _collect_text(event_dict, texts):
            return False
        return not self._may_hold_secret("\x00".join(texts))


_SCALARS = frozenset({int, float, bool, type(None)})


def _collect_text(value: Any, texts: list[str]) -> bool:
    """Gather the strings in `value` (dict keys included, however nested); False when it holds a sensitive
    field, or a value of another kind than text, numbers, dicts and lists (the walk takes those)."""
    kind = type(value)
    if kind is str:
        texts.append(value)
        return True
    if kind in _SCALARS:
        return True
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or _is_sensitive_name(key):
                return False
            texts.append(key)
            item_kind = type(item)  # text and numbers here, without a call each: most of an access line
            if item_kind is str:
                texts.append(item)
            elif item_kind not in _SCALARS and not _collect_text(item, texts):
                return False
        return True
    if kind is list or kind is tuple:
        return all(_collect_text(item, texts) for item in value)
    return False


def _is_sensitive(key: Any) -> bool:
    return isinstance(key, str) and _is_sensitive_name(key)


@functools.lru_cache(maxsize=4096)
def _is_sensitive_name(key: str) -> bool:
    # Records reuse a few field names: the answer is remembered rather than lower-cased every time.
    return key.lower() in SENSITIVE_FIELDS


def _mask_match(match: re.Match[str]) -> str:
    # For a header written as text, keep "Authorization: Bearer " and mask what follows.
    prefix = match.group(1) if match.lastindex else None
    return (prefix or "") + MASK
