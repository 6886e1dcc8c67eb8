"""Configuration: a YAML file (`--config`) merged with flags (flags win),
validated by pydantic. Every problem is reported at once, each naming the
field (and its flag) and the reason; nothing touches the kernel before the
configuration is valid.

Types are strict: a YAML `true` is not the integer 1, `"7445"` is not a
number. Only durations take text ("500ms", "2s", "1m", "2"), and a flag's
text is converted to the field's type by the rule of that type
(typed_flags). The YAML document itself is bounded (size, depth, values,
no duplicate keys: load_yaml) before a single value reaches the models.

Longer than the usual module: the models carry the descriptions from which
docs/configuration.md is generated.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# The file's limits are bounded_yaml's; named here for the reference and the tests.
from prism_kernel.bounded_yaml import MAX_BYTES as MAX_CONFIG_BYTES
from prism_kernel.bounded_yaml import MAX_DEPTH as MAX_CONFIG_DEPTH  # noqa: F401
from prism_kernel.bounded_yaml import MAX_VALUES as MAX_CONFIG_VALUES  # noqa: F401
from prism_kernel.bounded_yaml import FileError, read_yaml_file
from prism_kernel.errors import ConfigError
from prism_kernel.sources.endpoints import (
    MAX_BACKENDS_PER_FAMILY,
    MAX_ENDPOINT_ENTRIES,
    EndpointSpec,
    parse_endpoint_list,
)

DEFAULT_PORT = 7445
INSTANCE_PATTERN = r"^[a-z][a-z0-9-]{0,30}$"

# A CA bundle or client certificate: Debian's whole trust store is ~200 KiB.
MAX_PEM_BYTES = 4 * 1024 * 1024

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

# Every model: unknown keys are errors, no lax conversions (bool is not int,
# text is not a number: Duration converts its text itself), no NaN/infinity.
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _readable_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ValueError(f"{what} {_short(path)} does not exist") from None
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, a loop of links
        raise ValueError(f"{what} {_short(path)}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {_short(path)} is not a file")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{what} {_short(path)} is not readable")
    if st.st_size > MAX_PEM_BYTES:
        raise ValueError(f"{what} {_short(path)} is larger than {MAX_PEM_BYTES // (1024 * 1024)} MiB: not a PEM file")
    return str(p)


def _exists(path: str) -> bool:
    """Path.exists() that answers for any text: a name too long or with a
    NUL byte does not exist (Path.exists() raises for those)."""
    try:
        os.stat(path)
        return True
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # there is something to report: the reader names it


class ProbeConfig(BaseModel):
    model_config = _STRICT

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
    model_config = _STRICT

    stable_tcp_timestamps: bool = Field(
        True,
        description="While the nftables data path is installed, set net.ipv4.tcp_timestamps from 1 to 2 "
        "(one TCP timestamp clock for the host instead of one per connection). Without it, SNAT makes "
        "API servers drop reconnecting SYNs as PAWS failures and new connections stall for 1 s under "
        "churn. Cost: TCP peers of the host network namespace can read the host's millisecond clock. "
        "Restored by cleanup. An operator's 0 or 2 is left alone.",
    )


class EbpfConfig(BaseModel):
    model_config = _STRICT

    loader: Literal["auto", "libbpf", "bcc"] = Field(
        "auto",
        description="How the eBPF programs are loaded. libbpf: the precompiled object shipped with the "
        "package (no compiler, kernel headers or bcc on the node). bcc: compile the source at run time "
        "(needs python3-bpfcc and kernel headers). auto: libbpf, and bcc when there is no object or "
        "libbpf's load fails. A current attached program is adopted at a restart, not reloaded (under auto "
        "whichever loader loaded it).",
    )


class MetricsConfig(BaseModel):
    model_config = _STRICT

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
    model_config = _STRICT

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
        if self.enabled and _exists(self.kubeconfig):
            from prism_kernel.sources.discovery import KubeconfigError, load_kubeconfig

            try:
                load_kubeconfig(self.kubeconfig, self.context)
            except KubeconfigError as e:
                raise ValueError(e.problems[0]) from None
            except Exception as e:  # noqa: BLE001 - e.g. a RecursionError from a hostile file's YAML:
                # whatever the reader fails with, the file is not usable, and
                # validation must end in a named problem, never a traceback.
                raise ValueError(f"kubeconfig {_short(self.kubeconfig)} cannot be read: "
                                 f"{type(e).__name__}: {_short(str(e), 200)}") from None
        return self


class Config(BaseModel):
    model_config = _STRICT

    endpoints: list[EndpointSpec] = Field(
        ..., description="API server endpoints: HOST:PORT, [IPv6]:PORT, NAME:PORT or https://HOST:PORT "
        "(DNS names are re-resolved). Normalised, duplicates rejected, at most "
        f"{MAX_BACKENDS_PER_FAMILY} addresses per family and {MAX_ENDPOINT_ENTRIES} entries: see Endpoints above."
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
    take_over_listen_address: bool = Field(
        False, description="Start even when a process already listens on 127.0.0.1:PORT or [::1]:PORT, "
        "and steer that address away from it (running instead of KubePrism). Off: `run` refuses "
        "(exit 2) naming the listener, and a reload to such a port is rejected.")
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
        return parse_endpoint_list(v)

    @model_validator(mode="after")
    def _steerable(self) -> "Config":
        """What the data path can be known to be unable to serve, from the
        literal addresses alone (names and discovery are known at run time)."""
        listen = {EndpointSpec("127.0.0.1", self.port), EndpointSpec("::1", self.port)}
        looped = [str(e) for e in self.endpoints if e in listen]
        if looped:
            raise ValueError(f"endpoints (--endpoint): {', '.join(looped)} is the listen address "
                             f"(port {self.port}) itself: connections would be steered back to it")
        if (self.datapath == "nftables" and not self.discovery.enabled
                and all(e.family == 6 for e in self.endpoints)):
            raise ValueError(
                "datapath 'nftables' (--datapath) steers IPv4 only, and every endpoint is an IPv6 address: "
                "nothing could be steered; give an IPv4 endpoint or a DNS name, or use datapath ebpf")
        m = self.metrics
        if m.enabled and m.port == self.port and m.address in ("127.0.0.1", "0.0.0.0", "::1", "::"):
            raise ValueError(f"metrics.port (--metrics-port) {m.port} is the listen port: connections to "
                             f"{m.address}:{m.port} would be steered away from the metrics server")
        return self

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
    def _discovered_backends_are_verified(self) -> "Config":
        # Whoever may write EndpointSlices could name any address; only a
        # probe that verifies the API server certificate keeps such an address
        # out of the set (docs/threat-model.md, "Discovery").
        p = self.probe
        if self.discovery.enabled and (p.mode == "tcp" or p.insecure_skip_verify):
            what = ("probe.mode 'tcp' (--probe) does not verify" if p.mode == "tcp"
                    else "probe.insecure_skip_verify (--insecure-skip-verify) turns off the check of")
            raise ValueError(
                f"discovery.enabled (--discovery) needs probes that verify the API server certificate, and "
                f"{what} the certificate: use probe.mode tls or readyz with probe.ca_file, or turn discovery off")
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
    ("take_over_listen_address",): "--take-over-listen-address",
    ("discovery", "enabled"): "--discovery",
    ("discovery", "kubeconfig"): "--kubeconfig",
    ("instance",): "--instance",
    ("log_format",): "--log-format",
    ("metrics", "enabled"): "--no-metrics",
    ("metrics", "address"): "--metrics-address",
    ("metrics", "port"): "--metrics-port",
}


def _short(value: Any, limit: int = 60) -> str:
    """repr() of a value an operator wrote, cut to a readable length (a
    64 KiB string, or an int too long for repr())."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# Strict type errors, said in the file's terms (a YAML `true`, not Python's True).
_EXPECTED = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list", "model_type": "a mapping of keys",
    "dict_type": "a mapping of keys",
}


def _as_written(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    if isinstance(value, int):
        return _short(value) if value.bit_length() > 64 else f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    return f"{type(value).__name__} {_short(value)}"


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    field = ".".join(loc)
    flag = FLAG_NAMES.get(tuple(p for p in loc if not p.isdigit()))
    where = f"{field} ({flag})" if flag else field
    if not loc:  # a check across fields: its message names them
        return _strip_prefix(err["msg"])
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if err["type"] == "invalid_key":
        return f"key {_short(err.get('input'))}: keys must be strings"
    if err["type"] == "missing":
        return f"{where}: required" + (f", give {flag}" if flag else "")
    got = err.get("input")
    if err["type"] in _EXPECTED:
        hint = ""
        if isinstance(got, str) and err["type"] in ("int_type", "float_type") and _looks_numeric(got):
            hint = " (write the number without quotes)"
        return f"{where}: must be {_EXPECTED[err['type']]}, not {_as_written(got)}{hint}"
    msg = _strip_prefix(err["msg"])
    if err["type"] not in ("value_error",) and not isinstance(got, (dict, list)) and got is not None:
        msg = f"{msg} (got {_short(got)})"
    return f"{where}: {msg}"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _strip_prefix(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def load_yaml(path: str) -> dict[str, Any]:
    """The file's top-level mapping; ConfigError for a file that is not a
    bounded YAML mapping (docs/configuration.md, "The file")."""
    where = f"config file {path!r}"
    try:
        data = read_yaml_file(path, MAX_CONFIG_BYTES)
    except FileError as e:
        raise ConfigError(f"{where}{e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping of keys, not {type(data).__name__}")
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


_FLAG_INT_RE = re.compile(r"[0-9]{1,18}")  # ASCII digits; int() would also take '١٢' and '1_000'


def typed_flags(flag_data: dict[str, Any], model: type[BaseModel] | None = None,
                path: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    """Flags arrive as text; the models are strict. The text of an integer
    field's flag becomes an int (digits only); everything else is passed on
    as it is (durations convert their own text, switches are already bool).
    Returns the converted flags and a problem per flag that is not a number."""
    model = model or Config
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in flag_data.items():
        field = model.model_fields.get(key)
        sub = field.annotation if field is not None else None
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            out[key], more = typed_flags(value, sub, path + (key,))
            problems += more
        elif sub is int and isinstance(value, str):
            if _FLAG_INT_RE.fullmatch(value):
                out[key] = int(value)
            else:
                name = ".".join(path + (key,))
                flag = FLAG_NAMES.get(path + (key,))
                problems.append(f"{name} ({flag}): {_short(value)} is not a whole number" if flag
                                else f"{name}: {_short(value)} is not a whole number")
        else:
            out[key] = value
    return out, problems


def build_config(file_data: dict[str, Any], flag_data: dict[str, Any]) -> Config:
    """Validate the merged configuration; ConfigError lists every problem.
    `flag_data` is what the command line gave (text; None: not given)."""
    flags, problems = typed_flags(flag_data)
    try:
        config = Config.model_validate(merge(file_data, flags))
    except ValidationError as e:
        problems += [_describe(err) for err in e.errors()]
    if problems:
        raise ConfigError(problems)
    return config
