"""Static checks of deploy/: our CI has no Docker engine, so the files are parsed, not run."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

# The medfed sub-commands the deploy files may run; flags are checked by medfed's own parser.
MEDFED_SUBCOMMANDS = {"certs init", "certs hospital", "pretrain", "server", "client", "pull",
                      "predict", "evaluate", "healthcheck"}  # fmt: skip
# Flower options and ports that 1.42 no longer uses (one SuperLink port now).
RETIRED_FLOWER = ["--fleet-api-address", "--control-api-address", "--fleet-api-type",
                  "9091", "9092", "9093"]  # fmt: skip
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*)|:?\?[^}]*)?\}")


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _interpolate(text: str) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` from .env.example."""
    env = _env_example()
    return _INTERPOLATION.sub(lambda m: env.get(m[1]) or m[2] or "", text)


def _check_medfed_args(args: list[str], where: str) -> None:
    """The sub-command is one we expect, and medfed's real parser accepts the whole line."""
    from medfed.cli import build_parser

    sub = " ".join(args[:2]) if args[:1] == ["certs"] else args[0]
    assert sub in MEDFED_SUBCOMMANDS, f"{where}: unexpected medfed sub-command {sub!r}"
    try:
        build_parser().parse_args([_interpolate(a) for a in args])
    except SystemExit as err:  # argparse printed why on stderr
        pytest.fail(f"{where}: `medfed {' '.join(args)}` is rejected by medfed's parser ({err})")


def _readme_command_lines() -> list[list[str]]:
    """Shell commands in README.md code blocks, continuation lines joined, comments dropped."""
    commands, block, current = [], False, ""
    for line in (DEPLOY / "README.md").read_text().splitlines():
        if line.startswith("```"):
            block = not block and line.strip() == "```bash"
            continue
        if not block:
            continue
        current += line.split(" #")[0].rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            if current.strip() and not current.lstrip().startswith("#"):
                commands.append(shlex.split(current))
            current = ""
    return commands


def _env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(type, source) of each volume entry, short or long syntax."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            mounts.append((entry["type"], entry["source"]))
        else:
            source = entry.split(":")[0] if not entry.startswith("${") else entry.split("}")[0]
            kind = "bind" if source.startswith((".", "/", "${")) else "volume"
            mounts.append((kind, source))
    return mounts


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


# ---------------------------------------------------------------------------- compose


def test_compose_has_the_setup_server_and_hospital_services() -> None:
    services = _services()
    assert {"certs", "superlink", "hospital-a", "hospital-b"} <= services.keys()
    assert services["certs"]["profiles"] == ["setup"]


@pytest.mark.parametrize("name", sorted(_services()))
def test_compose_service_runs_a_known_medfed_command(name: str) -> None:
    command = _services()[name]["command"]
    assert isinstance(command, list), f"{name}: use the list form of command"
    _check_medfed_args(command, f"service {name}")


def test_compose_hospitals_use_their_own_cert_folder_and_name() -> None:
    for name in ("hospital-a", "hospital-b"):
        command = _services()[name]["command"]
        options = dict(zip(command[1::2], command[2::2], strict=False))
        assert options["--name"] == name
        assert options["--certs"] == f"/certs/hospitals/{name}"
        assert options["--server"] == "superlink:8000"


def test_compose_server_publishes_flower_and_registry_ports() -> None:
    ports = _services()["superlink"]["ports"]
    targets = sorted(int(p.rsplit(":", 1)[1]) for p in ports)
    assert targets == [8000, 8443]


def test_compose_host_files_and_named_volumes_exist() -> None:
    declared = set(_compose().get("volumes", {}))
    for name, service in _services().items():
        for kind, source in _mounts(service):
            if "${" in source:
                continue  # a path from .env: checked by the variable test
            if kind == "bind":
                assert (DEPLOY / source).exists(), f"service {name}: {source} does not exist"
            else:
                assert source in declared, f"service {name}: volume {source} is not declared"


def test_compose_build_context_and_dockerfile_exist() -> None:
    for name, service in _services().items():
        build = service["build"]
        context = DEPLOY / build["context"]
        assert context.is_dir(), f"service {name}: build context {context}"
        assert (context / build["dockerfile"]).is_file(), f"service {name}: dockerfile"


def test_compose_variables_are_defined_in_env_example() -> None:
    used = set(_VAR.findall(COMPOSE.read_text()))
    assert used, "the variable pattern matched nothing"
    defined = set(_env_example())
    assert used <= defined, f"missing from .env.example: {used - defined}"


def test_env_example_has_no_unused_variables() -> None:
    used = set(_VAR.findall(COMPOSE.read_text()))
    defined = set(_env_example())
    assert defined <= used, f"unused in docker-compose.yml: {defined - used}"


def test_hospitals_file_lists_every_compose_hospital() -> None:
    entries = yaml.safe_load((DEPLOY / "hospitals.yaml").read_text())
    assert {(e["name"], e["public_key"]) for e in entries} == {
        (h, f"/certs/hospitals/{h}/node_key.pub") for h in ("hospital-a", "hospital-b")
    }


def _hospital_services() -> list[str]:
    return sorted(n for n, s in _services().items() if s["command"][:1] == ["client"])


def _server_options() -> tuple[list[str], dict[str, str]]:
    command = [_interpolate(a) for a in _services()["superlink"]["command"]]
    return command, dict(zip(command[1::2], command[2::2], strict=False))


def test_compose_min_nodes_matches_the_hospitals_it_runs() -> None:
    """The server waits for min_nodes hospitals: exactly those the file starts and admits."""
    from common.config_check import load_config

    command, options = _server_options()
    overrides = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
    cfg = load_config(ROOT / options["--config"], overrides)
    admitted = yaml.safe_load((DEPLOY / "hospitals.yaml").read_text())
    assert cfg.federation.strategy.min_nodes == len(_hospital_services()) == len(admitted)


def test_compose_hospitals_start_once_the_server_is_healthy() -> None:
    server = _services()["superlink"]
    _, options = _server_options()
    health = server["healthcheck"]["test"]
    assert health[0] == "CMD" and health[1] == "medfed"
    _check_medfed_args(health[2:], "superlink healthcheck")
    checked = dict(zip(health[3::2], health[4::2], strict=False))
    assert checked["--port"] == options["--health-port"]  # the port the SuperLink serves
    assert checked["--run-dir"] == options["--run-dir"]
    for name in _hospital_services():
        assert _services()[name]["depends_on"] == {"superlink": {"condition": "service_healthy"}}


def test_compose_server_restart_resumes_its_run() -> None:
    server = _services()["superlink"]
    command, _ = _server_options()
    assert server["restart"] in ("unless-stopped", "always", "on-failure")
    assert "--resume" in command


# ---------------------------------------------------------------------------- Dockerfile


def test_dockerfile_starts_from_python_slim() -> None:
    instructions = _dockerfile_instructions(DOCKERFILE)
    assert instructions[0] == ("FROM", "python:3.11-slim")


def test_dockerfile_copy_sources_exist_in_the_build_context() -> None:
    copies = [args.split() for kind, args in _dockerfile_instructions(DOCKERFILE) if kind == "COPY"]
    assert copies
    for args in copies:
        sources = [a for a in args if not a.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} is not in the repository"


def test_dockerignore_lets_every_copy_source_through() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].removesuffix("/**") for line in ignore if line.startswith("!")}
    for kind, args in _dockerfile_instructions(DOCKERFILE):
        if kind == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            assert set(sources) <= allowed, f"excluded from the build context: {sources}"


def test_dockerfile_runs_medfed_as_a_non_root_user() -> None:
    instructions = dict(_dockerfile_instructions(DOCKERFILE))
    assert json.loads(instructions["ENTRYPOINT"]) == ["medfed"]
    assert instructions["USER"] not in ("root", "0")


def test_a_hospitals_work_volume_starts_readable_by_its_user_only() -> None:
    """The compose hospitals keep patient-derived features in --workdir; a named volume takes
    the image folder's mode, and `medfed client` warns about a work directory others can
    read: the image makes that folder 0700."""
    workdirs = {svc["command"][svc["command"].index("--workdir") + 1]
                for svc in _services().values() if "--workdir" in svc.get("command", [])}
    assert workdirs == {"/work"}
    runs = " ".join(args for kind, args in _dockerfile_instructions(DOCKERFILE) if kind == "RUN")
    assert "chmod 700 /work" in runs


def test_dockerfile_installs_torch_from_the_build_arg_index() -> None:
    runs = [args for kind, args in _dockerfile_instructions(DOCKERFILE) if kind == "RUN"]
    args = {a.split("=")[0] for k, a in _dockerfile_instructions(DOCKERFILE) if k == "ARG"}
    assert {"TORCH_SPEC", "TORCH_INDEX"} <= args
    assert '--index-url "${TORCH_INDEX}" "${TORCH_SPEC}"' in runs[0]
    assert any("pip install ." in run for run in runs[1:])


# ---------------------------------------------------------------------------- README


@pytest.mark.parametrize("name", ["README.md", "docker-compose.yml", "Dockerfile", ".env.example"])
def test_deploy_files_mention_no_retired_flower_options(name: str) -> None:
    text = (DEPLOY / name).read_text()
    assert [word for word in RETIRED_FLOWER if word in text] == []


def test_readme_medfed_commands_parse() -> None:
    checked = 0
    services = set(_services())
    for args in _readme_command_lines():
        if args[0] == "medfed":
            _check_medfed_args(args[1:], "README")
            checked += 1
        elif args[:3] == ["docker", "compose", "run"]:
            # `docker compose run [options] SERVICE medfed-args...` (the entry point is medfed)
            rest = args[3:]
            at = next(i for i, a in enumerate(rest) if a in services)
            _check_medfed_args(rest[at + 1 :], "README (docker compose run)")
            checked += 1
    assert checked >= 7
