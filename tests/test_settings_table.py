"""The delegate's settings: one table for file keys, environment names, describe() and the
reference config file; parsing that leaves the disk alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.runtime.outbox import DataDirUnusable, open_outbox
from agent.runtime.settings import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"MANAGER_HOST_AND_PORT": "http://cp", "DELEGATE_TOKEN": "t" * 20, "DELEGATE_NAME": "d"}


def test_parsing_settings_creates_no_directory(tmp_path: Path) -> None:
    """check-config and load_settings leave the disk alone; the outbox creates the data dir when it opens."""
    data = tmp_path / "not" / "yet" / "there"
    settings = load_settings({**REQUIRED, "AGENT_DATA_DIR": str(data)})
    assert settings.data_dir == data
    assert list(tmp_path.iterdir()) == []
    outbox = open_outbox(settings.data_dir)
    try:
        assert outbox.durable and (data / "outbox.sqlite3").is_file()
    finally:
        outbox.close()


def test_a_data_dir_that_cannot_be_created_is_a_settings_problem(tmp_path: Path) -> None:
    """Judged without writing: a path under a file, or the file itself, is refused with the reason."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for data, message in (
        (blocker / "sub", f"cannot create {blocker / 'sub'}: {blocker} is not a directory"),
        (blocker, f"{blocker} is not a directory"),
    ):
        with pytest.raises(ConfigError) as err:
            load_settings({**REQUIRED, "AGENT_DATA_DIR": str(data)})
        assert [(p.field, p.message) for p in err.value.problems] == [("AGENT_DATA_DIR", message)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_of_the_data_dir_is_a_settings_problem(tmp_path: Path) -> None:
    """A data dir the delegate's user could not create is refused before the delegate starts."""
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o500)
    with pytest.raises(ConfigError) as err:
        load_settings({**REQUIRED, "AGENT_DATA_DIR": str(parent / "data")})
    assert err.value.problems[0].message == f"cannot create {parent / 'data'}: {parent} is not writable by this user"


def test_an_outbox_that_cannot_open_names_the_data_dir(tmp_path: Path) -> None:
    """What the settings could not foresee (here the database path is a directory) is one clear line."""
    (tmp_path / "outbox.sqlite3").mkdir()
    with pytest.raises(DataDirUnusable, match=rf"^cannot use the data dir {tmp_path} \(AGENT_DATA_DIR\): "):
        open_outbox(tmp_path)


def test_run_with_an_unusable_data_dir_exits_2_in_one_line(tmp_path: Path) -> None:
    """The delegate refuses to start without a traceback; nothing is contacted first."""
    (tmp_path / "outbox.sqlite3").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AGENT_", "DELEGATE_", "MANAGER_"))}
    env.update(
        {
            **REQUIRED,
            "MANAGER_HOST_AND_PORT": "http://127.0.0.1:9",
            "AGENT_DATA_DIR": str(tmp_path),
            "AGENT_HTTP_LISTEN": "127.0.0.1:0",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    out = subprocess.run(
        [sys.executable, "-m", "agent", "run"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"delegate-agent: cannot use the data dir {tmp_path} (AGENT_DATA_DIR): "), out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
