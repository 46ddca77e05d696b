"""The ServerApp's end-of-run records (fedssl.run.server_marks): what the writer writes the reader reads back,
and a record changed by hand is one line naming the file, from `fedssl evaluate` too."""

from __future__ import annotations

import json

import pytest

from fedssl.cli import main
from fedssl.errors import DataError
from fedssl.fl.keys import RUN_CONFIG_PATH, RUN_DIR
from fedssl.layout import RunDir
from fedssl.run.server_marks import ServerDone, read_done, stop_reason, write_done, write_failed
from fedssl.run.stock import APP_ROOT, DEFAULT_CONFIG, prepare_stock_run, resolve_launch


def test_done_reads_back_what_was_written_and_leaves_no_temporary_file(tmp_path):
    layout = RunDir(tmp_path)
    for done in (ServerDone(run_id="7", rounds=3, resumed_after=None, seconds=1.5),
                 ServerDone(run_id=str(2**63 - 1), rounds=10, resumed_after=4, seconds=0.0)):
        write_done(layout, done)
        assert read_done(layout) == done
    assert [p.name for p in tmp_path.iterdir()] == [layout.server_done.name]


@pytest.mark.parametrize("body, why", [
    (None, "missing; the federated run did not finish"),
    ("{", "not a server-done record (JSONDecodeError"),
    ('{"run_id": "1", "rounds": 2, "seconds": 3.0}', "not a server-done record (KeyError: 'resumed_after')"),
    ('{"run_id": "1", "rounds": "two", "resumed_after": null, "seconds": 3.0}', "not a server-done record (ValueError"),
    ('{"run_id": 1, "rounds": 2, "resumed_after": null, "seconds": 3.0}', "not a server-done record (TypeError: run_id 1 is not"),
    ("[1, 2]", "not a server-done record (TypeError"),
])
def test_a_missing_or_changed_done_record_is_one_line_naming_it(tmp_path, body, why):
    layout = RunDir(tmp_path)
    if body is not None:
        layout.server_done.write_text(body)
    with pytest.raises(DataError) as caught:
        read_done(layout)
    assert str(caught.value).startswith(f"{layout.server_done}: {why}") and "\n" not in str(caught.value)


def test_stop_reason_is_the_servers_line_or_says_where_to_look(tmp_path):
    layout = RunDir(tmp_path)
    assert stop_reason(layout) is None
    write_failed(layout, "3", "every site failed in round 2: site 0 refused")
    assert stop_reason(layout) == "every site failed in round 2: site 0 refused"
    assert json.loads(layout.server_failed.read_text())["run_id"] == "3"
    layout.server_failed.write_text("not json")
    assert stop_reason(layout) == f"the server stopped the run; see {layout.server_failed}"


def test_evaluate_of_a_run_whose_done_record_was_changed_is_one_line(tmp_path, capsys):
    prepare_stock_run(resolve_launch({RUN_CONFIG_PATH: str(APP_ROOT / DEFAULT_CONFIG), RUN_DIR: str(tmp_path)}, 1))
    RunDir(tmp_path).server_done.write_text('{"seconds": "soon"}')
    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "server_done.json: not a server-done record" in err[0]
    assert not RunDir(tmp_path).summary.exists()
