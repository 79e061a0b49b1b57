"""The doctor's verdicts: one Check per thing looked at, printed as text or JSON."""

import json
from dataclasses import asdict, dataclass, field

OK, WARN, FAIL = "ok", "warn", "fail"
SECTIONS = ("engine", "cuda", "tcpx", "tcpxo", "nixl", "peer")
# The plugin transports, each with the section of its own checks.
PLUGIN_TRANSPORTS = ("tcpx", "tcpxo")


@dataclass
class Check:
    section: str  # engine, cuda, tcpx, tcpxo, nixl, peer
    name: str
    status: str  # ok, warn or fail
    detail: str
    fix: str = ""  # one line, for warn and fail
    source: str = ""  # where the requirement comes from (an upstream file), if not from this project
    data: dict = field(default_factory=dict)


class Report:
    def __init__(self, transport):
        self.transport = transport  # what the user asked for: auto, socket, tcpx or tcpxo
        self.checks = []
        self.runs = ""  # what this host can run, in one line (`diagnose` fills it in)

    def add(self, section, title, status, detail, fix="", source="", **data):
        if status not in (OK, WARN, FAIL) or section not in SECTIONS:
            raise ValueError(f"check {section}/{title}: status {status!r}")
        # Without a plugin transport asked for, what CUDA or a plugin lacks stops nothing the user
        # runs (auto falls back to sockets and never loads TCPXO, host memory needs no GPU): a
        # warning, never a failure on a healthy host.
        if status == FAIL and not self.counts(section):
            status = WARN
        check = Check(section, title, status, detail, fix, source, data)
        self.checks.append(check)
        return check

    def counts(self, section):
        """Whether a failure in `section` stops the transport asked for: CUDA's and a plugin's
        sections count only when that plugin was asked for."""
        if section == "cuda":
            return self.transport in PLUGIN_TRANSPORTS
        if section in PLUGIN_TRANSPORTS:
            return section == self.transport
        return True

    def ordered(self):
        return sorted(self.checks, key=lambda c: SECTIONS.index(c.section))

    def failing(self):
        """The failed checks that stop the transport asked for. A plugin's section and CUDA's
        count only when that plugin was asked for: auto falls back to sockets, and says why."""
        return [c for c in self.checks if c.status == FAIL and self.counts(c.section)]

    def exit_code(self):
        return 1 if self.failing() else 0

    def to_json(self):
        return json.dumps(
            {
                "transport": self.transport,
                "exit": self.exit_code(),
                "runs": self.runs,
                "checks": [asdict(c) for c in self.ordered()],
            },
            indent=2,
        )

    def to_text(self):
        lines = []
        section = None
        for c in self.ordered():
            if c.section != section:
                section = c.section
                lines.append(f"== {section}")
            lines.append(f"[{c.status:>4}] {c.name}: {c.detail}")
            if c.fix and c.status != OK:
                lines.append(f"       fix: {c.fix}")
            if c.source:
                lines.append(f"       per: {c.source}")
        if self.runs:
            lines.append(f"this host runs: {self.runs}")
        failing = self.failing()
        if failing:
            names = ", ".join(f"{c.section}/{c.name}" for c in failing)
            lines.append(f"transport {self.transport}: cannot work here ({names})")
        else:
            lines.append(f"transport {self.transport}: nothing found that stops it")
        return "\n".join(lines)
