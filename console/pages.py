"""Server-rendered HTML of the console's pages (and of `medfed report`), from `console.runs`.

Every value from a run file is escaped; numbers are shown with 4 decimals (`fmt`), the same
rounding the browser tests compare against metrics.jsonl. Test-split figures are always
labelled with TEST_LABEL: they are reported, never used to choose.
"""

from __future__ import annotations

import json
import time
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

from common.data.splits import TEST_LABEL
from console.charts import PALETTE, Line, line_chart
from console.runs import RunView

CHART_METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity")
TABLE_METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy", "loss")
SITE_LINES = 10  # per-site chart: at most this many sites (the table lists them all)


def fmt(value: Any) -> str:
    """A metric as the pages show it: 4 decimals, or an en dash when undefined."""
    if isinstance(value, bool) or value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "–" if value != value else f"{value:.4f}"
    return escape(str(value))


def when(ts: float | None) -> str:
    """A UTC time stamp, or an en dash."""
    if ts is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def stylesheet() -> str:
    """The console's CSS (served from the package, inlined in reports)."""
    return resources.files("console").joinpath("static/console.css").read_text(encoding="utf-8")


class Links:
    """URLs of the pages under a mount prefix ('' for `medfed console`, '/console' under
    `medfed server`); `None` for a self-contained report, which links nowhere."""

    def __init__(self, prefix: str | None) -> None:
        self.prefix = prefix

    def href(self, path: str) -> str | None:
        return None if self.prefix is None else self.prefix + path

    def run(self, name: str, page: str = "") -> str | None:
        return self.href(f"/runs/{quote(name)}{page}")


def _a(href: str | None, text: str) -> str:
    return escape(text) if href is None else f'<a href="{escape(href)}">{escape(text)}</a>'


def layout(title: str, body: str, links: Links, *, live_status: str | None = None,
           nav: list[tuple[str | None, str]] | None = None) -> str:
    """The page around `body`; `live_status` is the API URL the page polls while running."""
    if links.prefix is None:
        head_extra = f"<style>{stylesheet()}</style>"
    else:
        css = links.href("/static/console.css") or ""
        head_extra = f'<link rel="stylesheet" href="{escape(css)}">'
    script = ""
    if live_status is not None and links.prefix is not None:
        script = (f'<script src="{escape(links.href("/static/console.js") or "")}" '
                  f'data-status-url="{escape(live_status)}" defer></script>')
    crumbs = " · ".join(_a(h, t) for h, t in (nav or []))
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)} — medfed console</title>{head_extra}{script}</head><body>"
            f'<header><span class="brand">{_a(links.href("/"), "medfed console")}</span>'
            f'<nav>{crumbs}</nav></header><main>{body}</main></body></html>')


def problems_box(problems: list[str]) -> str:
    if not problems:
        return ""
    items = "".join(f"<li>{escape(p)}</li>" for p in problems)
    return f'<div class="problems" role="status"><ul>{items}</ul></div>'


def badge(status: str) -> str:
    return f'<span class="badge badge-{escape(status)}" data-status="{escape(status)}">' \
           f"{escape(status)}</span>"


def table(headers: list[str], rows: list[list[str]], *, cls: str = "", raw_headers: bool = False
          ) -> str:
    """A table; cells are HTML already (callers escape)."""
    th = "".join(f"<th>{h if raw_headers else escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


# --- runs ---------------------------------------------------------------------------------------
def runs_page(runs: list[dict[str, Any]], links: Links, root: str) -> str:
    rows = []
    for r in runs:
        planned = r["rounds_planned"]
        rows.append([
            _a(links.run(r["name"]), r["name"]),
            badge(r["status"]) + (" " + badge("resumed") if r["resumed"] else ""),
            f'{r["rounds_done"]}' + (f" / {planned}" if planned else ""),
            escape(str(r["strategy"] or "–")),
            f'<span data-run="{escape(r["name"])}" data-split="validation">'
            f'{fmt(r["validation"])}</span>',
            f'<span data-run="{escape(r["name"])}" data-split="test">{fmt(r["test"])}</span>',
            escape(when(r["started"])),
        ])
    body = (f"<h1>Runs</h1><p>Run directories under <code>{escape(root)}</code>. Validation "
            f"chooses; the test column is {escape(TEST_LABEL)}.</p>")
    if rows:
        metric_header = f"last validation ({escape(runs[0]['metric'])})"
        body += table(["run", "status", "rounds", "strategy", metric_header,
                       f"last test ({TEST_LABEL})", "started"], rows, cls="runs")
    else:
        body += "<p>No runs here yet.</p>"
    return layout("Runs", body, links, nav=[(links.href("/"), "runs")])


# --- one run ------------------------------------------------------------------------------------
def run_nav(links: Links, name: str) -> list[tuple[str | None, str]]:
    return [(links.href("/"), "runs"), (links.run(name), name),
            (links.run(name, "/hospitals"), "hospitals"),
            (links.run(name, "/versions"), "versions"), (links.run(name, "/audit"), "audit")]


def _series(rounds: list[dict[str, Any]], split: str, metric: str
            ) -> tuple[tuple[float, float | None], ...]:
    return tuple((float(r["round"]), r.get(split, {}).get(metric)) for r in rounds)


def _train_loss(r: dict[str, Any]) -> float | None:
    losses = [m.get("loss") for m in (r.get("train") or {}).values()
              if isinstance(m.get("loss"), int | float)]
    return sum(losses) / len(losses) if losses else None


def charts(view: RunView) -> str:
    rounds = view.rounds
    metric_lines = []
    for i, metric in enumerate(CHART_METRICS):
        colour = PALETTE[i % len(PALETTE)]
        metric_lines.append(Line(f"{metric} (validation)", _series(rounds, "validation", metric),
                                 colour=colour))
        metric_lines.append(Line(f"{metric} (test*)", _series(rounds, "test", metric),
                                 dashed=True, colour=colour))
    loss_lines = [
        Line("train loss (mean over sites)", tuple((float(r["round"]), _train_loss(r))
                                                   for r in rounds), colour=PALETTE[0]),
        Line("validation loss", _series(rounds, "validation", "loss"), colour=PALETTE[1]),
        Line("test loss*", _series(rounds, "test", "loss"), dashed=True, colour=PALETTE[1]),
    ]
    sites = sorted({s for r in rounds for s in (r.get("sites") or {})})
    site_lines = [
        Line(site, tuple((float(r["round"]), ((r.get("sites") or {}).get(site) or {})
                          .get("validation", {}).get(view.best_metric)) for r in rounds),
             colour=PALETTE[i % len(PALETTE)])
        for i, site in enumerate(sites[:SITE_LINES])
    ]
    note = (f'<p class="note">* dashed: test splits, {escape(TEST_LABEL)}. Solid: validation, '
            f"which chooses the round called best (metric {escape(view.best_metric)}).</p>")
    more = (f"<p class=\"note\">Per-site chart: the first {SITE_LINES} of {len(sites)} sites; "
            "the table below lists every site.</p>" if len(sites) > SITE_LINES else "")
    unit = (0.0, 1.0)
    drawn = (line_chart("Global model per round", metric_lines, "metric", unit)
             + line_chart("Loss", loss_lines, "loss")
             + line_chart(f"Per-site validation {view.best_metric}", site_lines,
                          view.best_metric, unit))
    return f'<section class="charts">{drawn}</section>{note}{more}'


def rounds_table(view: RunView) -> str:
    headers = ["round", "elapsed (s)"]
    headers += [f"validation {m}" for m in TABLE_METRICS]
    headers += [f"test {m}*" for m in TABLE_METRICS]
    rows = []
    for r in view.rounds:
        elapsed = r.get("elapsed_s")
        row = [str(r["round"]), f"{elapsed:.1f}" if isinstance(elapsed, int | float) else "–"]
        for split in ("validation", "test"):
            for m in TABLE_METRICS:
                row.append(f'<span data-round="{r["round"]}" data-split="{split}" '
                           f'data-metric="{m}">{fmt(r.get(split, {}).get(m))}</span>')
        rows.append(row)
    return ("<h2>Rounds</h2>" + table(headers, rows, cls="rounds")
            + f'<p class="note">* {escape(TEST_LABEL)}.</p>')


def sites_table(view: RunView) -> str:
    rows = []
    for s in view.sites():
        sizes = s["rows"]
        rows_text = " / ".join(escape(str(sizes.get(split, "–")))
                               for split in ("train", "validation", "test")) if sizes else "–"
        excluded = "<br>".join(escape(e) for e in s["excluded"]) or "none"
        kept = "–" if s["kept"] is None else (
            f'{escape(str(s["kept"]))} (from v{escape(str(s["based_on_version"]))})'
            + (f'<br><span class="note">{escape(str(s["kept_reason"]))}</span>'
               if s["kept_reason"] else ""))
        rows.append([f'<span data-site="{escape(s["site"])}">{escape(s["site"])}</span>',
                     rows_text, "–" if s["last_reply_round"] is None else
                     f'round {s["last_reply_round"]}', excluded, kept])
    return "<h2>Sites</h2>" + table(
        ["site", "rows declared (train / validation / test)", "last reply", "excluded replies",
         "model kept after personalisation"], rows, cls="sites")


def settings_section(view: RunView) -> str:
    data = view.to_json()
    privacy = data["privacy"]
    if privacy:
        eps, delta = privacy.get("epsilon"), privacy.get("delta")
        rest = {k: v for k, v in privacy.items() if k not in ("epsilon", "delta")}
        spent = (f"ε = {fmt(eps)}, δ = {fmt(delta)}" if eps is not None else
                 "no guarantee (clipping without noise)")
        priv = (f'<p>Differential privacy: <span data-field="privacy">{spent}</span> '
                f"({escape(json.dumps(rest, sort_keys=True))})</p>")
    else:
        priv = "<p>Differential privacy: off (no (ε, δ) guarantee).</p>"
    val = data["validation_settings"]
    held = data["heldout"]
    out = "<h2>Privacy and validation</h2>" + priv
    out += ("<p>Reply validation: <code>" + escape(json.dumps(val, sort_keys=True))
            + "</code></p>") if val is not None else ""
    out += ("<p>Held-out evaluation: <code>" + escape(json.dumps(held, sort_keys=True))
            + "</code></p>") if held is not None else ""
    final, best = data["final"], data["best"]
    if final:
        out += (f"<p>Delivered to hospitals: version {fmt(final.get('version'))} "
                f"(chosen by <code>{escape(str(final.get('chosen_by')))}</code>)"
                + (f"; best = version {fmt(best.get('version'))} on validation "
                   f"{escape(view.best_metric)}" if isinstance(best, dict) else "") + ".</p>")
    out += ("<h2>Resolved configuration</h2>"
            + (f"<pre class=\"config\">{escape(json.dumps(view.config, indent=2, sort_keys=True))}"
               "</pre>" if view.config else "<p>No published version yet: the configuration "
               "appears with the first one.</p>"))
    return out


def run_body(view: RunView) -> str:
    planned = f" of {view.rounds_planned}" if view.rounds_planned else ""
    last_val = view.last("validation").get(view.best_metric)
    last_test = view.last("test").get(view.best_metric)
    head = (f'<h1>{escape(view.name)} {badge(view.status)}'
            f'{" " + badge("resumed") if view.resumed else ""}</h1>'
            f'<p class="facts"><span data-field="rounds_done">{view.rounds_done}</span> rounds'
            f"{planned} · strategy {escape(str(view.strategy or '–'))} · started "
            f"{escape(when(view.started))} · last validation {escape(view.best_metric)} "
            f'<span data-field="last_validation">{fmt(last_val)}</span> · last test '
            f'{escape(view.best_metric)} <span data-field="last_test">{fmt(last_test)}</span> '
            f"({escape(TEST_LABEL)})</p>")
    return (head + problems_box(view.problems) + charts(view) + rounds_table(view)
            + sites_table(view) + settings_section(view))


def run_page(view: RunView, links: Links, status_url: str | None) -> str:
    live = status_url if view.status == "running" else None
    return layout(view.name, run_body(view), links, live_status=live,
                  nav=run_nav(links, view.name))


def report_page(view: RunView, source: str) -> str:
    """The run page as one self-contained file (inline CSS and SVG, no script, no links)."""
    body = run_body(view) + (f'<p class="note">Report of <code>{escape(source)}</code>, '
                             f"written {escape(when(time.time()))} by medfed report.</p>")
    return layout(view.name, body, Links(None))


# --- versions, hospitals, audit -----------------------------------------------------------------
def versions_page(name: str, data: dict[str, Any], links: Links, best_metric: str) -> str:
    rows = []
    for v in data["versions"]:
        files = " ".join(_a(links.run(name, f"/versions/{v['version']}/files/{quote(f)}"), f)
                         for f in v["files"])
        markers = " ".join(badge(m) for m in v["markers"])
        sig = v["signature"]
        sig_html = (f'<span class="{"ok" if sig == "verified" else "bad"}" data-signature='
                    f'"{v["version"]}">{escape(sig)}</span>')
        rows.append([
            _a(links.run(name, f"/versions/{v['version']}"), f"v{v['version']:04d}") + " "
            + markers, fmt(v["round"]),
            f'<span data-version="{v["version"]}" data-split="validation">'
            f'{fmt(v["validation"].get(best_metric))}</span>',
            f'<span data-version="{v["version"]}" data-split="test">'
            f'{fmt(v["test"].get(best_metric))}</span>', sig_html, files,
        ])
    ptr = []
    for marker, p in data["pointers"].items():
        metric = p.get("metric", best_metric)
        ptr.append(f"<li><b>{escape(marker)}</b> → version {fmt(p.get('version'))}"
                   + (f" ({escape(str(metric))} {fmt(p.get('value'))} on "
                      f"{escape(str(p.get('split', 'validation')))})" if marker == "best" else "")
                   + "</li>")
    body = (f"<h1>Model versions of {escape(name)}</h1>" + problems_box(data["problems"])
            + f"<ul class=\"pointers\">{''.join(ptr)}</ul>"
            + table(["version", "round", f"validation {best_metric}",
                     f"test {best_metric} ({TEST_LABEL})", "signature", "download"], rows,
                    cls="versions"))
    return layout(f"{name}: versions", body, links, nav=run_nav(links, name))


def version_page(name: str, version: int, card: str, signature: str, links: Links) -> str:
    body = (f"<h1>{escape(name)}: version {version}</h1><p>Signature: "
            f'<span class="{"ok" if signature == "verified" else "bad"}">{escape(signature)}'
            f"</span></p><h2>Model card</h2><pre class=\"card\">{escape(card)}</pre>")
    return layout(f"{name}: v{version}", body, links, nav=run_nav(links, name))


def hospitals_page(name: str, data: dict[str, Any], links: Links) -> str:
    rows = []
    for h in data["hospitals"]:
        online = "online" if h["online"] else ("offline" if data["running"] else "–")
        rows.append([escape(h["site"]), "yes" if h["registered"] else "no (reported name)",
                     escape(online), escape(when(h["last_seen"])),
                     escape(", ".join(str(r) for r in h["trained_rounds"]) or "none")])
    refused = "".join(f"<li>{escape(r)}</li>" for r in data["refused_joins"])
    body = (f"<h1>Hospitals of {escape(name)}</h1>"
            + table(["hospital", "registered", "now", "last heard from", "trained in rounds"],
                    rows, cls="hospitals")
            + "<h2>Refused joins</h2>"
            + (f"<ul>{refused}</ul>" if refused else "<p>None recorded.</p>"))
    return layout(f"{name}: hospitals", body, links, nav=run_nav(links, name))


def audit_page(name: str, data: dict[str, Any], links: Links, site: str | None,
               rnd: int | None) -> str:
    def filt(**kw: Any) -> str | None:
        query = {k: v for k, v in {"site": site, "round": rnd, **kw}.items() if v is not None}
        return links.run(name, "/audit" + (f"?{urlencode(query)}" if query else ""))

    site_links = " ".join(_a(filt(site=s), s) for s in data["sites"])
    round_links = " ".join(_a(filt(round=r), str(r)) for r in data["rounds"])
    rows = []
    for e in data["entries"]:
        arrays = "<br>".join(
            f"{escape(k)} {escape(str(v.get('shape')))} {escape(str(v.get('dtype')))}"
            for k, v in (e.get("arrays") or {}).items())
        metrics = "<br>".join(f"{escape(k)} = {fmt(v)}"
                              for k, v in (e.get("metrics") or {}).items())
        note = e.get("error") or e.get("excluded")
        rows.append([escape(when(e.get("time"))), escape(str(e.get("site", "–"))),
                     fmt(e.get("round")), escape(str(e.get("type", ""))), arrays or "–",
                     metrics or "–", escape(str(note)) if note else ""])
    shown = (f"<p>{data['shown']} of {data['total']} entries"
             + (f" for site <b>{escape(site)}</b>" if site else "")
             + (f" in round <b>{rnd}</b>" if rnd is not None else "") + " (newest last). "
             + _a(links.run(name, "/audit"), "all") + "</p>")
    body = (f"<h1>Audit of {escape(name)}: what each hospital sent</h1>"
            + problems_box(data["problems"]) + f"<p>Site: {site_links or '–'}</p>"
            + f"<p>Round: {round_links or '–'}</p>" + shown
            + table(["time", "site", "round", "message", "arrays (name, shape, dtype)",
                     "scalar metrics", "error / excluded"], rows, cls="audit"))
    return layout(f"{name}: audit", body, links, nav=run_nav(links, name))


def error_page(message: str, links: Links) -> str:
    return layout("Not found", f"<h1>Not found</h1><p class=\"error\">{escape(message)}</p>",
                  links, nav=[(links.href("/"), "runs")])
