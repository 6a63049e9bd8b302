"""Lay a TLS report summary out: terminal tables, JSON, CSV, or one self-contained HTML page.

Report contents come from outside (any sender can mail a "report"), so the HTML
page escapes every string it shows and loads nothing: inline CSS, inline SVG,
no scripts.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from html import escape
from typing import Any

from postfix_mtasts.tlsrpt.explain import explain_no_policy, verdict
from postfix_mtasts.tlsrpt.sources import Collected
from postfix_mtasts.tlsrpt.summary import DayTotals, FailureGroup, Summary

#: Width the terminal tables and explanations fit in.
TERMINAL_WIDTH = 100
#: No column of a terminal table shrinks below this many characters to fit the width.
MIN_COLUMN_WIDTH = 8
#: Gap between terminal table columns.
COLUMN_GAP = "  "
#: Longest run of days the HTML chart fills in; a longer span shows only days with reports.
MAX_CHART_DAYS = 400
#: Size of one panel of the HTML chart, in SVG user units.
CHART_PANEL_HEIGHT = 120
CHART_LEFT_MARGIN = 70
CHART_MAX_WIDTH = 960
CHART_MAX_BAR_GROUP = 40
#: Columns of the CSV output: one row per policy's successes and per failure detail.
CSV_COLUMNS = (
    "organization-name",
    "report-id",
    "start-datetime",
    "end-datetime",
    "policy-type",
    "policy-domain",
    "mode",
    "result",
    "sending-mta-ip",
    "receiving-mx-hostname",
    "receiving-mx-helo",
    "receiving-ip",
    "failure-reason-code",
    "additional-information",
    "sessions",
)
#: The CSV ``result`` of a policy's successful sessions.
CSV_SUCCESS = "successful"
#: The CSV ``result`` of failed sessions a policy counts but no failure-details entry explains.
CSV_UNDETAILED = "failure-without-details"
#: How outputs name a policy-domain the report left out.
MISSING_DOMAIN = "(missing)"
#: The fields of a failure-details entry shown below its row in the terminal's failure table.
TEXT_DETAIL_FIELDS = ("receiving-mx-helo", "receiving-ip", "failure-reason-code", "additional-information")


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M")


def _rate(failed: int, total: int) -> str:
    return f"{100 * failed / total:.2f} %" if total else "-"


def _verdict(summary: Summary) -> str:
    return verdict(summary.successful, summary.failed, summary.no_policy_successful, summary.no_policy_failed)


def _fields(failure: FailureGroup) -> dict[str, str | None]:
    """A failure group's failure-details fields by their RFC 8460 names."""
    return {
        "result-type": failure.result_type,
        "sending-mta-ip": failure.sending_mta_ip,
        "receiving-mx-hostname": failure.receiving_mx_hostname,
        "receiving-mx-helo": failure.receiving_mx_helo,
        "receiving-ip": failure.receiving_ip,
        "failure-reason-code": failure.failure_reason_code,
        "additional-information": failure.additional_information,
    }


# --- terminal ------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (),
          width: int = TERMINAL_WIDTH, keep: Sequence[int] = ()) -> list[str]:
    """Align ``rows`` under ``headers`` within ``width``, cutting the widest cells with an ellipsis;
    numeric columns and those in ``keep`` (addresses, result types) are never cut."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    floor = [w if i in numeric or i in keep else max(MIN_COLUMN_WIDTH, len(h))
             for i, (h, w) in enumerate(zip(headers, widths, strict=True))]
    while sum(widths) + len(COLUMN_GAP) * (len(widths) - 1) > width:
        candidates = [i for i, w in enumerate(widths) if w > floor[i]]
        if not candidates:
            break
        widest = max(candidates, key=lambda i: widths[i])
        widths[widest] -= 1

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths, strict=True)):
            if len(cell) > w:
                cell = cell[: w - 1] + "…"
            out.append(cell.rjust(w) if i in numeric else cell.ljust(w))
        return COLUMN_GAP.join(out).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)]


def render_text(summary: Summary, collected: Collected, width: int = TERMINAL_WIDTH) -> str:
    """The default output: headline figures, tables, then each failure's meaning and fix."""
    total = summary.successful + summary.failed
    out = [
        f"TLS reports: {summary.reports} read, {len(collected.broken)} broken, "
        f"{len(collected.duplicates)} duplicate, {len(collected.ignored)} other messages skipped",
        f"Sessions: {total:,} in all, {summary.successful:,} successful, {summary.failed:,} failed "
        f"({_rate(summary.failed, total)} failed)",
        *_wrapped("", _verdict(summary), width, indent=""),
        "",
        "Reporters (times in UTC)",
    ]
    out += table(
        ["Organisation", "From", "To", "Reports", "Successful", "Failed"],
        [[r.organization, _when(r.start), _when(r.end), f"{r.reports:,}", f"{r.successful:,}",
          f"{r.failed:,}"] for r in summary.reporters],
        numeric=(3, 4, 5), width=width,
    )
    out += ["", "Policies"]
    out += table(
        ["Type", "Domain", "Mode", "Successful", "Failed", "Failed %"],
        [[p.policy_type, p.domain or MISSING_DOMAIN, p.mode or "-", f"{p.successful:,}", f"{p.failed:,}",
          _rate(p.failed, p.successful + p.failed)] for p in summary.policies],
        numeric=(3, 4, 5), width=width, keep=(0, 2),
    )
    if summary.failures:
        out += ["", "Failures (the failure-details fields a row has beyond these columns follow it)"]
        lines = table(
            ["Result type", "Sending MTA IP", "Receiving MX", "Sessions"],
            [[f.result_type, f.sending_mta_ip or "-", f.receiving_mx,
              f"{f.sessions:,}"] for f in summary.failures],
            numeric=(3,), width=width, keep=(0, 1),
        )
        out += lines[:2]
        for line, failure in zip(lines[2:], summary.failures, strict=True):
            out.append(line)
            fields = _fields(failure)
            for name in TEXT_DETAIL_FIELDS:
                if fields[name]:
                    out += _wrapped(f"{name}: ", str(fields[name]), width, indent="    ")
    if summary.failed_without_details:
        out += ["", f"{summary.failed_without_details:,} failed sessions came without failure details."]
    if summary.result_types:
        out += ["", "What the failures mean"]
        for totals in summary.result_types:
            out += ["", f"{totals.result_type}: {totals.sessions:,} failed sessions"]
            out += _wrapped("What happened: ", totals.explanation.meaning, width)
            out += _wrapped("Usual fix: ", totals.explanation.fix, width)
    if any(p.policy_type == "no-policy-found" for p in summary.policies):
        explanation = explain_no_policy(summary.no_policy_failed)
        out += ["", f"no-policy-found: {summary.no_policy_successful:,} successful, "
                    f"{summary.no_policy_failed:,} failed sessions"]
        out += _wrapped("What it means: ", explanation.meaning, width)
        out += _wrapped("What to do: ", explanation.fix, width)
    if collected.warnings:
        out += ["", "Warnings (these reports were counted, but are not quite right)"]
        for warning in collected.warnings:
            out += _wrapped(f"{warning.source}: ", warning.text, width)
    return "\n".join(out) + "\n"


def _wrapped(label: str, text: str, width: int, indent: str = "  ") -> list[str]:
    """``label`` and ``text`` wrapped to ``width``; a word longer than a line (a URL) is not cut."""
    return textwrap.wrap(label + text, width=width, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_long_words=False, break_on_hyphens=False)


# --- JSON and CSV ----------------------------------------------------------------


def summary_data(summary: Summary, collected: Collected) -> dict[str, Any]:
    """The summary as plain JSON-ready data (the ``--json`` output)."""
    no_policy = explain_no_policy(summary.no_policy_failed)
    return {
        "reports": summary.reports,
        "successful-sessions": summary.successful,
        "failed-sessions": summary.failed,
        "failed-sessions-without-details": summary.failed_without_details,
        "verdict": _verdict(summary),
        "reporters": [
            {
                "organization-name": r.organization,
                "start-datetime": r.start.isoformat(),
                "end-datetime": r.end.isoformat(),
                "contact-info": r.contact_info,
                "reports": r.reports,
                "successful-sessions": r.successful,
                "failed-sessions": r.failed,
            }
            for r in summary.reporters
        ],
        "policies": [
            {
                "policy-type": p.policy_type,
                "policy-domain": p.domain,
                "mode": p.mode,
                "successful-sessions": p.successful,
                "failed-sessions": p.failed,
            }
            for p in summary.policies
        ],
        "failures": [
            {**_fields(f), "receiving-mx": f.receiving_mx, "failed-sessions": f.sessions}
            for f in summary.failures
        ],
        "result-types": [
            {
                "result-type": t.result_type,
                "failed-sessions": t.sessions,
                "meaning": t.explanation.meaning,
                "fix": t.explanation.fix,
            }
            for t in summary.result_types
        ],
        "no-policy-found": {
            "successful-sessions": summary.no_policy_successful,
            "failed-sessions": summary.no_policy_failed,
            "meaning": no_policy.meaning,
            "fix": no_policy.fix,
        } if any(p.policy_type == "no-policy-found" for p in summary.policies) else None,
        "days": [
            {"day": d.day.isoformat(), "successful-sessions": d.successful, "failed-sessions": d.failed}
            for d in summary.days
        ],
        "warnings": [
            {"source": w.source, "organization-name": w.report.organization_name,
             "report-id": w.report.report_id, "warning": w.text}
            for w in collected.warnings
        ],
        "broken": [{"source": b.source, "reason": b.reason} for b in collected.broken],
        "duplicates": [
            {"source": d.source, "first-source": d.first_source, "conflict": d.conflict}
            for d in collected.duplicates
        ],
        "skipped": [{"source": i.source, "reason": i.reason} for i in collected.ignored],
    }


def render_json(summary: Summary, collected: Collected) -> str:
    return json.dumps(summary_data(summary, collected), indent=2, ensure_ascii=False) + "\n"


def render_csv(collected: Collected) -> str:
    """One row per policy's successes and per failure detail, so a spreadsheet can add anything up."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for found in collected.found:
        report = found.report
        head = [report.organization_name, report.report_id, report.start.isoformat(), report.end.isoformat()]
        for policy in report.policies:
            what = [policy.policy_type.value, policy.policy_domain or "", policy.mode or ""]
            writer.writerow([*head, *what, CSV_SUCCESS, "", "", "", "", "", "", policy.successful_sessions])
            detailed = 0
            for d in policy.failure_details:
                detailed += d.failed_session_count
                writer.writerow([*head, *what, d.result_type, d.sending_mta_ip or "",
                                 d.receiving_mx_hostname or "", d.receiving_mx_helo or "",
                                 d.receiving_ip or "", d.failure_reason_code or "",
                                 d.additional_information or "", d.failed_session_count])
            if policy.failed_sessions > detailed:
                writer.writerow([*head, *what, CSV_UNDETAILED, "", "", "", "", "", "",
                                 policy.failed_sessions - detailed])
    return buffer.getvalue()


# --- HTML --------------------------------------------------------------------------

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2329;
       margin: 2rem auto; max-width: 1040px; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.figures { display: flex; gap: 1rem; flex-wrap: wrap; margin: 1rem 0; }
.figure { border: 1px solid #d0d7de; border-radius: 6px; padding: .6rem 1rem; min-width: 9rem; }
.figure b { display: block; font-size: 1.4rem; }
.ok b { color: #1a7f37; } .bad b { color: #cf222e; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0; }
th, td { border-bottom: 1px solid #d8dee4; padding: .3rem .5rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.type { font-family: ui-monospace, monospace; white-space: nowrap; }
.scroll { overflow-x: auto; } #failures td { font-size: .85em; }
#failures td:nth-child(7), #failures td:nth-child(8) { overflow-wrap: anywhere; min-width: 7em; }
dt { font-family: ui-monospace, monospace; font-weight: bold; margin-top: 1rem; }
dd { margin-left: 1.2rem; } .broken { color: #cf222e; }
svg text { font: 11px system-ui, sans-serif; fill: #57606a; }
.bar.successful { fill: #2da44e; } .bar.failed { fill: #cf222e; } .axis { stroke: #8c959f; }
"""


def render_html(summary: Summary, collected: Collected) -> str:
    """One page that opens in any browser with no network: figures, chart, tables, explanations."""
    total = summary.successful + summary.failed
    first = min((r.start for r in summary.reporters), default=None)
    last = max((r.end for r in summary.reporters), default=None)
    span = f"{_when(first)} to {_when(last)} UTC" if first and last else "no reports"
    tone = "bad" if summary.failed else "ok"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>TLS reports, {escape(span)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>SMTP TLS reports (RFC 8460)</h1>",
        f"<p>{escape(span)}</p>",
        f'<p id="verdict"><b>{escape(_verdict(summary))}</b></p>',
        '<div class="figures">',
        _figure("reports", summary.reports, "report-count"),
        _figure("sessions", total, "session-count"),
        _figure("successful", summary.successful, "successful-count", "ok"),
        _figure("failed", summary.failed, "failed-count", tone),
        _figure("failure rate", _rate(summary.failed, total), "failed-rate", tone),
        "</div>",
        "<h2>Sessions per day</h2>",
        chart_svg(summary.days),
        "<h2>Reporters</h2>",
        _html_table(
            ["Organisation", "From (UTC)", "To (UTC)", "Reports", "Successful", "Failed"],
            [[r.organization, _when(r.start), _when(r.end), r.reports, r.successful, r.failed]
             for r in summary.reporters],
            "reporters",
        ),
        "<h2>Policies</h2>",
        _html_table(
            ["Type", "Domain", "Mode", "Successful", "Failed", "Failed %"],
            [[p.policy_type, p.domain or MISSING_DOMAIN, p.mode or "-", p.successful, p.failed,
              _rate(p.failed, p.successful + p.failed)] for p in summary.policies],
            "policies",
            code_first=True,
        ),
    ]
    if summary.failures:
        parts += [
            "<h2>Failures</h2>",
            '<div class="scroll">' + _html_table(
                ["Result type", "Sessions", "Sending MTA IP", "Receiving MX hostname", "Receiving MX HELO",
                 "Receiving IP", "Failure reason code", "Additional information"],
                [[f.result_type, f.sessions, *(value or "-" for value in list(_fields(f).values())[1:])]
                 for f in summary.failures],
                "failures",
                code_first=True,
            ) + "</div>",
        ]
    if summary.failed_without_details:
        parts.append(
            f"<p>{summary.failed_without_details:,} failed sessions came without failure details.</p>"
        )
    if summary.result_types:
        parts += ["<h2>What the failures mean</h2>", '<dl id="explanations">']
        for t in summary.result_types:
            parts += [
                f"<dt>{escape(t.result_type)} ({t.sessions:,} failed sessions)</dt>",
                f"<dd><b>What happened:</b> {escape(t.explanation.meaning)}</dd>",
                f"<dd><b>Usual fix:</b> {escape(t.explanation.fix)}</dd>",
            ]
        parts.append("</dl>")
    if any(p.policy_type == "no-policy-found" for p in summary.policies):
        explanation = explain_no_policy(summary.no_policy_failed)
        parts += [
            '<h2>No policy found</h2><dl id="no-policy-found">',
            f"<dt>no-policy-found ({summary.no_policy_successful:,} successful, "
            f"{summary.no_policy_failed:,} failed sessions)</dt>",
            f"<dd><b>What it means:</b> {escape(explanation.meaning)}</dd>",
            f"<dd><b>What to do:</b> {escape(explanation.fix)}</dd>",
            "</dl>",
        ]
    if collected.warnings:
        parts += ["<h2>Warnings: reports counted, but not quite right</h2>", '<ul id="warnings">']
        parts += [f"<li>{escape(w.source)}: {escape(w.text)}</li>" for w in collected.warnings]
        parts.append("</ul>")
    if collected.broken:
        parts += ["<h2>Reports that could not be read</h2>", '<ul class="broken">']
        parts += [f"<li>{escape(b.source)}: {escape(b.reason)}</li>" for b in collected.broken]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _figure(label: str, value: int | str, ident: str, tone: str = "") -> str:
    shown = f"{value:,}" if isinstance(value, int) else value
    return f'<div class="figure {tone}" id="{ident}"><b>{escape(shown)}</b>{escape(label)}</div>'


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[object]], ident: str,
                code_first: bool = False) -> str:
    numeric = {i for i, h in enumerate(headers) if h in ("Reports", "Successful", "Failed", "Failed %",
                                                          "Sessions")}
    head = "".join(f'<th{" class=n" if i in numeric else ""}>{escape(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = f"{cell:,}" if isinstance(cell, int) else str(cell)
            css = ' class="n"' if i in numeric else (' class="type"' if code_first and i == 0 else "")
            cells.append(f"<td{css}>{escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="{ident}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def chart_days(days: Sequence[DayTotals]) -> list[DayTotals]:
    """The days to draw: every day from the first to the last (zeros between), unless the span is huge."""
    if not days:
        return []
    first, last = days[0].day, days[-1].day
    if (last - first).days + 1 > MAX_CHART_DAYS:
        return list(days)
    known = {d.day: d for d in days}
    out: list[DayTotals] = []
    day: date = first
    while day <= last:
        out.append(known.get(day, DayTotals(day)))
        day += timedelta(days=1)
    return out


def chart_svg(days: Sequence[DayTotals]) -> str:
    """Two bar panels sharing the day axis: successes on top, failures below, each to its own scale
    (failures are usually far fewer and would vanish on a shared one)."""
    shown = chart_days(days)
    if not shown:
        return "<p>No reports, so nothing to draw.</p>"
    group = max(4, min(CHART_MAX_BAR_GROUP, (CHART_MAX_WIDTH - CHART_LEFT_MARGIN) // len(shown)))
    width = CHART_LEFT_MARGIN + group * len(shown) + 10
    label_every = max(1, -(-48 // group))  # at least ~48 units between day labels
    panel_gap = 30
    height = 2 * CHART_PANEL_HEIGHT + panel_gap + 40
    out = [
        f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Successful and failed sessions per day, {shown[0].day} to {shown[-1].day}">'
    ]
    for panel, (kind, label) in enumerate((("successful", "successful"), ("failed", "failed"))):
        top = 10 + panel * (CHART_PANEL_HEIGHT + panel_gap)
        base = top + CHART_PANEL_HEIGHT
        peak = max(getattr(d, kind) for d in shown)
        out.append(f'<text x="0" y="{top + 10}">{label}</text>')
        out.append(f'<text x="0" y="{top + 26}">max {peak:,}</text>')
        out.append(f'<line class="axis" x1="{CHART_LEFT_MARGIN}" y1="{base}" x2="{width - 10}" y2="{base}"/>')
        for i, d in enumerate(shown):
            value = int(getattr(d, kind))
            bar = round(CHART_PANEL_HEIGHT * value / peak) if peak else 0
            if value and bar == 0:
                bar = 1  # a non-zero day stays visible
            x = CHART_LEFT_MARGIN + i * group + 1
            out.append(
                f'<rect class="bar {kind}" data-day="{d.day.isoformat()}" data-sessions="{value}" '
                f'x="{x}" y="{base - bar}" width="{max(1, group - 2)}" height="{bar}">'
                f"<title>{d.day.isoformat()}: {value:,} {label}</title></rect>"
            )
    axis_y = 10 + 2 * CHART_PANEL_HEIGHT + panel_gap + 16
    for i, d in enumerate(shown):
        if i % label_every == 0:
            x = CHART_LEFT_MARGIN + i * group
            out.append(f'<text x="{x}" y="{axis_y}">{d.day.strftime("%m-%d")}</text>')
    out.append("</svg>")
    return "".join(out)
