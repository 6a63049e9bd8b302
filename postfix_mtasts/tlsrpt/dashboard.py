"""The ``/reports`` dashboard page: per policy domain, sessions per day as an inline SVG chart,
failures by result type (with meaning and fix), reporter, sending MTA and receiving MX.

Pure: a :class:`~postfix_mtasts.tlsrpt.series.DashboardView` in, one HTML string out.
Report contents come from anyone who can send mail, so every string is escaped,
and the page loads nothing: inline CSS and SVG, no script, no external URL.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

from postfix_mtasts.check.findings import Finding, Level, summary
from postfix_mtasts.tlsrpt.explain import explain_no_policy
from postfix_mtasts.tlsrpt.model import PolicyType
from postfix_mtasts.tlsrpt.series import (
    NO_DOMAIN,
    Breakdown,
    DashboardView,
    DaySessions,
    DomainView,
)

#: Domains drawn with their own section; the overview table still lists every domain.
DOMAIN_SECTIONS = 25
#: Where each domain's ``sts-*`` failures link to: the audit of that domain.
CHECK_PATH = "/reports/check"
#: Chart geometry, in SVG user units (the chart scales to the page width).
CHART_LEFT = 64
CHART_RIGHT = 12
CHART_BAR = 9
CHART_TOP = 22
CHART_SUCCESS_HEIGHT = 110
CHART_FAILED_HEIGHT = 70
CHART_PANEL_GAP = 26
CHART_AXIS_LABELS = 22
#: Days between two date labels under a chart.
CHART_LABEL_EVERY = 14


@dataclass(frozen=True)
class AlertBanner:
    """What the alert service currently warns about, shown above the figures: (name, line) pairs."""

    domains: tuple[tuple[str, str], ...] = ()
    silent_reporters: tuple[tuple[str, str], ...] = ()


_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --ok: #1a7f37;
        --bad: #cf222e; --warn: #9a6700; --link: #0969da; }
* { box-sizing: border-box; }
body { font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0; background: #fff; }
header { background: #24292f; color: #fff; padding: 1rem 2rem; }
header h1 { font-size: 1.25rem; margin: 0; font-weight: 600; }
header p { margin: .2rem 0 0; color: #c9d1d9; }
main { max-width: 1100px; margin: 0 auto; padding: 1rem 2rem 3rem; }
a { color: var(--link); text-decoration: none; } a:hover { text-decoration: underline; }
.figures { display: flex; gap: .8rem; flex-wrap: wrap; margin: 1rem 0 1.5rem; }
.figure { border: 1px solid var(--line); border-radius: 8px; padding: .6rem 1rem; min-width: 9rem;
          background: var(--soft); }
.figure b { display: block; font-size: 1.45rem; font-variant-numeric: tabular-nums; }
.figure span { color: var(--muted); }
.ok b, b.ok { color: var(--ok); } .bad b, b.bad { color: var(--bad); }
.alerts { border: 1px solid #ffb3b8; background: #ffebe9; border-radius: 8px; padding: .6rem 1rem;
          margin: 1rem 0; }
.alerts h2 { margin: 0 0 .3rem; font-size: 1rem; color: var(--bad); }
.alerts ul { margin: 0; padding-left: 1.2rem; }
h2 { font-size: 1.1rem; margin: 0 0 .6rem; }
h3 { font-size: .95rem; margin: 1.2rem 0 .4rem; color: var(--muted); font-weight: 600; }
section.domain { border: 1px solid var(--line); border-radius: 8px; padding: 1rem 1.2rem;
                 margin: 1.5rem 0; }
section.domain h2 { display: flex; justify-content: space-between; align-items: baseline;
                    gap: 1rem; flex-wrap: wrap; }
section.domain h2 small { font-weight: normal; color: var(--muted); font-size: .85rem; }
table { border-collapse: collapse; width: 100%; margin: .2rem 0 .6rem; }
th, td { border-bottom: 1px solid var(--line); padding: .32rem .55rem; text-align: left;
         vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code, td.code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .9em; }
td.code { white-space: nowrap; }
.explain { color: var(--muted); font-size: .92em; }
.explain b { color: var(--fg); font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 0 1.5rem; }
.pill { display: inline-block; border-radius: 1em; padding: 0 .55em; font-size: .85em;
        border: 1px solid var(--line); background: var(--soft); }
.pill.bad { border-color: #ffb3b8; background: #ffebe9; color: var(--bad); }
.pill.ok { border-color: #aceebb; background: #dafbe1; color: var(--ok); }
.empty { color: var(--muted); }
svg.chart { width: 100%; height: auto; display: block; margin: .4rem 0 .2rem; }
svg.chart text { font: 10px system-ui, sans-serif; fill: #59636e; }
svg.chart .title { font-weight: 600; fill: #1f2328; }
svg.chart .grid { stroke: #e6eaef; stroke-width: 1; }
svg.chart .axis { stroke: #8c959f; stroke-width: 1; }
svg.chart .bar.successful { fill: #2da44e; } svg.chart .bar.failed { fill: #cf222e; }
footer { color: var(--muted); font-size: .85em; margin-top: 2rem; }
"""


def render_dashboard(view: DashboardView, *, generated: datetime, banner: AlertBanner | None = None,
                     check_path: str = CHECK_PATH) -> str:
    """The whole page for ``view``; ``generated`` is shown (the caller's clock), ``banner`` lists
    open alerts."""
    sessions = sum(d.sessions for d in view.domains)
    failed = sum(d.failed for d in view.domains)
    window = f"{view.first_day.isoformat()} to {view.last_day.isoformat()} (UTC)"
    days = (view.last_day - view.first_day).days + 1
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>TLS reports: postfix-mtasts</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header><h1>SMTP TLS reports (RFC 8460)</h1>",
        f"<p>Last {days} days: {escape(window)}</p></header>",
        "<main>",
        _banner(banner),
        '<div class="figures">',
        _figure("reports", f"{view.reports:,}", "report-count"),
        _figure("policy domains", f"{len(view.domains):,}", "domain-count"),
        _figure("sessions", f"{sessions:,}", "session-count"),
        _figure("failed sessions", f"{failed:,}", "failed-count", "bad" if failed else "ok"),
        _figure("failure rate", _percent(failed, sessions), "failed-rate", "bad" if failed else "ok"),
        "</div>",
    ]
    if not view.domains:
        parts.append(f'<p class="empty" id="no-reports">No TLS reports dated {escape(window)} '
                     "are stored.</p>")
    else:
        parts += _overview(view.domains)
        for index, domain in enumerate(view.domains[:DOMAIN_SECTIONS]):
            parts.append(_domain_section(index, domain, check_path))
        hidden = len(view.domains) - DOMAIN_SECTIONS
        if hidden > 0:
            parts.append(f'<p class="empty">{hidden:,} more domains are only in the overview above.</p>')
    parts += [
        f"<footer>Generated {escape(generated.strftime('%Y-%m-%d %H:%M:%S UTC'))} by postfix-mtasts. "
        "A report counts on the day its date range starts.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _banner(banner: AlertBanner | None) -> str:
    if banner is None or not (banner.domains or banner.silent_reporters):
        return ""
    items = [f'<li data-name="{escape(name)}">{escape(text)}</li>'
             for name, text in (*banner.domains, *banner.silent_reporters)]
    return f'<div class="alerts" id="alerts"><h2>Open alerts</h2><ul>{"".join(items)}</ul></div>'


def _figure(label: str, value: str, ident: str, tone: str = "") -> str:
    return f'<div class="figure {tone}" id="{ident}"><b>{escape(value)}</b><span>{escape(label)}</span></div>'


def _percent(failed: int, total: int) -> str:
    return f"{100 * failed / total:.2f} %" if total else "-"


def _overview(domains: Sequence[DomainView]) -> list[str]:
    rows = []
    for index, d in enumerate(domains):
        name = escape(d.domain)
        link = f'<a href="#d{index}">{name}</a>' if index < DOMAIN_SECTIONS else name
        tone = "bad" if d.failed else "ok"
        rows.append(
            f"<tr><td>{link}</td><td>{escape(', '.join(d.policy_types))}</td>"
            f'<td class="n">{d.sessions:,}</td><td class="n">{d.successful:,}</td>'
            f'<td class="n"><b class="{tone}">{d.failed:,}</b></td>'
            f'<td class="n">{_percent(d.failed, d.sessions)}</td></tr>'
        )
    return [
        "<h2>Policy domains</h2>",
        '<table id="overview"><thead><tr><th>Domain</th><th>Policy</th><th class="n">Sessions</th>'
        '<th class="n">Successful</th><th class="n">Failed</th><th class="n">Failed %</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>",
    ]


def check_link(domain: str, check_path: str = CHECK_PATH) -> str:
    """The URL of the audit of ``domain`` (to be HTML-escaped where it is used)."""
    return f"{check_path}?domain={urllib.parse.quote(domain, safe='')}"


def _domain_section(index: int, d: DomainView, check_path: str) -> str:
    status = (f'<span class="pill bad">{d.failed:,} failed ({_percent(d.failed, d.sessions)})</span>'
              if d.failed else '<span class="pill ok">no failures</span>')
    parts = [
        f'<section class="domain" id="d{index}" data-domain="{escape(d.domain)}">',
        f"<h2><span>{escape(d.domain)} {status}</span>"
        f"<small>{d.successful:,} successful, {d.failed:,} failed sessions</small></h2>",
        chart_svg(d.days, d.domain),
    ]
    if d.result_types or d.failed_without_details:
        parts += ["<h3>Failures by result type</h3>", _result_types(d, check_path)]
    else:
        parts.append('<p class="empty">No failed sessions reported in this window.</p>')
    if PolicyType.NO_POLICY_FOUND.value in d.policy_types:
        told = explain_no_policy(d.failed)
        parts.append(f'<p class="explain no-policy"><b>no-policy-found:</b> {escape(told.meaning)} '
                     f"<b>What to do:</b> {escape(told.fix)}</p>")
    parts.append("<h3>By reporter</h3>" + _reporters(d))
    parts.append('<div class="grid">')
    if d.failed:
        parts.append("<div><h3>Failures by sending MTA</h3>"
                     + _breakdown(d.sending_mtas, "Sending MTA IP", "sending") + "</div>")
        parts.append("<div><h3>Failures by receiving MX</h3>"
                     + _breakdown(d.receiving_mxs, "Receiving MX", "receiving") + "</div>")
    parts += ["</div>", "</section>"]
    return "\n".join(parts)


def _result_types(d: DomainView, check_path: str) -> str:
    rows = []
    for row in d.result_types:
        audit = ""
        if row.is_sts and d.domain != NO_DOMAIN:
            href = escape(check_link(d.domain, check_path))
            audit = (f' <a class="check" href="{href}">What does <code>check {escape(d.domain)}</code> '
                     "find?</a>")
        rows.append(
            f'<tr class="result" data-result="{escape(row.result_type)}"><td class="code">'
            f'{escape(row.result_type)}</td><td class="n">{row.failed:,}</td>'
            f'<td class="explain"><b>What happened:</b> {escape(row.explanation.meaning)}<br>'
            f"<b>Usual fix:</b> {escape(row.explanation.fix)}{audit}</td></tr>"
        )
    if d.failed_without_details:
        rows.append(
            f'<tr class="result" data-result="failure-without-details"><td class="code">(no details)</td>'
            f'<td class="n">{d.failed_without_details:,}</td><td class="explain">Failed sessions the '
            "reporters counted in their summary but did not describe; ask the reporter for details.</td></tr>"
        )
    return ('<table class="result-types"><thead><tr><th>Result type</th><th class="n">Failed</th>'
            f"<th>Meaning and fix</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _reporters(d: DomainView) -> str:
    rows = [
        f'<tr><td>{escape(r.organization)}</td><td class="n">{r.reports:,}</td>'
        f'<td class="n">{r.successful:,}</td><td class="n">{r.failed:,}</td>'
        f'<td class="n">{escape(r.newest.strftime("%Y-%m-%d"))}</td></tr>'
        for r in d.reporters
    ]
    return ('<table class="reporters"><thead><tr><th>Organisation</th><th class="n">Reports</th>'
            '<th class="n">Successful</th><th class="n">Failed</th><th class="n">Newest</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _breakdown(table: Breakdown, heading: str, css: str) -> str:
    rows = [f'<tr><td class="code">{escape(r.name)}</td><td class="n">{r.failed:,}</td></tr>'
            if r.name != "-" else
            f'<tr><td class="empty">(not reported)</td><td class="n">{r.failed:,}</td></tr>'
            for r in table.rows]
    if table.other_rows:
        others = "other" if table.other_rows == 1 else "others"
        rows.append(f'<tr><td class="empty">{table.other_rows:,} {others}</td>'
                    f'<td class="n">{table.other_failed:,}</td></tr>')
    return (f'<table class="{css}"><thead><tr><th>{escape(heading)}</th><th class="n">Failed</th></tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


# --- the chart ---------------------------------------------------------------------


def chart_svg(days: Sequence[DaySessions], label: str) -> str:
    """Sessions per day in two panels sharing the day axis, successful above and failed below,
    each to its own scale (failures are usually too few to see on a shared one)."""
    if not days:
        return ""
    width = CHART_LEFT + CHART_BAR * len(days) + CHART_RIGHT
    failed_top = CHART_TOP + CHART_SUCCESS_HEIGHT + CHART_PANEL_GAP
    height = failed_top + CHART_FAILED_HEIGHT + CHART_AXIS_LABELS
    first, last = days[0].day.isoformat(), days[-1].day.isoformat()
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(f"Sessions per day for {label}, {first} to {last}")}">'
    ]
    panels = (("successful", CHART_TOP, CHART_SUCCESS_HEIGHT), ("failed", failed_top, CHART_FAILED_HEIGHT))
    for kind, top, panel_height in panels:
        out += _panel(days, kind, top, panel_height, width)
    axis_y = failed_top + CHART_FAILED_HEIGHT + 15
    for i, d in enumerate(days):
        if _labelled(i, len(days)):
            x = CHART_LEFT + i * CHART_BAR
            out.append(f'<line class="axis" x1="{x}" y1="{axis_y - 13}" x2="{x}" y2="{axis_y - 10}"/>')
            anchor = "end" if i == len(days) - 1 else "middle"
            x_text = x + CHART_BAR if anchor == "end" else x
            out.append(f'<text x="{x_text}" y="{axis_y}" text-anchor="{anchor}">'
                       f'{d.day.strftime("%d %b")}</text>')
    out.append("</svg>")
    return "".join(out)


def _labelled(index: int, count: int) -> bool:
    """Label every CHART_LABEL_EVERY-th day counted back from the last, so today is labelled."""
    return (count - 1 - index) % CHART_LABEL_EVERY == 0


def _panel(days: Sequence[DaySessions], kind: str, top: int, panel_height: int, width: int) -> list[str]:
    base = top + panel_height
    peak = max(getattr(d, kind) for d in days)
    out = [
        f'<text class="title" x="0" y="{top - 8}">{kind} sessions</text>',
        f'<line class="grid" x1="{CHART_LEFT}" y1="{top}" x2="{width - CHART_RIGHT}" y2="{top}"/>',
        f'<text x="{CHART_LEFT - 6}" y="{base + 3}" text-anchor="end">0</text>',
    ]
    if peak:
        out.append(f'<text x="{CHART_LEFT - 6}" y="{top + 4}" text-anchor="end">{_short(peak)}</text>')
    for i, d in enumerate(days):
        value = int(getattr(d, kind))
        bar = round(panel_height * value / peak) if peak else 0
        if value and bar == 0:
            bar = 1  # a day with any session stays visible
        x = CHART_LEFT + i * CHART_BAR + 1
        out.append(
            f'<rect class="bar {kind}" data-day="{d.day.isoformat()}" data-sessions="{value}" '
            f'x="{x}" y="{base - bar}" width="{CHART_BAR - 2}" height="{bar}">'
            f"<title>{d.day.isoformat()}: {value:,} {kind}</title></rect>"
        )
    out.append(f'<line class="axis" x1="{CHART_LEFT}" y1="{base}" x2="{width - CHART_RIGHT}" y2="{base}"/>')
    return out


def _short(value: int) -> str:
    """An axis label: 950, 12.5k, 3.1M."""
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1_000:.0f}k"
    if value >= 1_000:
        return f"{value / 1_000:.1f}k"
    return str(value)


# --- the audit of one domain ---------------------------------------------------------


def render_check(domain: str, findings: Sequence[Finding], *, checked: datetime,
                 back: str = "/reports") -> str:
    """What ``postfix-mtasts check DOMAIN`` found, as a page linked from the dashboard."""
    rows = []
    for f in findings:
        detail = ""
        if f.level is not Level.OK:
            detail = (f'<div class="explain"><b>Means:</b> {escape(f.meaning)}<br>'
                      f"<b>Fix:</b> {escape(f.fix)}</div>")
        rows.append(
            f'<tr class="finding {f.level.value}" data-topic="{escape(f.topic)}">'
            f'<td class="level {_LEVEL_TONE[f.level]}">{escape(f.level.symbol)}</td>'
            f"<td>{escape(f.message)}{detail}</td></tr>"
        )
    return _small_page(
        f"check {domain}",
        f"<h2>postfix-mtasts check {escape(domain)}</h2>"
        f'<p class="empty">{escape(summary(domain, findings))}; checked '
        f"{escape(checked.strftime('%Y-%m-%d %H:%M:%S UTC'))} with the daemon's resolver settings.</p>"
        f'<table id="findings"><tbody>{"".join(rows)}</tbody></table>'
        f'<p><a href="{escape(back)}">Back to the TLS reports</a></p>',
    )


def render_problem(title: str, text: str, back: str = "/reports") -> str:
    """A short page for a request the dashboard cannot answer (unknown domain, busy)."""
    return _small_page(title, f"<h2>{escape(title)}</h2><p>{escape(text)}</p>"
                              f'<p><a href="{escape(back)}">Back to the TLS reports</a></p>')


_LEVEL_TONE = {Level.OK: "ok", Level.WARNING: "warn", Level.ERROR: "bad"}


def _small_page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}: postfix-mtasts</title><style>{_CSS}"
        "td.level { width: 1.5rem; font-weight: bold; } td.warn { color: var(--warn); }"
        "td.ok { color: var(--ok); } td.bad { color: var(--bad); }</style></head><body>"
        "<header><h1>SMTP TLS reports (RFC 8460)</h1></header>"
        f"<main>{body}</main></body></html>\n"
    )
