"""What `strata doctor` found, judged and printed: one row per node, one per node pair, then the
errors (exit code 1) and warnings.

Errors: a node that did not answer, a version that differs from this machine's (strata, torch,
ray, transformers), a pair whose all-reduce failed. Warnings: NCCL fell back to sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.actors.nodes.link_check import LinkResult
from strata.actors.nodes.node_facts import MUST_MATCH, NodeFacts, version_mismatches


@dataclass
class NodeReport:
    name: str  # how the user knows the node: its address, or "node K" before it answered
    facts: NodeFacts | None
    problem: str | None = None


@dataclass
class PairReport:
    a: str
    b: str
    result: LinkResult | None
    problem: str | None = None


@dataclass
class DoctorReport:
    where: str
    nodes: list[NodeReport]
    pairs: list[PairReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def judge(self, reference: NodeFacts) -> DoctorReport:
        """Fills errors and warnings, comparing every node's versions with `reference`'s."""
        for node in self.nodes:
            if node.problem:
                self.errors.append(f"node {node.name}: {node.problem}")
            elif node.facts is not None:
                self.errors += [f"version mismatch: {m}" for m in version_mismatches(reference, node.facts)]
        for pair in self.pairs:
            link = f"{pair.a} <-> {pair.b}"
            if pair.problem:
                self.errors.append(f"{link}: {pair.problem}")
            elif pair.result is not None and pair.result.transport == "NCCL NET/Socket":
                self.warnings.append(f"{link}: NCCL fell back to sockets (NET/Socket), not InfiniBand/RoCE; expect a "
                                     f"fraction of the bandwidth (check the RDMA devices, NCCL_IB_HCA, IPC_LOCK)")
            elif pair.result is not None and pair.result.transport == "?":
                self.warnings.append(f"{link}: NCCL's log did not say which network it used")
        answered = [n for n in self.nodes if n.facts is not None]
        if len(answered) < 2 and not self.pairs:
            self.warnings.append("fewer than two nodes answered: no link to measure")
        return self


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def _gpus(facts: NodeFacts) -> str:
    if not facts.gpus:
        return "0"
    names = sorted(set(facts.gpus))
    return f"{len(facts.gpus)} x {names[0]}" if len(names) == 1 else f"{len(facts.gpus)} ({', '.join(names)})"


def render(report: DoctorReport) -> str:
    lines = [f"strata doctor: {len(report.nodes)} node(s), {report.where}", ""]
    header = ["node", "host", "address", "interface", "GPUs", *MUST_MATCH, "python", "status"]
    rows = []
    for n in report.nodes:
        f = n.facts
        if f is None:
            rows.append([n.name, "-", "-", "-", "-", *["-"] * len(MUST_MATCH), "-", "NOT ANSWERING"])
        else:
            versions = [f.versions.get(k, "?") for k in (*MUST_MATCH, "python")]
            rows.append([n.name, f.host, f.ip, f.interface or "?", _gpus(f), *versions,
                         "ok" if not n.problem else "ERROR"])
    lines += _table(header, rows)
    if report.pairs:
        lines.append("")
        rows = []
        for p in report.pairs:
            r = p.result
            if r is None:
                rows.append([f"{p.a} <-> {p.b}", "-", "-", "-", "-", "FAILED"])
            else:
                rows.append([f"{p.a} <-> {p.b}", r.transport, f"{r.nbytes / 2**20:g} MiB", f"{r.seconds * 1e3:.2f} ms",
                             f"{r.bandwidth_gbps:.2f} GB/s", "ok"])
        lines += _table(["pair", "transport", "size", "time", "bus bandwidth", "status"], rows)
    lines.append("")
    lines += [f"ERROR: {e}" for e in report.errors]
    lines += [f"WARNING: {w}" for w in report.warnings]
    verdict = "OK" if report.ok else "FAILED"
    lines.append(f"{verdict}: {len(report.errors)} error(s), {len(report.warnings)} warning(s)")
    return "\n".join(lines)
