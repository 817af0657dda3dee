"""The Grafana dashboard shipped in the collection (role marslib.mars.mars_grafana).

Every metric and label the dashboard queries must be on the wire as marsd's real collector
writes it (counters carry ``_total`` there); the role installs the dashboard and its
provisioning files, twice without a change, and in check mode without touching the disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from marslib.layout import logfile_name
from marslib.metrics import MarsCollector
from marslib.position import LogPosition
from marslib.space import LEVEL_NAMES
from marslib.status import (
    PRIMARY,
    SECONDARY,
    DaemonStatus,
    FetchStatus,
    FullSyncStatus,
    LoggerStatus,
    PeerStatus,
    ReplayStatus,
    ResourceStatus,
    SecondaryStatus,
)

COLLECTIONS = REPO / "ansible"
ROLE = COLLECTIONS / "ansible_collections" / "marslib" / "mars" / "roles" / "mars_grafana"
DASHBOARD = ROLE / "files" / "marslib-dashboard.json"
DOC = REPO / "docs" / "grafana.md"
PLAYBOOK = REPO / ".venv" / "bin" / "ansible-playbook"

# Prometheus attaches these to every series it scrapes; marsd's exposition has none of them.
SCRAPE_LABELS = frozenset({"instance", "job"})


# ------------------------------------------------------------ marsd's real metrics
def collector_exposition(status: DaemonStatus) -> str:
    """What marsd serves on /metrics for ``status``: its collector, rendered."""
    registry = CollectorRegistry()
    registry.register(MarsCollector(lambda: status, status.host))
    return generate_latest(registry).decode()


def exported_series(*expositions: str) -> dict[str, frozenset[str]]:
    """Sample name as on the wire (``mars_fetch_bytes_total``) -> its label names."""
    out: dict[str, set[str]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in out.items()}


def cluster_statuses(now: float) -> list[DaemonStatus]:
    """Two hosts of a cluster in every state a metric appears in: alpha is primary of r0
    in emergency mode and a secondary of r1 behind by 40 KiB; beta is primary of r1 and
    a secondary of r0 in a full sync; gamma is down."""
    behind = LogPosition(7, 40960, 10, "beta")
    alpha = DaemonStatus(
        host="alpha", space_free=900 << 20, space_level="emergency",
        space_level_number=LEVEL_NAMES.index("emergency"),
        peers={"beta": PeerStatus(connected=True),
               "gamma": PeerStatus(connected=False, error="connection refused")},
        resources={
            "r0": ResourceStatus(
                role=PRIMARY, open_count=1, logfile_count=3, logfile_bytes=3 << 20,
                logger=LoggerStatus(writes=120, bytes_written=120 << 12, commits=30,
                                    pending_bytes=8192, emergency=True)),
            "r1": ResourceStatus(
                role=SECONDARY, logfile_count=2, logfile_bytes=81920,
                secondary=SecondaryStatus(phase="replaying", consistent=True),
                fetcher=FetchStatus(fetch_logfile=logfile_name(7, "beta"),
                                    fetch_local_end=81920, fetch_remote_end=81920,
                                    fetch_bytes=81920),
                replayer=ReplayStatus(replay=behind.encode(), replay_bytes=40960,
                                      caught_up_at=now - 12)),
        })
    beta = DaemonStatus(
        host="beta", space_free=20 << 30,
        peers={"alpha": PeerStatus(connected=True)},
        resources={
            "r1": ResourceStatus(
                role=PRIMARY, open_count=1, logfile_count=1, logfile_bytes=81920,
                logger=LoggerStatus(writes=20, bytes_written=20 << 12, commits=4)),
            "r0": ResourceStatus(
                role=SECONDARY,
                secondary=SecondaryStatus(phase="syncing", consistent=False),
                syncer=FullSyncStatus(sync_done=4 << 20, sync_size=16 << 20)),
        })
    return [alpha, beta]


@pytest.fixture(scope="module")
def series() -> dict[str, frozenset[str]]:
    return exported_series(*map(collector_exposition, cluster_statuses(time.time())))


# --------------------------------------------------------- what the dashboard asks
@dataclass(frozen=True)
class MetricRef:
    """A metric a query selects, with the labels its selector matches on."""

    name: str
    labels: frozenset[str]


@dataclass
class ParsedQuery:
    """The metrics a PromQL expression selects and the labels it groups by."""

    metrics: list[MetricRef] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class DashboardQuery:
    """One query of the dashboard: a panel target or a template variable."""

    where: str  # "panel 'Replication lag (bytes)'" or "variable 'host'"
    expr: str  # PromQL
    legend: str = ""
    label: str | None = None  # label_values(expr, label): the label it lists


TOKEN = re.compile(r"""\s*(?:
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+)
  | (?P<number>[0-9][0-9A-Za-z_.]*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|\S))""", re.VERBOSE)
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
FUNCTIONS = set("""abs absent absent_over_time avg_over_time ceil changes clamp clamp_max
    clamp_min count_over_time day_of_month day_of_week day_of_year days_in_month delta deriv
    exp floor histogram_quantile holt_winters hour idelta increase irate label_join
    label_replace last_over_time ln log10 log2 max_over_time min_over_time minute month
    predict_linear present_over_time quantile_over_time rate resets round scalar sgn sort
    sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time time timestamp vector
    year""".split())


def tokens(expr: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    while pos < len(expr.rstrip()):
        m = TOKEN.match(expr, pos)
        if m is None or m.lastgroup is None:
            raise ValueError(f"cannot read PromQL at {expr[pos:]!r}")
        out.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return out


def parse_promql(expr: str) -> ParsedQuery:
    """The metrics an expression selects (identifiers that are not functions, operators or
    label names) with their matchers' labels, and its by/on/... labels."""
    toks = tokens(expr)
    parsed = ParsedQuery()

    def text(i: int) -> str:
        return toks[i][1] if i < len(toks) else ""

    def names_until(i: int, closing: str) -> tuple[list[str], int]:
        """Label names from toks[i] up to ``closing``; the index after it."""
        names = []
        while i < len(toks) and text(i) != closing:
            if toks[i][0] == "ident" and text(i + 1) in ("=", "!=", "=~", "!~", ",", closing):
                names.append(text(i))
            i += 1
        return names, i + 1

    i = 0
    while i < len(toks):
        kind, word = toks[i]
        if kind == "ident" and word in GROUPING and text(i + 1) == "(":
            names, i = names_until(i + 2, ")")
            parsed.grouping.update(names)
        elif kind == "ident" and text(i + 1) == "(" and word not in AGGREGATIONS:
            if word not in FUNCTIONS:
                raise ValueError(f"unknown PromQL function {word}() in {expr!r}")
            i += 1
        elif kind == "ident" and (word in AGGREGATIONS or word in KEYWORDS
                                  or word in GROUPING):
            i += 1  # an aggregation, a keyword or group_left/group_right alone
        elif kind == "ident":
            labels: list[str] = []
            i += 1
            if text(i) == "{":
                labels, i = names_until(i + 1, "}")
            parsed.metrics.append(MetricRef(word, frozenset(labels)))
        elif word == "{":
            raise ValueError(f"selector without a metric name in {expr!r}")
        elif word == "[":
            while i < len(toks) and text(i) != "]":
                i += 1
            i += 1
        else:
            i += 1
    return parsed


LABEL_VALUES = re.compile(r"label_values\((?P<expr>.+),\s*(?P<label>[A-Za-z_]\w*)\s*\)")
QUERY_RESULT = re.compile(r"query_result\((?P<expr>.+)\)")


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[DashboardQuery]:
    out = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            out.append(DashboardQuery(f"panel {panel.get('title')!r}", target["expr"],
                                      target.get("legendFormat", "")))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        where = f"variable {var['name']!r}"
        if m := LABEL_VALUES.fullmatch(text.strip()):
            out.append(DashboardQuery(where, m["expr"], label=m["label"]))
        elif m := QUERY_RESULT.fullmatch(text.strip()):
            out.append(DashboardQuery(where, m["expr"]))
        else:  # label_values(label) without a metric, metrics(), label_names() ...
            out.append(DashboardQuery(where, "", label=f"unchecked query {text!r}"))
    return out


def dashboard_problems(dashboard: dict[str, Any],
                       series: dict[str, frozenset[str]]) -> list[str]:
    """Each metric the dashboard queries that marsd does not export, and each label it
    matches, groups, lists or shows in a legend that those metrics do not carry."""
    problems = []
    for q in dashboard_queries(dashboard):
        if q.label is not None and q.label.startswith("unchecked"):
            problems.append(f"{q.where}: {q.label} names no metric to check")
            continue
        parsed = parse_promql(q.expr)
        if not parsed.metrics:
            problems.append(f"{q.where}: {q.expr!r} queries no metric")
        known = set(SCRAPE_LABELS)
        for ref in parsed.metrics:
            if ref.name not in series:
                hint = (f" (a counter: it is exported as {ref.name}_total)"
                        if f"{ref.name}_total" in series else "")
                problems.append(f"{q.where}: {ref.name} is not in marsd's metrics{hint}")
                continue
            labels = series[ref.name] | SCRAPE_LABELS
            known |= labels
            for label in sorted(ref.labels - labels):
                problems.append(f"{q.where}: {ref.name} has no label {label!r}")
        if q.label is not None and parsed.metrics and \
                q.label not in series.get(parsed.metrics[0].name, frozenset()) | SCRAPE_LABELS:
            problems.append(f"{q.where}: {parsed.metrics[0].name} has no label {q.label!r}")
        shown = parsed.grouping | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", q.legend))
        for label in sorted(shown - known):
            problems.append(f"{q.where}: no metric of {q.expr!r} has the label {label!r}")
    return problems


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


# ------------------------------------------------------------------------- tests
def test_every_metric_and_label_the_dashboard_queries_is_exported_by_marsd(
        dashboard: dict[str, Any], series: dict[str, frozenset[str]]) -> None:
    assert dashboard_problems(dashboard, series) == []
    queried = {ref.name for q in dashboard_queries(dashboard)
               for ref in parse_promql(q.expr).metrics}
    # the counters are queried under their names on the wire
    assert {"mars_fetch_bytes_total", "mars_replay_bytes_total",
            "mars_primary_write_bytes_total", "mars_primary_writes_total",
            "mars_log_commits_total"} <= queried
    assert len(dashboard_queries(dashboard)) >= 20


def test_every_metric_marsd_exports_is_on_the_dashboard(
        dashboard: dict[str, Any], series: dict[str, frozenset[str]]) -> None:
    queried = {ref.name for q in dashboard_queries(dashboard)
               for ref in parse_promql(q.expr).metrics}
    assert set(series) - queried == set(), "metrics marsd exports that no panel shows"
    assert len(series) == 20


def test_the_check_reports_unknown_metrics_counters_without_total_and_wrong_labels(
        series: dict[str, frozenset[str]]) -> None:
    broken = {
        "panels": [
            {"type": "row", "title": "collapsed", "panels": [
                {"title": "made up", "targets": [{"expr": "mars_made_up_bytes"}]}]},
            {"title": "counter", "targets": [
                {"expr": 'rate(mars_fetch_bytes{resource=~"$resource"}[5m])'}]},
            {"title": "labels", "targets": [
                {"expr": 'mars_free_bytes{resource="r0"}'},
                {"expr": "sum by (hostname) (mars_logfiles)"},
                {"expr": "mars_logfiles", "legendFormat": "{{volume}} on {{instance}}"}]},
            {"title": "fine", "targets": [
                {"expr": 'mars_peer_connected{peer="beta", job="mars"}',
                 "legendFormat": "{{peer}}"}]},
        ],
        "templating": {"list": [
            {"name": "host", "type": "query",
             "query": {"query": "label_values(mars_resource_role, host)"}},
            {"name": "any", "type": "query", "query": "label_values(resource)"},
            {"name": "datasource", "type": "datasource", "query": "prometheus"},
        ]},
    }
    assert dashboard_problems(broken, series) == [
        "panel 'made up': mars_made_up_bytes is not in marsd's metrics",
        "panel 'counter': mars_fetch_bytes is not in marsd's metrics "
        "(a counter: it is exported as mars_fetch_bytes_total)",
        "panel 'labels': mars_free_bytes has no label 'resource'",
        "panel 'labels': no metric of 'sum by (hostname) (mars_logfiles)' has the label "
        "'hostname'",
        "panel 'labels': no metric of 'mars_logfiles' has the label 'volume'",
        "variable 'host': mars_resource_role has no label 'host'",
        "variable 'any': unchecked query 'label_values(resource)' names no metric to check",
    ]


def test_promql_reader_finds_metrics_and_labels_not_functions_or_keywords() -> None:
    parsed = parse_promql(
        'sum by (resource) (rate(mars_a_total{x=~"$v", y!="a,b}"}[$__rate_interval] '
        "offset 5m)) / on(resource) group_left max without (role) (mars_b) > bool 0 "
        "or vector(1) and mars_c{z=\"1\"}")
    assert parsed.metrics == [MetricRef("mars_a_total", frozenset({"x", "y"})),
                              MetricRef("mars_b", frozenset()),
                              MetricRef("mars_c", frozenset({"z"}))]
    assert parsed.grouping == {"resource", "role"}
    with pytest.raises(ValueError, match="without a metric name"):
        parse_promql('{__name__="mars_a"}')
    with pytest.raises(ValueError, match=r"unknown PromQL function rates\(\)"):
        parse_promql("rates(mars_a_total[5m])")


def test_space_level_names_on_the_dashboard_are_marslibs(dashboard: dict[str, Any]) -> None:
    [panel] = [p for p in panels(dashboard)
               if any("mars_space_level" in t["expr"] for t in p.get("targets", []))]
    [mapping] = panel["fieldConfig"]["defaults"]["mappings"]
    names = {int(value): m["text"] for value, m in mapping["options"].items()}
    assert names == dict(enumerate(LEVEL_NAMES))


def test_dashboard_layout_variables_and_datasource(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "marslib-replication" and dashboard["schemaVersion"] == 39
    assert dashboard["id"] is None  # provisioned: Grafana assigns the id
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {variables[n]["type"] for n in ("host", "resource")} == {"query"}
    every = list(panels(dashboard))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in every:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and p.get("description"), p["title"]
            for t in p["targets"]:
                assert "$host" in t["expr"], f"{p['title']} ignores the host variable"
                if "resource" in json.dumps(t):
                    assert "$resource" in t["expr"], p["title"]
    cells: dict[tuple[int, int], str] = {}
    for p in every:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


# ---------------------------------------------------------- role and its documents
def argument_spec() -> dict[str, Any]:
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    return spec["argument_specs"]["main"]["options"]


def test_every_role_variable_is_specified_defaulted_and_documented(
        dashboard: dict[str, Any]) -> None:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    spec = argument_spec()
    assert {name: opt["default"] for name, opt in spec.items()} == defaults
    assert all(name.startswith("mars_grafana_") and opt["type"] and opt["description"]
               for name, opt in spec.items())
    doc = DOC.read_text()
    for name, opt in spec.items():
        default = json.dumps(opt["default"]) if opt["default"] in ("", True, False) \
            else str(opt["default"])
        assert re.search(rf"^\| `{name}` \| {opt['type']} \| `{re.escape(default)}` \|",
                         doc, re.M), f"{name} missing from the table in {DOC.name}"
    for p in panels(dashboard):
        assert p["title"] in doc, f"panel {p['title']!r} not described in {DOC.name}"


@dataclass(frozen=True)
class PlaybookRun:
    out: str
    changed: int


def role_run(tmp_path: Path, root: Path, *extra: str) -> subprocess.Popen[str]:
    """ansible-playbook applying marslib.mars.mars_grafana to localhost, the Grafana
    directories under ``root``."""
    config = tmp_path / "ansible.cfg"
    config.write_text(f"[defaults]\ncollections_path = {COLLECTIONS}\n"
                      f"local_tmp = {tmp_path / 'ansible-tmp'}\nretry_files_enabled = False\n")
    play = tmp_path / "grafana.yml"
    play.write_text("- name: Provision the marslib dashboard\n  hosts: localhost\n"
                    "  connection: local\n  gather_facts: false\n  roles:\n"
                    "    - role: marslib.mars.mars_grafana\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_CONFIG=str(config), ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="0",
               ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS))
    return subprocess.Popen(
        [str(PLAYBOOK), "-i", "localhost,", str(play),
         "-e", f"ansible_python_interpreter={sys.executable}",
         "-e", f"mars_grafana_provisioning_dir={root / 'provisioning'}",
         "-e", f"mars_grafana_dashboards_dir={root / 'dashboards' / 'marslib'}", *extra],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen[str]) -> PlaybookRun:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    recap = re.search(r"localhost\s*:\s*ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0",
                      out)
    assert recap, out
    return PlaybookRun(out, int(recap[1]))


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def test_role_installs_the_dashboard_idempotently_and_check_mode_changes_nothing(
        tmp_path: Path) -> None:
    grafana, fresh, dropped = tmp_path / "grafana", tmp_path / "fresh", tmp_path / "dropped"
    prometheus = ("-e", "mars_grafana_prometheus_url=http://prometheus.example:9090")
    # independent runs go side by side: each ansible-playbook takes seconds to start
    first, check, dropping = (finished(run) for run in [
        role_run(tmp_path, grafana, *prometheus),
        role_run(tmp_path, fresh, *prometheus, "--check"),
        role_run(tmp_path, dropped, *prometheus, "-e", "mars_grafana_restart=true",
                 "-e", "mars_grafana_service_name=marslib-test-no-such-service")])

    assert first.changed > 0 and check.changed > 0, check.out  # check mode says what it would
    assert not fresh.exists(), tree(fresh)  # ... and does none of it

    installed = grafana / "dashboards" / "marslib" / "marslib-dashboard.json"
    assert json.loads(installed.read_text()) == json.loads(DASHBOARD.read_text())
    assert installed.read_bytes() == DASHBOARD.read_bytes()
    assert installed.stat().st_mode & 0o777 == 0o644
    provider = yaml.safe_load((grafana / "provisioning" / "dashboards" / "marslib.yml")
                              .read_text())
    [prov] = provider["providers"]
    assert prov["type"] == "file" and prov["folder"] == "marslib"
    assert prov["options"]["path"] == str(installed.parent)
    datasources = yaml.safe_load((grafana / "provisioning" / "datasources" / "marslib.yml")
                                 .read_text())
    assert datasources["datasources"] == [{
        "name": "Prometheus", "type": "prometheus", "access": "proxy", "orgId": 1,
        "url": "http://prometheus.example:9090", "isDefault": False, "editable": False}]
    assert tree(dropped).keys() == tree(grafana).keys()
    # a restart was asked for, but there is no such service: the handler stays quiet
    assert re.search(r"RUNNING HANDLER \[marslib\.mars\.mars_grafana : Restart Grafana\] "
                     r"\**\nskipping: \[localhost\]", dropping.out), dropping.out

    before = tree(grafana)
    again, without = (finished(run) for run in [
        role_run(tmp_path, grafana, *prometheus),
        role_run(tmp_path, dropped)])  # no Prometheus URL any more
    assert again.changed == 0, again.out
    assert tree(grafana) == before

    # the datasource this role wrote goes; the rest stays
    assert without.changed == 1, without.out
    assert not (dropped / "provisioning" / "datasources" / "marslib.yml").exists()
    assert set(tree(dropped)) == set(before) - {"provisioning/datasources/marslib.yml"}
