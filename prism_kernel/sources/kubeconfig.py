"""A kubeconfig, read for what discovery needs: which CA to trust, which
name to verify, and who we are (client certificate, token or token file,
basic auth). Exec plugins and auth providers are refused: a node daemon
should not run them. The file is read within limits (bounded_yaml: depth,
values, no key twice; MAX_KUBECONFIG_BYTES): whatever it holds, the answer
is credentials or a KubeconfigError naming the file."""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism_kernel.bounded_yaml import FileError, read_yaml_file
from prism_kernel.errors import ConfigError

# kubeadm's and kubelet's kubeconfigs are a few KiB with the certificates
# inline; a CA bundle of a few hundred certificates still fits.
MAX_KUBECONFIG_BYTES = 1024 * 1024


class KubeconfigError(ConfigError):
    """The kubeconfig cannot be used (missing, invalid, unsupported auth)."""


@dataclass
class KubeCredentials:
    """What the watcher takes from a kubeconfig: trust, identity, TLS name."""

    path: str
    context: str
    server: str  # the kubeconfig's own server (informational: we override it)
    ca_pem: str | None = None  # None: the system trust store
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = None
    token: str | None = None
    token_file: str | None = None
    username: str | None = None
    password: str | None = None
    warnings: list[str] = field(default_factory=list)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca_pem) if self.ca_pem else ssl.create_default_context()
        if self.insecure_skip_tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert_pem is not None:
            assert self.client_key_pem is not None
            _load_cert_chain(ctx, self.client_cert_pem, self.client_key_pem)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def authorization(self) -> str | None:
        """The Authorization header value. A token file is read on each call
        (bound service-account tokens rotate); it wins over `token`, as in
        client-go, while it can be read."""
        if self.token_file:
            try:
                tok = Path(self.token_file).read_text().strip()
                if tok:
                    return f"Bearer {tok}"
            except OSError as e:
                if not self.token:
                    raise KubeconfigError(f"kubeconfig {self.path}: tokenFile {self.token_file}: "
                                          f"{e.strerror or e}") from None
        if self.token:
            return f"Bearer {self.token}"
        if self.username is not None and self.password is not None:
            raw = f"{self.username}:{self.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        return None

    @property
    def auth_kind(self) -> str:
        kinds = []
        if self.client_cert_pem is not None:
            kinds.append("client-certificate")
        if self.token_file:
            kinds.append("token-file")
        elif self.token:
            kinds.append("token")
        elif self.username is not None:
            kinds.append("basic")
        return "+".join(kinds) or "anonymous"


def _load_cert_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """load_cert_chain() only takes paths: hand it memory files (memfd), so
    key material from `client-key-data` never touches a disk."""
    fds: list[int] = []
    try:
        try:
            paths = []
            for data in (cert_pem, key_pem):
                fd = os.memfd_create("prism-kernel-kubeconfig", os.MFD_CLOEXEC)
                fds.append(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                paths.append(f"/proc/self/fd/{fd}")
            ctx.load_cert_chain(paths[0], paths[1])
            return
        except (AttributeError, FileNotFoundError):  # no memfd or no /proc: a private temp dir
            pass
    finally:
        for fd in fds:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="prism-kernel-") as d:
        cert, key = Path(d) / "tls.crt", Path(d) / "tls.key"
        for p, data in ((cert, cert_pem), (key, key_pem)):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(str(cert), str(key))


def _named(items: Any, name: str, what: str, path: str) -> dict:
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and item.get("name") == name:
            body = item.get(what)
            if not isinstance(body, dict):
                raise KubeconfigError(f"kubeconfig {path}: {what} {name!r} has no {what} section")
            return body
    raise KubeconfigError(f"kubeconfig {path}: no {what} named {name!r}")


def load_kubeconfig(path: str | os.PathLike, context: str | None = None) -> KubeCredentials:
    """Read a kubeconfig (YAML): the current context (or `context`), its
    cluster's CA and tls-server-name, its user's client certificate/key (file
    or -data), token/tokenFile or basic auth. Relative paths are relative to
    the kubeconfig's directory, as in kubectl. Exec plugins and auth providers
    are not supported (a node daemon should not run them)."""
    path = str(path)
    doc = _read_document(path)
    if not isinstance(doc, dict):
        raise KubeconfigError(f"kubeconfig {path}: not a kubeconfig (top level is not a mapping)")
    base = Path(path).resolve().parent
    name = context or doc.get("current-context")
    if not name:
        raise KubeconfigError(f"kubeconfig {path}: no current-context (and no context given)")
    ctx = _named(doc.get("contexts"), name, "context", path)
    cluster = _named(doc.get("clusters"), ctx.get("cluster"), "cluster", path)
    user_name = ctx.get("user")
    user = _named(doc.get("users"), user_name, "user", path) if user_name else {}

    def rel(p: str) -> Path:
        q = Path(os.path.expanduser(str(p)))
        return q if q.is_absolute() else base / q

    warnings: list[str] = []

    def data_or_file(section: dict, key: str, what: str) -> bytes | None:
        data, file = section.get(f"{key}-data"), section.get(key)
        if data and file:
            warnings.append(f"{key}-data and {key} are both set; {key}-data wins")
        if data:
            try:
                return base64.b64decode(str(data), validate=False)
            except ValueError as e:
                raise KubeconfigError(f"kubeconfig {path}: {key}-data is not base64: {e}") from None
        if file:
            try:
                return rel(file).read_bytes()
            except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
                raise KubeconfigError(f"kubeconfig {path}: {what} {str(rel(file))!r}: "
                                      f"{getattr(e, 'strerror', None) or e}") from None
        return None

    creds = KubeCredentials(path=path, context=name, server=str(cluster.get("server") or ""),
                            warnings=warnings)
    ca = data_or_file(cluster, "certificate-authority", "certificate authority")
    if ca is not None:
        creds.ca_pem = ca.decode("ascii", errors="replace")
    insecure = cluster.get("insecure-skip-tls-verify", False)
    if not isinstance(insecure, bool):
        raise KubeconfigError(f"kubeconfig {path}: insecure-skip-tls-verify must be true or false")
    creds.insecure_skip_tls_verify = insecure
    creds.tls_server_name = _text(cluster, "tls-server-name", path) or None
    if cluster.get("proxy-url"):
        warnings.append("proxy-url is ignored: discovery connects to the local endpoint directly")

    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported):
            raise KubeconfigError(
                f"kubeconfig {path}: user {user_name!r} authenticates with {unsupported!r}, which "
                "prism-kernel does not run; use a client certificate or a token (file)")
    cert = data_or_file(user, "client-certificate", "client certificate")
    key = data_or_file(user, "client-key", "client key")
    if (cert is None) != (key is None):
        raise KubeconfigError(f"kubeconfig {path}: user {user_name!r} has a client certificate "
                              "without a key, or a key without a certificate")
    creds.client_cert_pem, creds.client_key_pem = cert, key
    creds.token = _text(user, "token", path) or None
    if _text(user, "tokenFile", path):
        creds.token_file = str(rel(user["tokenFile"]))
    if user.get("username") is not None:
        creds.username = _text(user, "username", path)
        creds.password = _text(user, "password", path) or ""
    # Fail now on what would fail on every connection.
    try:
        creds.ssl_context()
    except (ssl.SSLError, ValueError, OSError) as e:
        raise KubeconfigError(f"kubeconfig {path}: the CA or the client certificate/key do not load: {e}") from None
    creds.authorization()
    return creds


def _read_document(path: str) -> dict:
    """The kubeconfig's top-level mapping, read within the limits."""
    try:
        doc = read_yaml_file(path, MAX_KUBECONFIG_BYTES)
    except FileError as e:
        raise KubeconfigError(f"kubeconfig {path}{e}") from None
    if not isinstance(doc, dict):
        raise KubeconfigError(f"kubeconfig {path}: not a kubeconfig (top level is not a mapping)")
    return doc


def _text(section: dict, key: str, path: str) -> str | None:
    value = section.get(key)
    if value is not None and not isinstance(value, str):
        raise KubeconfigError(f"kubeconfig {path}: {key} must be a string, not {type(value).__name__}")
    return value
