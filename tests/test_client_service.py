"""`medfed client` as a service: Flower's failure lines become one sentence each, the hospital's
event log reads back whole lines only, and the operator's log names refused joins.

The Flower lines below are what flower-supernode 1.42 printed on this machine in each case.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from client import events
from client.deploy import ClientRequest, Supervisor, classify
from server.deploy import refused_join


def _req(insecure: bool = False) -> ClientRequest:
    return ClientRequest(server="fl.example.org:8000", data=Path("x.csv"), test_data=None,
                         certs=None if insecure else Path("certs/a"), name="a", device="cpu",
                         workdir=Path("w"), port=0, insecure=insecure, max_retries=0)


@pytest.mark.parametrize(("line", "insecure", "kind", "words"), [
    ("[code: 2004] Failed to activate SuperNode.", False, "not-registered",
     "not registered (send certs/a/node_key.pub"),
    ("[code: 2001] SuperNode authentication is enabled.", False, "no-key",
     "none was offered"),
    ("httpx.ConnectError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", False,
     "wrong-ca", "not signed by the federation CA in certs/a/ca.crt"),
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", False, "tls-mismatch",
     "does not use TLS but this hospital does"),
    ("Server disconnected without sending a response.", True, "tls-mismatch",
     "uses TLS but this hospital was started with --insecure"),
])
def test_flower_failure_lines_become_one_sentence(line: str, insecure: bool, kind: str,
                                                 words: str) -> None:
    verdict = classify(line, _req(insecure))
    assert verdict is not None and verdict.kind == kind
    assert words in verdict.message


@pytest.mark.parametrize("line", [
    "WARNING :   Connection attempt failed, retrying in 0.97 seconds",
    "INFO :      Receiving: train message (ID: 3f2a)",
    "Server disconnected without sending a response.",  # TLS client: not a mode mismatch
])
def test_other_lines_are_not_fatal(line: str) -> None:
    assert classify(line, _req()) is None


def test_events_are_timestamped_sentences_and_json_lines(tmp_path: Path) -> None:
    follower = events.Follower(tmp_path / events.EVENTS_FILE)
    events.emit(tmp_path, "train", site="a", round=7, rows=120, steps=20, loss=0.41234)
    events.emit(tmp_path, "evaluate", site="a", round=7, rows=30, auc=float("nan"),
                balanced_accuracy=0.75)
    (tmp_path / events.EVENTS_FILE).open("a").write('{"event": "model", "ver')  # half-written
    got = follower.new()
    assert [e["event"] for e in got] == ["train", "evaluate"]
    assert got[1]["auc"] is None  # JSON has no NaN
    lines = [events.line(e) for e in got]
    assert lines[0].endswith("a: round 7: trained on 120 local rows, 20 steps, loss 0.4123")
    assert lines[1].endswith("a: round 7: local validation (30 rows) AUC n/a, balanced "
                             "accuracy 0.750")
    assert lines[0][:4].isdigit() and lines[0][10] == " "  # local date and time first
    (tmp_path / events.EVENTS_FILE).open("a").write('sion": 3, "path": "p"}\n')
    assert [e.get("version") for e in follower.new()] == [3]  # completed later, read once


def test_the_first_event_of_a_new_node_creates_its_directory(tmp_path: Path) -> None:
    workdir = tmp_path / "nodes" / "cleveland"
    follower = events.Follower(workdir / events.EVENTS_FILE)
    events.emit(workdir, "train", site="a", round=1, rows=10, steps=2, loss=0.5)
    events.emit(workdir, "train", site="a", round=2, rows=10, steps=2, loss=0.4)
    assert [e["round"] for e in follower.new()] == [1, 2]


def test_refused_joins_are_named_for_the_operator() -> None:
    line = ("ERROR :     [/v1/fleet/activate-node][ApiError:2004] Attempted to register "
            "SuperNode with public key: b'-----BEGIN PUBLIC KEY-----\\nMHYwEAYHKoZIzj0CAQYFK4E"
            "\\nthmTpHxy96pQ\\n-----END PUBLIC KEY-----\\n', exception: No SuperNode found")
    sentence = refused_join(line)
    assert sentence is not None
    assert sentence.startswith("refused a join: a node key that is not registered (key "
                               "fingerprint ")
    assert refused_join(line.replace("thmTpHxy", "xxxxxxxx")) != sentence  # per key
    assert refused_join("INFO: POST /v1/fleet/pull-messages 200") is None
    assert "no node key" in (refused_join("[ApiError:2001] SuperNode auth ...") or "")


class _Proc:
    """Stands in for the SuperNode process a Supervisor would stop."""

    terminated = False

    def terminate(self) -> None:
        self.terminated = True


def _supervisor(workdir: Path, verbose: bool = False) -> Supervisor:
    req = replace(_req(), workdir=workdir, verbose=verbose)
    sup = Supervisor(req, None, 1)
    sup.joined = True
    return sup


# what flwr-clientapp 1.42 logs when a handler raises (run_clientapp.py: log(ERROR, "%s raised
# an exception", "ClientApp", exc_info=ex)); the last line echoes a server-sent value
_TRACEBACK = [
    "ERROR :     ClientApp raised an exception",
    "Traceback (most recent call last):",
    '  File "/x/client/client_app.py", line 127, in train',
    "    server_round = int(config[rk.SERVER_ROUND])",
    "ValueError: invalid literal for int() with base 10: '{}'",
]


@pytest.mark.parametrize("sent", ["certificate verify failed",
                                  "[code: 2004] Failed to activate SuperNode",
                                  "[code: 2001] x", "WRONG_VERSION_NUMBER",
                                  "Connection refused"])
def test_a_clientapp_traceback_is_not_read_as_the_supernodes_failure(sent: str,
                                                                    tmp_path: Path) -> None:
    sup, proc = _supervisor(tmp_path), _Proc()
    for line in _TRACEBACK:
        sup._line(line.format(sent), proc)  # type: ignore[arg-type]
    assert sup.verdict is None and not proc.terminated and not sup.unreachable
    # the SuperNode's own next record ends the traceback: its failures still count
    sup._line("ERROR :     Exit Code: 200", proc)  # type: ignore[arg-type]
    sup._line("[code: 2004] Failed to activate SuperNode.", proc)  # type: ignore[arg-type]
    assert sup.verdict is not None and sup.verdict.kind == "not-registered" and proc.terminated


@pytest.mark.parametrize("verbose", [False, True])
def test_relayed_flower_lines_reach_the_terminal_without_control_characters(
        verbose: bool, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, verbose=verbose)
    sup._line("WARNING :   \x1b]0;owned\x07\x1b[2J\x1b[Hfake ok\r" + "x" * 5000,
              _Proc())  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert out and "fake ok" in out
    assert all(c.isprintable() for c in out.replace("\n", "")), repr(out[:200])
    assert len(out) < 2000


def test_event_text_is_shown_without_control_characters_and_capped() -> None:
    record = {"time": "2026-12-02T08:00:01+00:00", "event": "error", "site": "a\x1b[2J",
              "message": "training failed: \x1b[2J\x1b[H\n2026-12-02 08:00:02 a: model ok"
                         + "x" * 5000}
    shown = events.line(record)
    assert all(c.isprintable() for c in shown), repr(shown[:200])
    assert len(shown) < 500
    unknown = events.line({**record, "event": "\x1b[31mnew\nkind"})
    assert all(c.isprintable() for c in unknown) and len(unknown) < 500


def test_long_event_fields_are_capped_in_the_file(tmp_path: Path) -> None:
    events.emit(tmp_path, "error", site="a", message="y" * 100_000)
    (raw,) = (tmp_path / events.EVENTS_FILE).read_text().splitlines()
    assert len(raw) < 5000


@pytest.mark.parametrize("data", ["/data/a.csv", "/data/new\\a.csv", "/data/x\\y z.csv",
                                  '/data/"quoted"/a.csv', "/data/it's/a.csv"])
def test_node_config_reaches_flower_as_given(data: str) -> None:
    from flwr.common.config import parse_config_args

    from client.deploy import _node_config

    req = replace(_req(insecure=True), name="hospital-a", data=Path(data),
                  test_data=Path(data + ".test"))
    parsed = parse_config_args([_node_config(req, None)])
    assert parsed["site-name"] == "hospital-a"
    assert (parsed["data-path"], parsed["test-path"]) == (data, data + ".test")


@pytest.mark.parametrize("data", ["/data/new\nline.csv", "/data/both'\".csv"])
def test_node_config_refuses_what_flower_cannot_read_back(data: str) -> None:
    from client.deploy import _node_config

    with pytest.raises(ValueError, match=r"^--data .* cannot be passed to flower-supernode"):
        _node_config(replace(_req(insecure=True), data=Path(data)), None)


@pytest.mark.parametrize("name", ['hospital "A"', "Hospital-A", "a\nb", "../a", ""])
def test_client_refuses_a_name_the_server_could_not_register(name: str) -> None:
    from client.deploy import _check

    with pytest.raises(ValueError, match=r"^--name .* is invalid"):
        _check(replace(_req(insecure=True), name=name))
