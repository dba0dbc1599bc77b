"""`medfed client` as a service: Flower's failure lines become one sentence each, the hospital's
event log reads back whole lines only, and the operator's log names refused joins.

The Flower lines below are what flower-supernode 1.42 printed on this machine in each case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client import events
from client.deploy import ClientRequest, classify
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
