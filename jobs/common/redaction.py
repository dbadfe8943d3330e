"""Keep credentials out of everything the jobs print, log, store or show, by name and by shape.

The one redaction module: every output path (logs, error rows, Parquet metadata, run summaries,
training provenance, job entrypoints, `jobs status/logs`) goes through it. A value is a secret
when its name says so (keys containing KEY, SECRET, TOKEN, PASSWORD, ...) or when it looks like
one whatever it is called: URL userinfo (`user:pass@`), signatures and tokens in the query of
presigned or SAS URLs, connection-string fields (AccountKey=, SharedAccessSignature=,
Password=, ...), `Authorization` header values, private-key PEM blocks and well-known key formats
(AWS access key ids, JWTs, GitHub/Slack/Google API tokens, ...).

Masking replaces the secret, not the text around it, so that a masked line still says what
went wrong. No Ray import here: the CLI, the drivers and the workers all use it.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any, Callable
from urllib.parse import SplitResult, unquote_plus, urlsplit, urlunsplit

#: What a secret is replaced with.
MASK = "***"

#: Parts of a name (compared lower-case, without separators) that say its value is a credential.
SECRET_NAME_PARTS = ("key", "secret", "token", "password", "passwd", "session", "credential",
                     "signature", "authorization", "cookie", "connectionstring", "connstr",
                     "databaseurl", "dburl", "dsn", "privatekey", "googleaccessid")
#: Whole words of a name that say the same (too short to look for inside other words).
SECRET_NAME_WORDS = ("pwd", "pass", "sig", "sas", "auth", "jwt", "bearer")

# Query parameters that sign or authorise a URL: masked in text, dropped from stored paths.
_SIGNING_PARAMS = {
    # AWS SigV4 and SigV2 presigned URLs, and temporary credentials.
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid", "signature",
    # Google Cloud Storage signed URLs (V4 and V2).
    "x-goog-signature", "x-goog-credential", "googleaccessid",
    # Azure SAS.
    "sig",
    # OAuth tokens and API keys in the query. Not plain `key`: it often names an object, and
    # dropping it from a stored path would merge distinct images (a key-shaped value still goes).
    "token", "access_token", "id_token", "refresh_token", "api_key", "apikey",
    "password", "secret", "client_secret", "auth", "sas",
}
# Companions of a signature: harmless alone, but part of the presign, so they go with it. Azure
# SAS fields (sv, se, sp, ...) only count when a sig is present: `sp` or `st` alone mean anything.
_PRESIGN_COMPANIONS = {
    "x-amz-signature": ("x-amz-",),
    "x-goog-signature": ("x-goog-",),
    "signature": ("expires", "awsaccesskeyid", "googleaccessid", "x-amz-security-token"),
    "sig": ("sv", "ss", "srt", "sp", "se", "st", "spr", "sr", "si", "sip", "sdd", "ses",
            "skoid", "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid",
            "rscc", "rscd", "rsce", "rscl", "rsct"),
}

_SCHEME_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>\\`]+")
_PEM_BLOCK = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----.*?(?:-----END \1-----|\Z)", re.DOTALL)
_PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
# Connection-string fields (Azure, ODBC/ADO.NET, Service Bus): the value runs to the next ';'.
_CONNECTION_FIELD = re.compile(
    r"(?i)\b(AccountKey|SharedAccessSignature|SharedAccessKey|Password|Pwd|ClientSecret)"
    r"(\s*=\s*)(\{[^}]*\}|[^;\s\"']*)")
# HTTP headers whose whole value is a credential: as `Name: value` (a header line, JSON) the value
# runs to the end of the line or quote; as `Name=value` (keyword arguments, environment) to the
# next separator, so that the rest of a query string or command line survives.
_HEADER_NAMES = (r"(?i)\b((?:proxy-)?authorization|x-api-key|api-key|x-auth-token|x-amz-security-token|"
                 r"x-goog-api-key|ocp-apim-subscription-key|cookie|set-cookie)")
_AUTH_SCHEME = r"(?:(Bearer|Basic|Digest|Token|Negotiate|SharedKey|AWS4-HMAC-SHA256|GOOG4-HMAC-SHA256)\s+)?"
_CREDENTIAL_HEADER = re.compile(_HEADER_NAMES + r"([\"']?\s*:\s*[\"']?)" + _AUTH_SCHEME + r"([^\r\n\"']+)")
_CREDENTIAL_ASSIGN = re.compile(_HEADER_NAMES + r"(\s*=\s*[\"']?)" + _AUTH_SCHEME + r"([^\s&;,\"']+)")
_BEARER = re.compile(r"(?i)\b(Bearer)(\s+)[A-Za-z0-9._~+/-]{8,}=*")
# `name=value` anywhere (environment dumps, query strings without a URL, command lines).
_NAME_EQUALS = re.compile(r"(?<![\w.-])([A-Za-z_][\w.-]*)(=)(\"[^\"]*\"|'[^']*'|[^\s&;,\"'<>]+)")
# "name": "value" of JSON, YAML flow style and Python reprs.
_QUOTED_PAIR = re.compile(r"([\"'])([^\"'\n]{1,100})\1(\s*:\s*)([\"'])((?:\\.|(?!\4)[^\\\n])*)\4")
# Formats that are credentials wherever they appear.
_KEY_FORMATS = re.compile(
    r"\b(?:(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z0-9]{16}"  # AWS key ids
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|ya29\.[0-9A-Za-z_-]{20,}"  # Google OAuth access token
    r"|(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}"  # Stripe
    r"|sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI, Anthropic
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|npm_[A-Za-z0-9]{36}"  # npm
    # Ends at a word boundary, or after a final '-' that no other token character follows (a
    # Google key, a JWT or a GitLab token may end in '-', where \b before a space never holds).
    r")(?:\b|(?<=-)(?![0-9A-Za-z_-]))")


def _name_words(name: str) -> list[str]:
    # camelCase and separators both split words: AccountKey -> account key, x-api-key -> x api key.
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


#: Last words of a name that say its value describes a credential's kind, not the credential:
#: RAY_AUTH_MODE=disabled, TOKEN_TYPE=bearer, AUTH_METHOD=iam.
SETTING_NAME_ENDS = ("mode", "type", "method", "scheme", "enabled", "required", "version", "kind")


def is_secret_name(name: str) -> bool:
    """Whether a name (option key, variable, header, query parameter) says it holds a credential."""
    words = _name_words(str(name))
    if len(words) > 1 and words[-1] in SETTING_NAME_ENDS:
        return False
    joined = "".join(words)
    return any(part in joined for part in SECRET_NAME_PARTS) or any(w in SECRET_NAME_WORDS for w in words)


def _query_fields(query: str) -> list[tuple[str, str]]:
    # (raw field, its decoded name) per '&'-separated field, keeping the raw text as given.
    return [(field, unquote_plus(field.partition("=")[0]).strip().lower())
            for field in query.split("&")]


def _credential_names(names: list[str]) -> set[str]:
    """The query parameter names (lower-case) that carry or belong to a credential."""
    present = set(names)
    found = {n for n in present if n in _SIGNING_PARAMS}
    for signature, companions in _PRESIGN_COMPANIONS.items():
        if signature in present:
            found |= {n for n in present if n in companions or n.startswith(companions)}
    return found


def _netloc_without_userinfo(parts: SplitResult) -> str:
    return parts.netloc.rpartition("@")[2]


def _mask_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[' in the host: mask what the text rules can
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{_netloc_without_userinfo(parts)}"
    query = parts.query
    if query:
        fields = _query_fields(query)
        secret = _credential_names([name for _, name in fields])
        query = "&".join(f"{field.partition('=')[0]}={MASK}" if name in secret else field
                         for field, name in fields)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _mask_url_match(match: re.Match) -> str:
    # Punctuation that ends a sentence or a bracket is not part of the URL before it.
    url = match.group(0)
    trail = len(url) - len(url.rstrip(".,:;!?)]}"))
    return _mask_url(url[:len(url) - trail]) + url[len(url) - trail:]


def _mask_quoted_pair(match: re.Match) -> str:
    quote, name, colon, value_quote, value = match.groups()
    if not value or not is_secret_name(name):
        return match.group(0)
    return f"{quote}{name}{quote}{colon}{value_quote}{MASK}{value_quote}"


def _mask_name_equals(match: re.Match) -> str:
    name, equals, value = match.groups()
    unquoted = value.strip("\"'")
    if not unquoted or unquoted.startswith(MASK) or not is_secret_name(name):
        return match.group(0)
    return f"{name}{equals}{MASK}"


def _mask_header(match: re.Match) -> str:
    name, separator, scheme, _value = match.groups()
    return f"{name}{separator}{scheme + ' ' if scheme else ''}{MASK}"


def redact_text(text: str) -> str:
    """text (a log line, error message, command line, ...) with every credential-shaped part masked."""
    if not text:
        return text
    text = _PEM_BLOCK.sub(lambda m: f"-----BEGIN {m.group(1)}-----{MASK}-----END {m.group(1)}-----", text)
    text = _SCHEME_URL.sub(_mask_url_match, text)
    text = _CREDENTIAL_HEADER.sub(_mask_header, text)
    text = _CREDENTIAL_ASSIGN.sub(_mask_header, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _CONNECTION_FIELD.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _QUOTED_PAIR.sub(_mask_quoted_pair, text)
    text = _NAME_EQUALS.sub(_mask_name_equals, text)
    return _KEY_FORMATS.sub(MASK, text)


def redact(value: Any) -> Any:
    """A copy of options (nested dicts, lists, strings) with secrets masked by name and by shape."""
    if isinstance(value, dict):
        return {k: MASK if v is not None and is_secret_name(str(k)) else redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def public_path(path: str) -> str:
    """path as the user gave it minus credentials (userinfo, signing query parameters); deterministic."""
    if "://" not in path:  # storage.is_url's rule (storage imports this module)
        return path  # a local path: nothing to strip, and rewriting it would break resume
    try:
        parts = urlsplit(path)
    except ValueError:
        return redact_text(path)
    netloc = _netloc_without_userinfo(parts)
    query = parts.query
    if query:
        fields = _query_fields(query)
        secret = _credential_names([name for _, name in fields])
        query = "&".join(field for field, name in fields if name not in secret
                         and not _KEY_FORMATS.search(unquote_plus(field.partition("=")[2])))
    if (netloc, query) == (parts.netloc, parts.query):
        return path
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def looks_like_secret(name: str, value: str) -> bool:
    """Whether a setting is a credential, by its name or by the shape of its value."""
    return is_secret_name(name) or redact_text(value) != value


class StreamRedactor:
    """Masks a text that arrives in pieces (a streamed log): whole lines, private keys across lines."""

    #: Held back at most while waiting for the end of a private key; no real key is near this size.
    MAX_HELD = 1 << 20

    def __init__(self, mask: Callable[[str], str] = redact_text) -> None:
        self._mask, self._pending = mask, ""

    def feed(self, piece: str) -> str:
        """The masked text of the complete lines so far (may be empty)."""
        text = self._pending + piece
        done, newline, self._pending = text.rpartition("\n")
        ready = done + newline
        # A piece may end inside a PEM block: its remaining lines would carry no BEGIN marker.
        begins = list(_PEM_BEGIN.finditer(ready))
        if begins and "-----END " not in ready[begins[-1].end():] and len(text) < self.MAX_HELD:
            ready, self._pending = ready[:begins[-1].start()], ready[begins[-1].start():] + self._pending
        return self._mask(ready) if ready else ""

    def close(self) -> str:
        """The masked rest of the text, at its end."""
        rest, self._pending = self._pending, ""
        return self._mask(rest) if rest else ""


class RedactingFilter(logging.Filter):
    """A logging filter that masks credentials in every record's message, traceback and stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask the record in place; never drops it."""
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: mask its parts, logging reports it
            record.msg = redact_text(str(record.msg))
        else:
            record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


_installed_factory = None


def _masked_excepthook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, error, trace))))


def install_log_redaction() -> None:
    """Mask every log record this process creates (any logger, any handler) and uncaught tracebacks."""
    global _installed_factory
    sys.excepthook = _masked_excepthook
    if _installed_factory is not None and logging.getLogRecordFactory() is _installed_factory:
        return
    # A filter on a logger misses records propagated from its children, and handlers come and go
    # (Ray adds its own): masking where records are made covers them all.
    make_record, masking = logging.getLogRecordFactory(), RedactingFilter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        masking.filter(record)
        return record

    _installed_factory = factory
    logging.setLogRecordFactory(factory)
