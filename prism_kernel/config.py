"""Configuration: a YAML file (`--config`) merged with flags (flags win),
validated by pydantic. Every problem is reported at once, each naming the
field (and its flag) and the reason; nothing touches the kernel before the
configuration is valid.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from prism_kernel.errors import ConfigError
from prism_kernel.sources.endpoints import EndpointSpec, parse_endpoint

DEFAULT_PORT = 7445
INSTANCE_PATTERN = r"^[a-z][a-z0-9-]{0,30}$"

_DURATION_RE = re.compile(r"^\s*(-?[0-9]*\.?[0-9]+)\s*(ms|s|m)?\s*$")


def _parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string with a unit: "500ms", "2s", "1m"."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use seconds, or 500ms, 2s, 1m)")
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration (use seconds, or 500ms, 2s, 1m)")
        number, unit = float(m.group(1)), m.group(2) or "s"
        return number * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]
    return value


Duration = Annotated[float, BeforeValidator(_parse_duration)]


def _readable_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} {path!r} does not exist")
    if not p.is_file():
        raise ValueError(f"{what} {path!r} is not a file")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{what} {path!r} is not readable")
    return str(p)


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["tcp", "tls", "readyz"] = Field(
        "readyz",
        description="tcp: connect only; tls: TLS handshake verified against the CA; "
        "readyz: TLS + GET /readyz, healthy only on 200.",
    )
    interval: Duration = Field(1.0, gt=0, le=3600, description="Seconds between probes of one backend.")
    timeout: Duration = Field(
        0.5, gt=0, le=60,
        description="Seconds one probe may take. A timeout is confirmed at once with a fresh TLS handshake: "
        "a frozen server fails it and is taken out (its connections aborted); a live but slow one passes "
        "and only counts as not ready.",
    )
    rise: int = Field(2, ge=1, le=100, description="Consecutive successes that bring a backend up.")
    fall: int = Field(2, ge=1, le=100, description="Consecutive failures that take a backend down.")
    jitter: float = Field(0.1, ge=0, le=0.5, description="Random spread of the interval, as a fraction.")
    confirm_timeout: Duration = Field(
        0.3, gt=0, le=10,
        description="A failure that looks fatal (the kernel saw a steered connect refused or its SYN lost, or a "
        "probe got no answer) is confirmed at once with a fresh connect and TLS handshake that may take this "
        "long (at least 4x the backend's latency); a failed confirmation takes the backend down without "
        "waiting for `fall`.",
    )
    ca_file: str | None = Field(None, description="PEM CA bundle that signs the API servers' certificates.")
    client_cert_file: str | None = Field(None, description="Client certificate (PEM), for API servers that deny anonymous /readyz.")
    client_key_file: str | None = Field(None, description="Key of the client certificate (PEM).")
    insecure_skip_verify: bool = Field(False, description="Do not verify the API server certificate (tls, readyz).")
    server_name: str | None = Field(
        None,
        description="TLS server name to verify (and send as SNI) instead of the endpoint's host, "
        "e.g. 'kubernetes' when the certificate has no IP SANs.",
    )

    @field_validator("ca_file")
    @classmethod
    def _ca_readable(cls, v: str | None) -> str | None:
        v = _readable_file(v, "CA file")
        if v is not None:
            try:
                ssl.create_default_context(cafile=v)
            except (ssl.SSLError, ValueError) as e:
                raise ValueError(f"CA file {v!r} holds no usable PEM certificate ({e})") from None
        return v

    @field_validator("server_name")
    @classmethod
    def _server_name_is_a_name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ipaddress.ip_address(v)
            return v
        except ValueError:
            pass
        if not re.fullmatch(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?", v):
            raise ValueError(f"{v!r} is neither a DNS name nor an IP address")
        return v

    @field_validator("client_cert_file")
    @classmethod
    def _cert_readable(cls, v: str | None) -> str | None:
        return _readable_file(v, "client certificate")

    @field_validator("client_key_file")
    @classmethod
    def _key_readable(cls, v: str | None) -> str | None:
        return _readable_file(v, "client key")

    @model_validator(mode="after")
    def _consistent(self) -> "ProbeConfig":
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file must be given together")
        if self.client_cert_file:
            try:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"client certificate and key do not load together ({e})") from None
        if self.timeout > self.interval * 10:
            raise ValueError(f"timeout {self.timeout}s is more than 10x the interval {self.interval}s")
        return self


class NftablesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stable_tcp_timestamps: bool = Field(
        True,
        description="While the nftables data path is installed, set net.ipv4.tcp_timestamps from 1 to 2 "
        "(one TCP timestamp clock for the host instead of one per connection). Without it, SNAT makes "
        "API servers drop reconnecting SYNs as PAWS failures and new connections stall for 1 s under "
        "churn. Cost: TCP peers of the host network namespace can read the host's millisecond clock. "
        "Restored by cleanup. An operator's 0 or 2 is left alone.",
    )


class EbpfConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loader: Literal["auto", "libbpf", "bcc"] = Field(
        "auto",
        description="How the eBPF programs are loaded. libbpf: the precompiled object shipped with the "
        "package (no compiler, kernel headers or bcc on the node). bcc: compile the source at run time "
        "(needs python3-bpfcc and kernel headers). auto: libbpf, and bcc when there is no object or "
        "libbpf's load fails. A current attached program is adopted at a restart, not reloaded (under auto "
        "whichever loader loaded it).",
    )


class MetricsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve /metrics (Prometheus), /healthz and /readyz over HTTP.")
    address: str = Field(
        "127.0.0.1",
        description="IP address of the metrics server; loopback by default, 0.0.0.0 or :: to expose it.",
    )
    port: int = Field(7450, ge=0, le=65535, description="TCP port of the metrics server (0: any free port).")
    heartbeat_timeout: Duration = Field(
        30.0, gt=0, le=3600, description="/healthz fails when the daemon loop has not turned for this long.",
    )

    @field_validator("address")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address (use 127.0.0.1, ::1, 0.0.0.0 or ::)") from None


_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class DiscoveryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        False,
        description="Add the API servers named by the EndpointSlices of Service `service` in `namespace`, "
        "watched through 127.0.0.1:PORT itself; static endpoints are always kept.",
    )
    kubeconfig: str = Field(
        "/etc/kubernetes/kubelet.conf",
        description="Kubeconfig with the cluster CA and credentials (client certificate, token or tokenFile); "
        "its server is replaced by https://127.0.0.1:PORT. Re-read for every connection.",
    )
    context: str | None = Field(None, description="Kubeconfig context; default its current-context.")
    namespace: str = Field("default", pattern=_DNS_LABEL, description="Namespace of the Service.")
    service: str = Field("kubernetes", pattern=_DNS_LABEL, description="Service whose EndpointSlices name the API servers.")
    cache_file: str | None = Field(
        None,
        description="Last discovered list, used at start when the API is unreachable; "
        "default /var/lib/<instance>/discovered-endpoints.json (survives reboots, unlike run_dir).",
    )
    tls_server_name: str | None = Field(
        None,
        description="Name to verify in the API server certificate; default the kubeconfig cluster's "
        "tls-server-name, else 127.0.0.1 (the certificate must name it).",
    )
    watch_timeout: Duration = Field(300.0, ge=10, le=3600, description="Seconds a watch lasts before it is renewed (randomized up to +25%).")

    @model_validator(mode="after")
    def _kubeconfig_usable(self) -> "DiscoveryConfig":
        # A kubeconfig that is not there yet (kubelet TLS bootstrap) is waited
        # for at run time; one that is there must be usable now.
        if self.enabled and Path(self.kubeconfig).exists():
            from prism_kernel.sources.discovery import KubeconfigError, load_kubeconfig

            try:
                load_kubeconfig(self.kubeconfig, self.context)
            except KubeconfigError as e:
                raise ValueError(e.problems[0]) from None
        return self


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[EndpointSpec] = Field(
        ..., description="API server endpoints: HOST:PORT, [IPv6]:PORT or NAME:PORT (DNS names are re-resolved)."
    )
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="Local port: clients connect to 127.0.0.1:PORT (and [::1]:PORT on eBPF).")
    datapath: Literal["auto", "ebpf", "nftables"] = Field(
        "auto", description="Kernel data path; auto keeps the one this instance already has in the kernel "
        "(a restart never switches), else picks eBPF when the kernel allows, else nftables."
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    nftables: NftablesConfig = Field(default_factory=NftablesConfig)
    ebpf: EbpfConfig = Field(default_factory=EbpfConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    resolve_interval: Duration = Field(30.0, gt=0, le=86400, description="Seconds between DNS re-resolutions of named endpoints.")
    cleanup_on_exit: bool = Field(False, description="Remove the data path when the daemon stops (tests, demos). Off: the node keeps API access while the daemon restarts.")
    instance: str = Field(
        "prism-kernel",
        pattern=INSTANCE_PATTERN,
        description="Names the daemon's kernel state, lock and run directory; only change it to run a second, independent instance.",
    )
    log_format: Literal["logfmt", "json"] = Field("logfmt", description="Format of the log lines on stderr.")
    run_dir: str | None = Field(None, description="State, lock and sysctl backup directory; default /run/<instance>.")

    @field_validator("endpoints", mode="before")
    @classmethod
    def _parse_endpoints(cls, v: Any) -> Any:
        if not isinstance(v, list):
            raise ValueError("must be a list of HOST:PORT strings")
        if not v:
            raise ValueError("no endpoints: give at least one HOST:PORT (--endpoint)")
        out = []
        for item in v:
            if isinstance(item, EndpointSpec):
                out.append(item)
            elif isinstance(item, str):
                out.append(parse_endpoint(item))
            else:
                raise ValueError(f"{item!r} is not a HOST:PORT string")
        if len(set(out)) != len(out):
            dups = sorted({str(e) for e in out if out.count(e) > 1})
            raise ValueError(f"duplicate endpoints: {', '.join(dups)}")
        return out

    @model_validator(mode="after")
    def _tls_needs_trust(self) -> "Config":
        p = self.probe
        if p.mode != "tcp" and p.ca_file is None and not p.insecure_skip_verify:
            # The system trust store almost never holds a cluster CA; say so now
            # rather than report every endpoint down for "certificate verify failed".
            raise ValueError(
                f"probe.mode {p.mode!r} (--probe) verifies the API server certificate: "
                "give probe.ca_file (--ca-file), or probe.insecure_skip_verify (--insecure-skip-verify), "
                "or use probe.mode tcp"
            )
        return self

    @model_validator(mode="after")
    def _heartbeat_outlasts_first_round(self) -> "Config":
        # The first probe round waits up to probe.timeout with no loop turn.
        if self.metrics.enabled and self.metrics.heartbeat_timeout <= self.probe.timeout + 1:
            raise ValueError(
                f"metrics.heartbeat_timeout {self.metrics.heartbeat_timeout}s must be more than "
                f"probe.timeout {self.probe.timeout}s + 1s"
            )
        return self

    @property
    def state_dir(self) -> Path:
        return Path(self.run_dir or f"/run/{self.instance}")

    @property
    def discovery_cache_file(self) -> Path:
        return Path(self.discovery.cache_file or f"/var/lib/{self.instance}/discovered-endpoints.json")


# Flag name for each field, so errors name what the operator typed.
FLAG_NAMES = {
    ("endpoints",): "--endpoint",
    ("port",): "--port",
    ("datapath",): "--datapath",
    ("ebpf", "loader"): "--ebpf-loader",
    ("probe", "mode"): "--probe",
    ("probe", "interval"): "--probe-interval",
    ("probe", "timeout"): "--probe-timeout",
    ("probe", "rise"): "--probe-rise",
    ("probe", "fall"): "--probe-fall",
    ("probe", "confirm_timeout"): "--confirm-timeout",
    ("probe", "ca_file"): "--ca-file",
    ("probe", "client_cert_file"): "--client-cert",
    ("probe", "client_key_file"): "--client-key",
    ("probe", "insecure_skip_verify"): "--insecure-skip-verify",
    ("probe", "server_name"): "--tls-server-name",
    ("cleanup_on_exit",): "--cleanup-on-exit",
    ("discovery", "enabled"): "--discovery",
    ("discovery", "kubeconfig"): "--kubeconfig",
    ("instance",): "--instance",
    ("log_format",): "--log-format",
    ("metrics", "enabled"): "--no-metrics",
    ("metrics", "address"): "--metrics-address",
    ("metrics", "port"): "--metrics-port",
}


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    field = ".".join(loc)
    flag = FLAG_NAMES.get(tuple(p for p in loc if not p.isdigit()))
    where = f"{field} ({flag})" if flag else field
    if not loc:  # a check across fields: its message names them
        return _strip_prefix(err["msg"])
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if err["type"] == "missing":
        return f"{where}: required" + (f", give {flag}" if flag else "")
    msg = _strip_prefix(err["msg"])
    got = err.get("input")
    if err["type"] not in ("value_error",) and not isinstance(got, (dict, list)) and got is not None:
        msg = f"{msg} (got {got!r})"
    return f"{where}: {msg}"


def _strip_prefix(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def load_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"config file {path!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: top level must be a mapping of keys, not {type(data).__name__}")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` (from flags; None means not given) into `base`."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, dict) and key in out:
            pass  # the file's value is not a mapping: keep it, validation names it
        elif isinstance(value, dict):
            given = {k: v for k, v in value.items() if v is not None}
            if given:
                out[key] = given
        else:
            out[key] = value
    return out


def build_config(file_data: dict[str, Any], flag_data: dict[str, Any]) -> Config:
    """Validate the merged configuration; ConfigError lists every problem."""
    try:
        return Config.model_validate(merge(file_data, flag_data))
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors()]) from None
