"""The ops files cannot drift from the code.

Compose services, systemd units, the env example, the runbook and the mapping cookbook name
subcommands, flags, settings, queues, error classes and mapping keys; each is checked here
against the real parser, settings class, queue enum, exception tree and mapping parser. The
cookbook's mappings are also run against its example tables in SQLite. The Prometheus alert
rules and the Grafana dashboard name metrics: each is checked against worker/metrics.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from worker import errors
from worker.cli import build_parser
from worker.queues import Queue
from worker.settings import Settings
from worker.source.mapping import parse_mapping
from worker.source.reader import SourceReader

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"
COMPOSE = OPS / "compose.yaml"
DOCKERFILE = OPS / "Dockerfile"
RUNBOOK = OPS / "RUNBOOK.md"
SYSTEMD = OPS / "systemd"
ENV_EXAMPLE = SYSTEMD / "crmsync.env.example"
UNITS = [SYSTEMD / "crmsync-worker@.service", SYSTEMD / "crmsync-beat.service"]
ADMIN = SYSTEMD / "crmsync-admin"
PROMETHEUS = OPS / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
DASHBOARD = OPS / "grafana" / "crmsync.json"
COOKBOOK = ROOT / "docs" / "mapping-cookbook.md"

SETTING_NAMES = {f"CRMSYNC_{name.upper()}" for name in Settings.model_fields}
SUBCOMMANDS = set(next(a for a in build_parser()._actions if a.dest == "command").choices)  # type: ignore[arg-type]


def parse_cli(argv: list[str], where: str) -> argparse.Namespace:
    """Parse `crmsync` arguments with the real parser; a refusal fails the test, naming `where`."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `crmsync {shlex.join(argv)}` is refused by worker.cli.build_parser()")


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def dockerfile_entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.M)
    assert match, "ops/Dockerfile has no exec-form ENTRYPOINT"
    entrypoint = json.loads(match.group(1))
    assert isinstance(entrypoint, list)
    return [str(a) for a in entrypoint]


def uses_crmsync_image(service: dict[str, Any]) -> bool:
    build = service.get("build") or {}
    return isinstance(build, dict) and build.get("dockerfile") == "ops/Dockerfile"


def effective_argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: the entrypoint (the service's, else the Dockerfile's) + command."""
    entrypoint = service.get("entrypoint")
    if entrypoint is None:
        entrypoint = dockerfile_entrypoint() if uses_crmsync_image(service) else []
    if isinstance(entrypoint, str):
        entrypoint = shlex.split(entrypoint)
    command = service.get("command") or []
    if isinstance(command, str):
        command = shlex.split(command)
    return [str(a) for a in [*entrypoint, *command]]


# -- compose and Dockerfile -------------------------------------------------------------------------


def test_compose_parses_and_has_every_service() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "crmsync-init", "worker", "beat", "flower"} <= set(services)
    for name in ("crmsync-init", "worker", "beat", "flower"):
        assert uses_crmsync_image(services[name]), f"{name} is not built from ops/Dockerfile"
        assert services[name]["build"]["context"] == "..", name
    assert (OPS / services["worker"]["build"]["dockerfile"].removeprefix("ops/")).exists()


def test_every_crmsync_command_in_compose_is_a_real_subcommand() -> None:
    services = compose()["services"]
    checked = 0
    for name, service in services.items():
        argv = effective_argv(service)
        if argv[:1] == ["crmsync"]:
            parse_cli(argv[1:], f"compose service {name}")
            checked += 1
    assert checked >= 3  # init, worker, beat
    assert effective_argv(services["crmsync-init"])[:2] == ["crmsync", "init"]
    assert effective_argv(services["worker"])[:2] == ["crmsync", "worker"]
    assert effective_argv(services["beat"])[:2] == ["crmsync", "beat"]


def test_compose_roles_restarts_and_healthchecks() -> None:
    data = compose()
    services = data["services"]
    assert services["beat"]["deploy"]["replicas"] == 1, "beat must run exactly once"
    assert "container_name" not in services["worker"], "a container_name would forbid --scale worker=N"
    assert services["crmsync-init"]["restart"] == "no"
    for name in ("worker", "beat"):
        deps = services[name]["depends_on"]
        assert deps["crmsync-init"]["condition"] == "service_completed_successfully", name
    for name in ("redis", "postgres", "worker", "beat", "flower"):
        assert services[name].get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["flower"].get("profiles"), "flower is optional: it needs a profile"
    assert effective_argv(services["flower"])[:4] == ["celery", "-A", "worker.celery_app", "flower"]
    assert importlib.util.find_spec("worker.celery_app") is not None


def test_compose_mounts_the_token_as_a_secret_file() -> None:
    data = compose()
    secrets = data["secrets"]
    for name in ("crmsync-init", "worker", "beat"):
        service = data["services"][name]
        env = service["environment"]
        assert "CRMSYNC_PROTO_TOKEN" not in env, f"{name}: the token must come from a file"
        token_file = env["CRMSYNC_PROTO_TOKEN_FILE"]
        assert token_file.startswith("/run/secrets/"), name
        secret = token_file.removeprefix("/run/secrets/")
        assert secret in service["secrets"] and secret in secrets, name
        assert service["env_file"], f"{name} takes the CRMSYNC_ settings from an env file"
    assert "CRMSYNC_PROTO_TOKEN=" not in COMPOSE.read_text()


def test_worker_grace_period_outlasts_a_task() -> None:
    grace = compose()["services"]["worker"]["stop_grace_period"]
    match = re.fullmatch(r"(\d+)(s|m|h)", str(grace))
    assert match, grace
    seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]
    assert seconds >= longest_task_seconds(), "warm shutdown would be cut short by SIGKILL"


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as non-root"
    assert dockerfile_entrypoint() == ["crmsync"]
    # worker/state/db.py finds the Alembic migrations beside the package: an editable
    # install of a copy of the repository keeps `crmsync init` working in the image.
    assert "COPY migrations" in text and "pip install -e ." in text


# -- settings named anywhere ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE, ENV_EXAMPLE, RUNBOOK, COOKBOOK, *UNITS, ADMIN], ids=lambda p: p.name)
def test_every_crmsync_variable_named_is_a_real_setting(path: Path) -> None:
    named = set(re.findall(r"\bCRMSYNC_[A-Z0-9_]+", path.read_text()))
    unknown = sorted(named - SETTING_NAMES)
    assert not unknown, f"{path.name} names settings that worker.settings.Settings does not have: {unknown}"


def env_example_entries() -> dict[str, str]:
    """Each setting of the env example -> the comment lines written above its first line."""
    entries: dict[str, str] = {}
    comment: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        setting = re.match(r"^#?(CRMSYNC_[A-Z0-9_]+)=", line)
        if setting:
            entries.setdefault(setting.group(1), " ".join(comment))
            comment = []
        elif line.startswith("#"):
            comment.append(line.lstrip("#").strip())
        else:
            comment = []
    return entries


def test_env_example_lists_every_setting_with_a_comment_and_its_default() -> None:
    entries = env_example_entries()
    assert set(entries) == SETTING_NAMES, (
        f"missing: {sorted(SETTING_NAMES - set(entries))}, unknown: {sorted(set(entries) - SETTING_NAMES)}"
    )
    for name, field in Settings.model_fields.items():
        comment = entries[f"CRMSYNC_{name.upper()}"]
        assert comment, f"CRMSYNC_{name.upper()} has no comment"
        if field.default is None:
            continue
        match = re.search(r'Default: ("[^"]*"|\S+)', comment)
        assert match, f"CRMSYNC_{name.upper()}: say its default"
        written = match.group(1).strip('"')
        default = field.default
        same = type(default)(written) == default if isinstance(default, int | float) else written == str(default)
        assert same, f"CRMSYNC_{name.upper()}: the example says default {written}, the code has {default}"


def test_env_example_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from dotenv import dotenv_values

    values = {k: v for k, v in dotenv_values(ENV_EXAMPLE).items() if v is not None}
    assert "CRMSYNC_PROTO_TOKEN" not in values, "the example must not set the token itself"
    assert values["CRMSYNC_PROTO_TOKEN_FILE"]
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"CRMSYNC_{name.upper()}", raising=False)
    for key, value in values.items():
        if key != "CRMSYNC_PROTO_TOKEN_FILE":  # a path on the target host
            monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert settings.broker_url and settings.broker_url.startswith("redis://")


# -- systemd ----------------------------------------------------------------------------------------


def unit_values(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file (keys may repeat), sections ignored."""
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def longest_task_seconds() -> int:
    """The longest a sync task may run, by the code's own settings."""
    field = Settings.model_fields.get("task_time_limit")
    return int(field.default) if field is not None else 300


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_units_start_real_commands_and_are_hardened(path: Path) -> None:
    values = unit_values(path)
    (exec_start,) = values["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/crmsync"), exec_start
    args = parse_cli(argv[1:], path.name)
    assert args.command == ("worker" if "worker" in path.name else "beat")
    assert values["Restart"] == ["on-failure"]
    assert values["KillSignal"] == ["SIGTERM"]
    assert values["NoNewPrivileges"] == ["yes"]
    assert values["ProtectSystem"] == ["strict"]
    assert values["PrivateTmp"] == ["yes"]
    assert values["User"] == ["crmsync"]
    (workdir,) = values["WorkingDirectory"]
    assert workdir in values["ReadWritePaths"], "the state directory must stay writable"
    for env_file in values["EnvironmentFile"]:
        assert env_file.lstrip("-").startswith("/etc/crmsync/"), env_file
    if args.command == "worker":
        assert "@" in path.name, "the worker unit is a template: several instances per host"
        (timeout,) = values["TimeoutStopSec"]
        assert int(timeout) >= longest_task_seconds() + 60, "warm shutdown needs time for tasks in flight"


def test_admin_wrapper_runs_the_units_binary_with_their_settings() -> None:
    text = ADMIN.read_text()
    binaries = {shlex.split(unit_values(u)["ExecStart"][0])[0] for u in UNITS}
    assert len(binaries) == 1
    assert f'{binaries.pop()} "$@"' in text
    assert "EnvironmentFile=/etc/crmsync/crmsync.env" in text


# -- commands in the docs ---------------------------------------------------------------------------

_COMMAND = re.compile(
    r"(?:^\s*(?:\$\s+)?crmsync|(?:^|\s)(?:sudo\s+)?crmsync-admin|(?:^|\s)exec(?:\s+-T)?\s+worker\s+crmsync"
    r"|(?:^|\s)run\s+--rm\s+worker)\s+(?P<args>\S.*)$"
)


def crmsync_commands(text: str) -> Iterator[list[str]]:
    """The arguments of every crmsync command written in `text` (code blocks and comments)."""
    for line in text.splitlines():
        match = _COMMAND.search(line)
        if not match:
            continue
        args = []
        for token in shlex.split(match.group("args"), comments=True):
            if token in ("|", "&&", ";", ">", "||"):
                break
            args.append(token)
        yield args


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


@pytest.mark.parametrize("path", [RUNBOOK, COMPOSE, ADMIN, *UNITS], ids=lambda p: p.name)
def test_every_crmsync_command_in_the_ops_files_parses(path: Path) -> None:
    text = path.read_text()
    if path.suffix == ".md":
        text = "\n".join(code_blocks(text, "sh"))
    commands = list(crmsync_commands(text))
    for args in commands:
        if args and (args[0] in SUBCOMMANDS or args[0].startswith("-")):
            parse_cli(args, path.name)
        else:
            pytest.fail(f"{path.name}: `crmsync {shlex.join(args)}`: not a subcommand of crmsync")
    if path == RUNBOOK:
        used = {args[0] for args in commands} | {args[1] for args in commands if args[0] == "dlq"}
        wanted = {"init", "check", "status", "sync", "dlq", "list", "show", "replay", "discard"}
        assert wanted <= used, f"the runbook does not show: {sorted(wanted - used)}"


def test_runbook_covers_the_operations_and_marks_what_is_planned() -> None:
    text = RUNBOOK.read_text()
    for flag in ("--dry-run", "--force", "--all", "--error-class", "--as-recorded"):
        assert flag in text, flag
    for queue in Queue:
        assert queue.value in text, queue.value
    for name in re.findall(r"llen (\S+)", text):
        assert name in {q.value for q in Queue}, f"no queue named {name}"
    planned = re.split(r"^## \d+\. Planned \(not built yet\)", text, flags=re.M)[1]
    bullets = re.split(r"^- ", planned, flags=re.M)[1:]
    assert all("planned" in b for b in bullets), "every item of the Planned section is marked planned"
    for thing in ("Metrics", "Alerts"):  # built: they have a section of their own
        assert not any(b.startswith(f"**{thing}**") for b in bullets), f"{thing} exist: not planned any more"
    assert "## 11. Metrics and alerts" in text


def test_error_classes_in_the_runbook_exist() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "worker").rglob("*.py"))
    found = re.findall(r"\b([A-Z][A-Za-z]+)\.(\d{3}\b|5xx\b|\*|[a-z_]+\b)", RUNBOOK.read_text())
    classes = {c for c, _ in found if hasattr(errors, c)}
    assert {"AuthError", "PermanentError", "InvalidRecord"} <= classes
    for cls, detail in found:
        if not cls.endswith(("Error", "Record", "Limited")):
            continue
        assert isinstance(getattr(errors, cls, None), type), f"no error class {cls}"
        if cls == "InvalidRecord" and detail != "*":
            assert f'"{detail}"' in source, f"no InvalidRecord code {detail!r} in worker/"


# -- the mapping cookbook ---------------------------------------------------------------------------


def cookbook_sections() -> list[tuple[str, list[str], list[str]]]:
    """(title, SQL blocks, YAML blocks) of each `## ` section of the cookbook."""
    out = []
    for part in re.split(r"^## ", COOKBOOK.read_text(), flags=re.M)[1:]:
        title = part.splitlines()[0]
        out.append((title, code_blocks(part, "sql"), code_blocks(part, "yaml")))
    return out


def test_the_cookbook_covers_the_usual_shapes() -> None:
    text = COOKBOOK.read_text()
    assert sum(len(y) for _, _, y in cookbook_sections()) >= 7
    for needle in ("email_addr_bean_rel", "types:", "deleted:", "tags:\n  query:", "reserved"):
        assert needle in text, needle


@pytest.mark.parametrize(
    "section", [s for s in cookbook_sections() if s[2]], ids=lambda s: s[0].split(" ", 1)[0].rstrip(".")
)
def test_cookbook_mappings_parse_and_read_their_example_tables(section: tuple[str, list[str], list[str]]) -> None:
    title, sqls, yamls = section
    for block in yamls:
        located = parse_mapping(block, f"mapping-cookbook.md ({title})")
        mapping = located.mapping
        if not sqls:
            continue
        engine = sa.create_engine("sqlite://")
        with engine.begin() as conn:
            for sql in sqls:
                conn.connection.executescript(sql)
        reader = SourceReader(engine, mapping, batch_size=2)  # small pages: keyset paging is exercised
        columns = set(reader.columns())
        missing = [col for col, _ in mapping.columns_used() if col not in columns]
        assert not missing, f"{title}: columns the query does not return: {missing}"
        pages = list(reader.pages())
        contacts = [c for p in pages for c in p.contacts]
        invalid = [(r.key, str(r.error)) for p in pages for r in p.invalid]
        assert contacts and not invalid, f"{title}: {invalid or 'no contact read'}"
        assert len({c.key for c in contacts}) == len(contacts)
        if mapping.tags and mapping.tags.query:
            assert any(c.tags for c in contacts), f"{title}: the tag query gave no tag"
        if mapping.field_queries:
            assert any(set(c.fields) - {f.name for f in mapping.column_fields} for c in contacts), title
        if mapping.source.updated_at:
            recent = [c for p in reader.pages(since=dt.datetime(2000, 1, 1)) for c in p.contacts]
            assert len(recent) == len(contacts), f"{title}: the incremental read differs"


# -- Prometheus and Grafana -------------------------------------------------------------------------

_METRIC = re.compile(r"\bcrmsync_[a-z_]+\b")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposed_metrics() -> set[str]:
    """Every series name worker/metrics.py exposes (counters with _total, histograms' parts)."""
    from prometheus_client.metrics import MetricWrapperBase

    from worker import metrics

    names = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase | metrics.ScrapeTimeGauge):
            for family in obj.describe():
                names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alert_rules_parse_and_name_only_metrics_that_exist() -> None:
    exposed = exposed_metrics()
    assert {"crmsync_api_calls_total", "crmsync_queue_depth", "crmsync_runs_degraded_total"} <= exposed
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    wanted = {
        "CrmsyncRunDegraded",
        "CrmsyncDeadLettersPilingUp",
        "CrmsyncIncrementalLagHigh",
        "CrmsyncBreakerOpen",
        "CrmsyncNoSuccessfulIncrementalRun",
    }
    assert wanted <= names, sorted(wanted - names)
    runbook = RUNBOOK.read_text()
    for rule in rules:
        named = set(_METRIC.findall(rule["expr"]))
        assert named, f"{rule['alert']} names no crmsync metric"
        assert named <= exposed, f"{rule['alert']}: no such metric {sorted(named - exposed)}"
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule["alert"] in runbook, f"the runbook does not say what {rule['alert']} means"


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    exposed = exposed_metrics()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        named = set(_METRIC.findall(expr))
        assert named and named <= exposed, expr
        used |= named
    # Every metric has a panel (a histogram's through one of its parts).
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exposed}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert families == shown, sorted(families - shown)


def test_prometheus_scrapes_the_ports_workers_and_beat_serve() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert all((PROMETHEUS / f).exists() for f in config["rule_files"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose()["services"]
    for role, job in (("worker", jobs["crmsync-worker"]), ("beat", jobs["crmsync-beat"])):
        args = parse_cli(effective_argv(services[role])[1:], f"compose service {role}")
        ports = {sd["port"] for sd in job.get("dns_sd_configs", [])} | {
            int(target.rsplit(":", 1)[1]) for sc in job.get("static_configs", []) for target in sc["targets"]
        }
        assert ports == {args.metrics_port}, role
    for unit in UNITS:
        argv = shlex.split(unit_values(unit)["ExecStart"][0])
        assert parse_cli(argv[1:], unit.name).metrics_port in (9808, 9809), unit.name
    assert {"prometheus", "grafana", "flower"} <= set(services)


def test_promtool_accepts_the_rules_and_the_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus): the rules were only parsed as YAML")
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(PROMETHEUS / "prometheus.yml")]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
