"""A corpus of credential shapes for pushing through every command that could echo them.

Each SecretShape has the text as a user would hand it over (`text`), the parts that must never
appear in any output (`secrets`), and, for paths, what may be kept (`public`). Every secret part is
random per test session, so finding one in an output can only mean it leaked from this input.

Use `scan(secrets, texts_or_bytes...)` or `scan_tree(secrets, folder)` to look for them in every
byte of outputs and logs. Nothing here imports the project: annotate's tests can reuse it as is.
"""

from __future__ import annotations

import base64
import secrets as random
import string
from dataclasses import dataclass, field
from pathlib import Path


def _token(length: int = 24, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(random.choice(alphabet) for _ in range(length))


def _upper(length: int) -> str:
    return _token(length, string.ascii_uppercase + string.digits)


@dataclass(frozen=True)
class SecretShape:
    """One credential shape: how it is written and which parts of it are secret."""

    name: str
    text: str  # as it would appear in an option, argument, variable or log line
    secrets: tuple[str, ...]  # substrings that must be nowhere in any output
    #: For paths and URLs: the path minus its credentials (None: not a path).
    public: str | None = None
    #: An option dict that carries the secret (for --storage-options), or None.
    options: dict | None = field(default=None, compare=False)


def build_corpus() -> list[SecretShape]:
    """Fresh random secrets in every shape the redaction must recognise."""
    shapes: list[SecretShape] = []

    def add(name: str, text: str, *secret_parts: str, public: str | None = None,
            options: dict | None = None) -> None:
        shapes.append(SecretShape(name, text, tuple(secret_parts), public, options))

    # Azure SAS URL: sig is the secret; the other SAS fields belong to it and leave the path too.
    sig = base64.b64encode(random.token_bytes(32)).decode().replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    add("azure-sas-url",
        f"https://acct.blob.core.windows.net/images/face1.jpg?sv=2022-11-02&ss=b&srt=o&sp=r"
        f"&se=2030-01-01T00:00:00Z&st=2024-01-01T00:00:00Z&spr=https&sig={sig}",
        sig, public="https://acct.blob.core.windows.net/images/face1.jpg")
    # AWS SigV4 presigned URL (with temporary credentials).
    amz_sig, amz_key, amz_token = random.token_hex(32), "ASIA" + _upper(16), _token(60)
    add("aws-presigned-v4",
        f"https://bucket.s3.us-east-1.amazonaws.com/images/face2.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={amz_key}%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z"
        f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token={amz_token}"
        f"&X-Amz-Signature={amz_sig}",
        amz_sig, amz_key, amz_token, public="https://bucket.s3.us-east-1.amazonaws.com/images/face2.jpg")
    # AWS SigV2 presigned URL, keeping a harmless parameter of the user's own.
    v2_key, v2_sig = "AKIA" + _upper(16), _token(27) + "%3D"
    add("aws-presigned-v2",
        f"https://bucket.s3.amazonaws.com/face3.jpg?versionId=7&AWSAccessKeyId={v2_key}"
        f"&Expires=1893456000&Signature={v2_sig}",
        v2_key, v2_sig, public="https://bucket.s3.amazonaws.com/face3.jpg?versionId=7")
    # Google Cloud Storage signed URL, V2 (GoogleAccessId/Signature) and V4 (X-Goog-*).
    goog_sig = _token(40)
    add("gcs-signed-v2",
        f"https://storage.googleapis.com/bkt/face4.jpg?GoogleAccessId=svc-{_token(8)}%40proj.iam.gserviceaccount.com"
        f"&Expires=1893456000&Signature={goog_sig}",
        goog_sig, public="https://storage.googleapis.com/bkt/face4.jpg")
    goog4 = random.token_hex(64)
    add("gcs-signed-v4",
        f"https://storage.googleapis.com/bkt/face5.jpg?X-Goog-Algorithm=GOOG4-RSA-SHA256"
        f"&X-Goog-Credential=svc%40proj.iam.gserviceaccount.com%2F20240101%2Fauto%2Fstorage%2Fgoog4_request"
        f"&X-Goog-Date=20240101T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host&X-Goog-Signature={goog4}",
        goog4, public="https://storage.googleapis.com/bkt/face5.jpg")
    # https://user:token@host/... and an S3-compatible endpoint with user:password@.
    user, password = f"u{_token(6)}", _token(20)
    add("url-userinfo", f"https://{user}:{password}@files.example.com/images/face6.jpg",
        password, f"{user}:{password}", public="https://files.example.com/images/face6.jpg")
    git_token = "ghp_" + _token(36)
    add("url-token-only-userinfo", f"https://{git_token}@git.example.com/org/data/face7.jpg",
        git_token, public="https://git.example.com/org/data/face7.jpg")
    ep_password = _token(18)
    add("endpoint-url-userinfo", f"http://minio:{ep_password}@127.0.0.1:9/",
        ep_password, options={"client_kwargs": {"endpoint_url": f"http://minio:{ep_password}@127.0.0.1:9/"}})
    # A URL with a token in its query (OAuth style).
    query_token = _token(32)
    add("url-query-token", f"https://cdn.example.com/face8.jpg?w=640&access_token={query_token}",
        query_token, public="https://cdn.example.com/face8.jpg?w=640")
    # Azure storage connection string (AccountKey) and Service Bus style (SharedAccessKey).
    account_key = base64.b64encode(random.token_bytes(64)).decode()
    connection = (f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={account_key};"
                  "EndpointSuffix=core.windows.net")
    add("azure-connection-string", connection, account_key,
        options={"connection_string": connection, "account_name": "acct"})
    sas_field = _token(30)
    add("azure-sas-connection-string",
        f"BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=2022-11-02&ss=b&sig={sas_field}",
        sas_field)
    shared_key = base64.b64encode(random.token_bytes(32)).decode()
    add("servicebus-connection-string",
        f"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey={shared_key}",
        shared_key)
    # Database URL and ODBC/ADO connection string with Password=/Pwd=.
    db_password = _token(16)
    add("database-url", f"postgresql://app:{db_password}@db.internal:5432/faces", db_password)
    odbc_password = _token(16)
    add("odbc-connection-string",
        f"Driver={{ODBC Driver 18}};Server=tcp:db,1433;Uid=sa;Pwd={odbc_password};Encrypt=yes", odbc_password)
    # Authorization headers (Bearer and Basic) and an API-key header in storage options.
    bearer = _token(40)
    add("bearer-header", f"Authorization: Bearer {bearer}", bearer,
        options={"client_kwargs": {"headers": {"Authorization": f"Bearer {bearer}"}}})
    basic = base64.b64encode(f"user:{_token(12)}".encode()).decode()
    add("basic-header", f"Authorization: Basic {basic}", basic,
        options={"headers": {"authorization": f"Basic {basic}"}})
    api_key = _token(32)
    add("api-key-header", f"x-api-key: {api_key}", api_key,
        options={"client_kwargs": {"headers": {"x-api-key": api_key}}})
    # A private key (PEM), as in a service-account JSON.
    pem_body = "\n".join(_token(64, string.ascii_letters + string.digits + "+/") for _ in range(4))
    pem = f"-----BEGIN PRIVATE KEY-----\n{pem_body}\n-----END PRIVATE KEY-----\n"
    add("private-key-pem", pem, *pem_body.splitlines())
    rsa_body = _token(64, string.ascii_letters + string.digits + "+/")
    add("rsa-private-key-pem", f"-----BEGIN RSA PRIVATE KEY-----\n{rsa_body}\n-----END RSA PRIVATE KEY-----",
        rsa_body)
    # Well-known token formats, bare.
    aws_key_id = "AKIA" + _upper(16)
    add("aws-access-key-id", aws_key_id, aws_key_id)
    jwt = ("eyJhbGciOiJIUzI1NiJ9." + base64.urlsafe_b64encode(f'{{"sub":"{_token(10)}"}}'.encode()).decode().rstrip("=")
           + "." + _token(43, string.ascii_letters + string.digits + "-_"))
    add("jwt", jwt, jwt.split(".", 1)[1])
    slack = "xoxb-" + _token(12, string.digits) + "-" + _token(24)
    add("slack-token", slack, slack)
    google_api = "AIza" + _token(35, string.ascii_letters + string.digits + "_-")
    add("google-api-key", google_api, google_api)
    hf = "hf_" + _token(34)
    add("huggingface-token", hf, hf)
    return shapes


def scan(secret_parts: list[str] | tuple[str, ...], *outputs: str | bytes) -> list[str]:
    """The secret parts found in any of the outputs (text or bytes); [] when none leaked."""
    blobs = [o.encode() if isinstance(o, str) else bytes(o) for o in outputs]
    return [s for s in secret_parts if any(s.encode() in blob for blob in blobs)]


def scan_tree(secret_parts: list[str] | tuple[str, ...], *folders: Path | str) -> dict[str, list[str]]:
    """{file: secret parts found in its bytes} for every file under the folders; {} when none leaked."""
    leaks = {}
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and not path.is_symlink():
                found = scan(secret_parts, path.read_bytes())
                if found:
                    leaks[str(path)] = found
    return leaks


def all_secrets(shapes: list[SecretShape]) -> list[str]:
    """Every secret part of every shape, for one scan."""
    return [part for shape in shapes for part in shape.secrets]
