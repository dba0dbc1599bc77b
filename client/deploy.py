"""`medfed client`: the hospital's Flower SuperNode with its node key, the federation CA and
its node config (site name, data path, work directory, the server's signing key), run like a
service.

Flower's own output goes to `<workdir>/supernode.log`; the terminal shows the hospital's
events (`client/events.py`) and Flower's warnings. The usual failures each end in one
sentence: not registered (after waiting for registration with backoff), wrong CA, TLS mode
mismatch, server unreachable or gone (after a bounded wait), data that does not match the
model. Every process the SuperNode starts is stopped with it, also when `medfed client` is
killed (`common.processes`).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from client import events
from common import records as rk
from common.address import parse_address
from common.certs import HOSPITAL_NAME, HospitalPaths, check_hospital_certs
from common.data.schema import DataError
from common.device import resolve_device
from common.names import printable
from common.processes import (
    ProcessGroup,
    bind_problem,
    flwr_env,
    free_port,
    interrupt_on_sigterm,
    kill_stale_groups,
)
from common.settings import medfed_home

EXIT_DATA = 2  # bad input, like `medfed check-data`
EXIT_FAILED = 3
REGISTRATION_BACKOFF_S = (5.0, 10.0, 20.0, 30.0, 60.0)  # then 60 s until the wait is over
SUPERNODE_LOG = "supernode.log"
REFUSAL_LINGER_S = 45.0  # online this long after a data refusal was sent (see _watch_refusal)
# every terminal control sequence (CSI, OSC, two-character escapes): Flower colours its
# records, and the ClientApp's tracebacks may echo server-sent text
ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -/]*[0-~])")
# the start of one of Flower's log records ("ERROR :     ...", with or without a timestamp)
RECORD = re.compile(r"(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [^:]*: ")
CLIENTAPP_RAISED = "ClientApp raised an exception"  # flwr supernode/runtime/run_clientapp.py
RELAY_LIMIT = 1000  # characters of one relayed Flower line on the terminal


@dataclass(frozen=True)
class ClientRequest:
    """The `medfed client` command line, checked."""

    server: str
    data: Path
    test_data: Path | None
    certs: Path | None
    name: str
    device: str
    workdir: Path
    port: int  # local ClientAppIo port; 0: pick a free one
    insecure: bool
    max_retries: int
    model: Path | None = None  # a bundle to check the data against before joining
    wait_registration: float = 600.0  # seconds to keep trying while not registered
    give_up_after: float = 600.0  # seconds without the server before giving up (0: never)
    verbose: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClientRequest:
        """From the parsed `medfed client` arguments."""
        return cls(
            server=args.server, data=args.data.resolve(),
            test_data=args.test_data.resolve() if args.test_data else None,
            certs=args.certs, name=args.name,
            device=args.device, workdir=(args.workdir or medfed_home() / args.name).resolve(),
            port=args.port, insecure=args.insecure, max_retries=args.max_retries,
            model=args.model, wait_registration=args.wait_registration,
            give_up_after=args.give_up_after, verbose=args.verbose,
        )


def signing_pub(certs: HospitalPaths | None) -> Path:
    """Where the hospital keeps the federation's public key (`signing.pub`)."""
    return certs.signing_pub if certs is not None else medfed_home() / "signing.pub"


def _toml_string(flag: str, value: str) -> str:
    """`value` as a TOML string that flower-supernode's `--node-config` reads back unchanged.

    Flower splits the option with `key='...'` or `key="..."` (no escaped quotes inside) and
    parses each with TOML: a literal string keeps backslashes as they are; a value with a
    single quote goes in a basic string, backslashes escaped."""
    if not value.isprintable():
        raise ValueError(f"{flag} {printable(repr(value), 120)} holds a control character "
                         "(a newline?) and cannot be passed to flower-supernode; rename it")
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return '"' + value.replace("\\", "\\\\") + '"'
    raise ValueError(f"{flag} {printable(repr(value), 120)} holds both kinds of quote and "
                     "cannot be passed to flower-supernode; rename it")


def _node_config(req: ClientRequest, certs: HospitalPaths | None) -> str:
    values = {
        "site-name": ("--name", req.name), "data-path": ("--data", str(req.data)),
        "workdir": ("--workdir", str(req.workdir)), "device": ("--device", req.device),
        "signing-pub": ("the federation key path", str(signing_pub(certs).resolve())),
    }
    if req.test_data is not None:
        values["test-path"] = ("--test-data", str(req.test_data))
    return " ".join(f"{k}={_toml_string(flag, v)}" for k, (flag, v) in values.items())


def supernode_cmd(req: ClientRequest, certs: HospitalPaths | None, port: int | None = None
                  ) -> list[str]:
    """The `flower-supernode` command line for this hospital."""
    cmd = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", req.server,
           "--node-config", _node_config(req, certs), "--port", str(port or req.port)]
    if req.max_retries > 0:
        cmd += ["--max-retries", str(req.max_retries)]
    if req.give_up_after > 0:
        cmd += ["--max-wait-time", str(req.give_up_after)]
    if certs is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", str(certs.ca_cert),
            "--auth-supernode-private-key", str(certs.node_key)]


def _check(req: ClientRequest) -> HospitalPaths | None:
    """Everything that can be checked before a process starts; raises with one sentence."""
    if not HOSPITAL_NAME.fullmatch(req.name):  # as the server names hospitals
        raise ValueError(f"--name {printable(repr(req.name), 80)} is invalid; expected 1-63 "
                         "lowercase letters, digits or '-', starting with a letter or digit")
    # Flower's SuperNode would only fail to connect (a URL, a space, no port), after retries
    parse_address(req.server, "--server", default_port=None)
    for flag, value in (("--give-up-after", req.give_up_after),
                        ("--wait-registration", req.wait_registration),
                        ("--max-retries", req.max_retries)):
        if not value >= 0:
            raise ValueError(f"{flag} must be 0 or more, got {value:g}")
    if req.workdir.exists() and not req.workdir.is_dir():
        raise ValueError(f"--workdir {req.workdir} is a file; give a directory (this "
                         "hospital's models, logs and caches go there)")
    if not req.data.exists():
        raise DataError(f"data file {req.data} does not exist")
    if req.test_data is not None and not req.test_data.exists():
        raise DataError(f"test data file {req.test_data} does not exist")
    if req.certs is None and not req.insecure:
        raise ValueError("refusing to start without certificates: pass --certs DIR (made by "
                         "`medfed certs hospital`) or --insecure for a local test")
    problem = bind_problem("127.0.0.1", req.port) if req.port else None
    if problem == "is in use":
        raise ValueError(f"local port {req.port} (--port) is in use, perhaps by another "
                         "hospital's client on this host; leave --port out to pick a free one")
    if problem is not None:
        raise ValueError(f"local port {req.port} (--port) {problem}")
    # the ClientApp would otherwise find an unknown or absent device only in round 1
    resolve_device(req.device)
    certs = None if req.insecure else check_hospital_certs(req.certs)  # type: ignore[arg-type]
    pub = signing_pub(certs)
    _node_config(req, certs)  # a path flower-supernode could not read back: refused now
    if not pub.exists():
        raise ValueError(f"refusing to start: the federation's public key {pub} is missing; "
                         "copy the server's signing.pub there (every backbone and model the "
                         "server sends is verified with it)")
    return certs


def _preflight(req: ClientRequest, certs: HospitalPaths | None) -> None:
    """With `--model`: the data must pass `medfed check-data` before the node joins."""
    if req.model is None:
        return
    from client.check_data import check_data  # imports torch: only when asked

    result = check_data(req.model, req.data, "training", signing_pub(certs),
                        test_data=req.test_data)
    events.emit(req.workdir, "data-ok", name=req.name, model=str(req.model),
                summary=result.summary())
    for warning in result.warnings:
        events.emit(req.workdir, "waiting", name=req.name, message=f"warning: {warning}")


@dataclass(frozen=True)
class Verdict:
    """Why a SuperNode stopped: `kind` decides what happens next, `message` is the sentence."""

    kind: str  # not-registered | no-key | wrong-ca | tls-mismatch | unreachable | lost | data
    message: str


def classify(line: str, req: ClientRequest) -> Verdict | None:
    """The fatal condition a SuperNode log line reveals, if any."""
    certs = req.certs
    if "code: 2004" in line or "Failed to activate SuperNode" in line:
        return Verdict("not-registered", "the server refused this hospital's node key: it is not "
                       f"registered (send {certs}/node_key.pub to the federation operator)")
    if "code: 2001" in line:
        return Verdict("no-key", "the server requires a registered node key and none was offered")
    if "CERTIFICATE_VERIFY_FAILED" in line or "certificate verify failed" in line:
        return Verdict("wrong-ca", "the server's certificate is not signed by the federation CA "
                       f"in {certs}/ca.crt (wrong CA or wrong server)")
    if "WRONG_VERSION_NUMBER" in line:
        return Verdict("tls-mismatch", f"the server at {req.server} does not use TLS but this "
                       "hospital does: the operator must start it with --certs (or, for a "
                       "local test only, both sides with --insecure)")
    if req.insecure and "Server disconnected without sending a response" in line:
        return Verdict("tls-mismatch", f"the server at {req.server} uses TLS but this hospital "
                       "was started with --insecure: pass --certs DIR instead")
    return None


class Supervisor:
    """One `flower-supernode` attempt: relay its output, classify why it stopped."""

    def __init__(self, req: ClientRequest, certs: HospitalPaths | None, port: int) -> None:
        self.req, self.certs, self.port = req, certs, port
        self.verdict: Verdict | None = None
        self.joined = False
        self.unreachable = False
        self.last_sent = 0.0  # wall-clock time of the SuperNode's last delivered reply
        self._told_unreachable = False
        self._in_clientapp_error = False  # inside the ClientApp's traceback (see _line)

    def _relay(self, proc: subprocess.Popen[str], log_file: Path) -> None:
        assert proc.stdout is not None
        with log_file.open("a", encoding="utf-8") as log:
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                self._line(raw.rstrip("\n"), proc)

    def _line(self, line: str, proc: subprocess.Popen[str]) -> None:
        req = self.req
        line = ANSI.sub("", line)
        if self.req.verbose:
            print(printable(line, RELAY_LIMIT), flush=True)
        if RECORD.match(line):
            # a traceback runs until the next record; it quotes values from server messages
            # (a round number "certificate verify failed"), which must not read as the
            # SuperNode's own failure
            self._in_clientapp_error = line.startswith("ERROR") and CLIENTAPP_RAISED in line
        if self._in_clientapp_error:
            return  # the ClientApp logs its own failure as an event (client_app._logged)
        if "Sent successfully" in line:
            self.last_sent = time.time()
        if self.verdict is not None:
            return  # stopping already: later lines (Flower's SuperExec retrying) are noise
        verdict = classify(line, req)
        if verdict is not None:
            self.verdict = verdict
            proc.terminate()
            return
        if "SuperNode ID:" in line and not self.joined:
            self.joined = True
            events.emit(req.workdir, "joined", name=req.name, node_id=line.split(":")[-1].strip())
        elif "Connection refused" in line or "Errno 111" in line or "Connection attempt failed" \
                in line or "Name or service not known" in line:
            self.unreachable = True
            if not self._told_unreachable:
                self._told_unreachable = True
                limit = (f"for up to {req.give_up_after:.0f} s" if req.give_up_after > 0
                         else "until stopped")
                what = "lost the server" if self.joined else "cannot reach the server"
                events.emit(req.workdir, "waiting", name=req.name,
                            message=f"{what} at {req.server}; retrying {limit}")
        elif not req.verbose and line.startswith(("WARNING", "ERROR")) and "Exit Code" not in line:
            print(f"{datetime.now():%Y-%m-%d %H:%M:%S} {req.name}: flower: "
                  f"{printable(line, RELAY_LIMIT)}", flush=True)

    def _watch_refusal(self, proc: subprocess.Popen[str], refused: Path,
                       linger: float = REFUSAL_LINGER_S) -> None:
        """Stop the SuperNode when the ClientApp found this hospital's data unusable.

        It stays online `linger` seconds after its refusal was sent: the SuperLink answers
        "Node Unavailable" for a node that is gone before the ServerApp pulled its reply, and
        the operator would not learn why the hospital left.
        """
        while proc.poll() is None:
            if refused.exists():
                try:
                    reason = json.loads(refused.read_text(encoding="utf-8"))["reason"]
                except (OSError, ValueError, KeyError):
                    reason = f"see {self.req.workdir / SUPERNODE_LOG}"
                if self.verdict is None:
                    self.verdict = Verdict("data", f"its data does not match the model: {reason}")
                    events.emit(self.req.workdir, "waiting", name=self.req.name, message=(
                        f"{self.verdict.message}; leaving once the server has the refusal"))
                written = refused.stat().st_mtime
                deadline = time.monotonic() + 2 * linger  # if no reply shows up at all
                while proc.poll() is None and time.monotonic() < deadline and (
                        self.last_sent < written or time.time() < self.last_sent + linger):
                    time.sleep(0.2)
                proc.terminate()
                return
            time.sleep(0.5)

    def run(self, group: ProcessGroup) -> int:
        """Start the SuperNode and wait for it; its exit code."""
        req = self.req
        refused = req.workdir / rk.DATA_REFUSED_FILE
        refused.unlink(missing_ok=True)  # a refusal of an earlier start is not this one's
        proc = group.start(supernode_cmd(req, self.certs, self.port),
                           env=flwr_env(req.workdir / "flwr-home"), capture=True)
        relay = threading.Thread(target=self._relay, args=(proc, req.workdir / SUPERNODE_LOG),
                                 daemon=True)
        relay.start()
        threading.Thread(target=self._watch_refusal, args=(proc, refused), daemon=True).start()
        code = proc.wait()
        relay.join(timeout=5)
        if self.verdict is None and code not in (0, -signal.SIGTERM) and self.unreachable:
            # what stopped it: --max-retries can end the wait long before --give-up-after
            attempts = f"{req.max_retries} attempt{'s' if req.max_retries != 1 else ''}"
            waited = (f" after at most {attempts}" if req.max_retries > 0
                      else f" for {req.give_up_after:.0f} s" if req.give_up_after > 0 else "")
            self.verdict = Verdict(
                "lost" if self.joined else "unreachable",
                (f"lost the server at {req.server}: no answer{waited}" if self.joined else
                 f"cannot reach the server at {req.server}{waited}: connection refused or no "
                 "route (is it running, and are the address and port right?)"))
        return int(code)


def _print_events(follower: events.Follower, stop: threading.Event) -> None:
    while not stop.is_set():
        for record in follower.new():
            print(events.line(record), flush=True)
        stop.wait(0.3)
    for record in follower.new():
        print(events.line(record), flush=True)


def _open_to_others(path: Path) -> str | None:
    """How other local users can reach into `path` (with its mode), or None when only its
    owner can."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o007:
        return f"open to every user of this machine (mode {mode:04o})"
    if mode & 0o070:
        return f"open to its group (mode {mode:04o})"
    return None


def _next_wait(attempt: int) -> float:
    return REGISTRATION_BACKOFF_S[min(attempt, len(REGISTRATION_BACKOFF_S) - 1)]


def run_client(req: ClientRequest) -> int:
    """Run the SuperNode until it stops (or Ctrl-C); one sentence on known failures."""
    certs = _check(req)
    # it holds features computed from this hospital's patient rows: this user's alone
    req.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pid_file = req.workdir / "processes.pid"
    kill_stale_groups(pid_file)  # a crashed earlier client; refuses if one is still running
    follower = events.Follower(req.workdir / events.EVENTS_FILE)
    stop = threading.Event()
    printer = threading.Thread(target=_print_events, args=(follower, stop), daemon=True)
    printer.start()
    port = req.port or free_port()
    mode = "INSECURE: no TLS, no node authentication" if certs is None else \
        "TLS, node key " + str(certs.node_key)
    events.emit(req.workdir, "start", name=req.name, server=req.server, data=str(req.data),
                port=port, mode=mode)
    shared = _open_to_others(req.workdir)
    if shared:
        events.emit(req.workdir, "waiting", name=req.name, message=(
            f"warning: --workdir {req.workdir} is {shared}; it holds features computed from "
            f"this hospital's patient rows: chmod 700 {req.workdir}"))
    group = ProcessGroup(pid_file)

    interrupt_on_sigterm()
    verdict: Verdict | None = None
    code = 0
    try:
        _preflight(req, certs)
        deadline = time.monotonic() + req.wait_registration
        attempt = 0
        while True:
            supervisor = Supervisor(req, certs, port)
            code = supervisor.run(group)
            group.stop_all()  # the SuperExec of this attempt, if Flower left it running
            verdict = supervisor.verdict
            wait = _next_wait(attempt)
            if verdict is None or verdict.kind != "not-registered" \
                    or time.monotonic() + wait > deadline:
                break
            events.emit(req.workdir, "waiting", name=req.name, message=(
                f"not registered (yet) with the server at {req.server}; trying again in "
                f"{wait:.0f} s (waiting up to {req.wait_registration:.0f} s for the operator)"))
            time.sleep(wait)
            attempt += 1
    except (DataError, ValueError) as err:  # the --model pre-flight
        verdict = Verdict("data", str(err))
    except KeyboardInterrupt:
        events.emit(req.workdir, "stopped", name=req.name, message="stopped by a signal")
        verdict, code = None, 0
    finally:
        group.stop_all()
        stop.set()
        printer.join(timeout=5)
    if verdict is not None:
        events.emit(req.workdir, "error", name=req.name, message=verdict.message)
        for record in follower.new():
            print(events.line(record), flush=True)
        print(f"medfed: error: hospital {req.name}: {verdict.message}", file=sys.stderr)
        return EXIT_DATA if verdict.kind == "data" else EXIT_FAILED
    if code not in (0, -signal.SIGTERM):
        print(f"medfed: error: hospital {req.name}: flower-supernode exited with code {code}; "
              f"see {req.workdir / SUPERNODE_LOG}", file=sys.stderr)
        return EXIT_FAILED
    return 0
