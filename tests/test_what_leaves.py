"""What leaves a hospital when its data is bad: an error text that names the file, column and
row count, never the patient values themselves. (What leaves it in a normal run is checked on a
real deployment's audit log in tests/test_deploy_e2e.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import RecordDict

from client.client_app import make_client_app
from common import records as rk
from common.data.heart import export_site_csv
from common.settings import RunSettings
from server.federation import load_payload
from tests.conftest import HEART
from tests.flower_helpers import call_client_app, task_identity

# values no real record holds, so finding them in a message can only mean a leak
PLANTED = {"age": "987.654", "chol": "4321.5", "cp": "77"}


@pytest.fixture()
def bad_csv(tmp_path: Path) -> Path:
    path = tmp_path / "hospital.csv"
    export_site_csv("va", path)
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[5].split(",")
    for column, value in PLANTED.items():
        row[header.index(column)] = value
    lines[5] = ",".join(row)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("column", sorted(PLANTED))
def test_error_sent_to_the_server_names_the_column_but_not_the_value(
        column: str, bad_csv: Path, tmp_path: Path, heart_bundle: Path,
        signing_key_path: Path, signing_pub_path: Path) -> None:
    # one bad column at a time, so each check is about that column's message
    lines = bad_csv.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[5].split(",")
    for other in PLANTED:
        if other != column:
            row[header.index(other)] = "60" if other == "age" else ("200" if other == "chol"
                                                                     else "4")
    lines[5] = ",".join(row)
    bad_csv.write_text("\n".join(lines) + "\n")

    settings = RunSettings(config_path=HEART, overrides=(), run_dir=tmp_path / "run",
                           bundle=heart_bundle, keys=signing_key_path)
    app = make_client_app(settings)
    payload = load_payload(heart_bundle)
    node = {"site-name": "hospital-x", "data-path": str(bad_csv), "workdir": str(tmp_path / "w"),
            "signing-pub": str(signing_pub_path)}
    content = RecordDict({rk.BUNDLE_META: payload.meta(), rk.BACKBONE_FILE: payload.arrays()})
    with task_identity(), pytest.raises(ValueError) as err:
        # Flower's runtime sends str(exception) to the server as the error reply
        call_client_app(app, f"query.{rk.QUERY_BACKBONE}", content, node)
    text = str(err.value)
    assert column in text
    assert "1 row" in text, text
    for value in PLANTED.values():
        assert value not in text
