"""The LoRA support matrix, derived from what the installed plugins declare.

A cell (engine, server) is supported when both declare LoRA ready, they share a peft type, and
the engine produces an adapter transport the server accepts. Otherwise the cell carries the
reason, in words a user can act on. A supported cell also says whether the pair trains several
adapters on one base at once (``adapters:``): both sides declare ``multi_adapter``; when not,
``multi_adapter_reason`` names the side that lacks it.
"""

from __future__ import annotations

import attrs

from areal_core.declarations import ENGINE, SERVER, BackendDeclaration, LoraStatus


@attrs.frozen
class Cell:
    engine: str
    server: str
    supported: bool
    reason: str = ""
    multi_adapter: bool = False
    multi_adapter_reason: str = ""

    def to_dict(self) -> dict:
        return {"engine": self.engine, "server": self.server,
                "supported": self.supported, "reason": self.reason,
                "multi_adapter": self.multi_adapter, "multi_adapter_reason": self.multi_adapter_reason}


def _backend_problem(decl: BackendDeclaration) -> str:
    lora = decl.lora
    if lora.status is LoraStatus.READY:
        return ""
    if lora.status is LoraStatus.UNSUPPORTED:
        detail = f": {lora.reason}" if lora.reason else ""
        return f"{decl.kind} {decl.name} has no LoRA support{detail}"
    detail = f" ({lora.reason})" if lora.reason else ""
    return f"{decl.kind} {decl.name}: LoRA not implemented yet{detail}"


def judge_pair(engine: BackendDeclaration, server: BackendDeclaration) -> Cell:
    problems = [p for p in (_backend_problem(engine), _backend_problem(server)) if p]
    if not problems:
        shared_types = set(engine.lora.peft_types) & set(server.lora.peft_types)
        if not shared_types:
            problems.append(
                f"engine {engine.name} trains {', '.join(engine.lora.peft_types)} adapters but "
                f"server {server.name} serves {', '.join(server.lora.peft_types)}"
            )
        if not set(engine.lora.transports) & set(server.lora.transports):
            problems.append(
                f"engine {engine.name} exports adapters as {', '.join(engine.lora.transports)} "
                f"but server {server.name} accepts {', '.join(server.lora.transports)}"
            )
    reason = "; ".join(problems)
    multi_reason = multi_adapter_problem(engine, server) if not problems else "the pair is not supported"
    return Cell(engine.name, server.name, not problems, reason, not multi_reason, multi_reason)


def multi_adapter_problem(engine: BackendDeclaration, server: BackendDeclaration) -> str:
    """Why the pair does not train several adapters at once ("" when both declare
    ``multi_adapter``); says nothing of whether the pair is supported at all."""
    return "; ".join(p for p in (engine.why_not_multi_adapter(), server.why_not_multi_adapter()) if p)


MULTI_ADAPTER_LEGEND = ("yes (multi): the pair also trains several adapters on one base at once "
                        "(`adapters:`, docs/multi-adapter.md)")


@attrs.frozen
class SupportMatrix:
    engines: tuple[str, ...]
    servers: tuple[str, ...]
    cells: tuple[Cell, ...]

    def cell(self, engine: str, server: str) -> Cell:
        for cell in self.cells:
            if cell.engine == engine and cell.server == server:
                return cell
        missing = [
            f"{kind} {name!r} is not installed (installed {kind}s: {', '.join(names) or 'none'})"
            for kind, name, names in (("engine", engine, self.engines), ("server", server, self.servers))
            if name not in names
        ]
        reason = "; ".join(missing)
        return Cell(engine, server, False, reason, False, reason)

    def supports(self, engine: str, server: str) -> bool:
        return self.cell(engine, server).supported

    def reason(self, engine: str, server: str) -> str:
        return self.cell(engine, server).reason

    def to_dict(self) -> dict:
        return {
            "engines": list(self.engines),
            "servers": list(self.servers),
            "cells": [cell.to_dict() for cell in self.cells],
        }

    def to_markdown(self) -> str:
        """Rows engines, columns servers, as in the reference docs; reasons as footnotes. A
        supported cell reads "yes (multi)" when the pair trains several adapters at once, else
        "yes [n]" with a footnote saying which side lacks it."""
        header = "| Engine | " + " | ".join(self.servers) + " |"
        rule = "|---|" + "---|" * len(self.servers)
        rows, notes = [header, rule], []
        for engine in self.engines:
            marks = []
            for server in self.servers:
                cell = self.cell(engine, server)
                if cell.multi_adapter:
                    marks.append("yes (multi)")
                elif cell.supported:
                    notes.append(f"one adapter at a time: {cell.multi_adapter_reason}")
                    marks.append(f"yes [{len(notes)}]")
                else:
                    notes.append(cell.reason)
                    marks.append(f"no [{len(notes)}]")
            rows.append(f"| {engine} | " + " | ".join(marks) + " |")
        if any(cell.supported for cell in self.cells):
            rows.append("")
            rows.append(MULTI_ADAPTER_LEGEND)
        if notes:
            rows.append("")
            rows.extend(f"[{i}] {note}" for i, note in enumerate(notes, 1))
        return "\n".join(rows)


def build_matrix(declarations: list[BackendDeclaration]) -> SupportMatrix:
    engines = sorted((d for d in declarations if d.kind == ENGINE), key=lambda d: d.name)
    servers = sorted((d for d in declarations if d.kind == SERVER), key=lambda d: d.name)
    cells = tuple(judge_pair(e, s) for e in engines for s in servers)
    return SupportMatrix(tuple(e.name for e in engines), tuple(s.name for s in servers), cells)
