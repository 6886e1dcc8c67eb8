"""The error hierarchy. Every error a user can cause or meet has a class here
and a message that names what is wrong; the CLI maps classes to exit codes."""

from __future__ import annotations


class PrismError(Exception):
    """Base of every error prism-kernel raises on purpose."""

    exit_code = 1


def describe(e: BaseException) -> str:
    """An error for a log line: our own message as it is (it names what is
    wrong), anything else with its type (a bug or an OS error)."""
    return str(e) if isinstance(e, PrismError) else f"{type(e).__name__}: {e}"


class ConfigError(PrismError):
    """Invalid configuration or flags. Raised before anything touches the kernel."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = problems
        super().__init__("; ".join(problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"invalid configuration: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid configuration ({len(self.problems)} problems):\n{lines}"


class LockError(PrismError):
    """Another daemon of the same instance holds the lock."""

    exit_code = 3


class DatapathError(PrismError):
    """The kernel refused an operation of the data path."""


class DatapathUnavailable(DatapathError):
    """This data path cannot run on this host (missing kernel feature, headers, ...).

    `reason` says what is missing and what to do about it; `--datapath auto`
    logs it when it falls back to the other data path.
    """

    def __init__(self, datapath: str, reason: str):
        self.datapath = datapath
        self.reason = reason
        super().__init__(f"{datapath} data path unavailable: {reason}")
