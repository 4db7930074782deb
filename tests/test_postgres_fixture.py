"""The throw-away PostgreSQL server of tests/postgres.py: a real server that several connections share,
reachable on 127.0.0.1 only, and gone (port closed, folder deleted) after the test, also after a failure."""
from __future__ import annotations

import socket

import pytest
from sqlalchemy import create_engine, text

from postgres import postgres_url, running_postgres  # noqa: F401  (postgres_url is a fixture)


def other_addresses() -> list[str]:
    """Addresses of this machine other than 127.0.0.1: 127.0.0.2 (the rest of 127/8 is loopback on
    Linux too) and the address of the default route's interface, where there is one."""
    addresses = ["127.0.0.2"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: picks the outgoing interface, sends nothing
            addresses.append(s.getsockname()[0])
        except OSError:  # no route: loopback is all there is
            pass
    return [a for a in addresses if a != "127.0.0.1"]


def refused(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


def test_two_connections_share_one_server(postgres_url):  # noqa: F811  (pytest passes the fixture imported above)
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as a, engine.connect() as b:
            pids = {c.execute(text("SELECT pg_backend_pid()")).scalar() for c in (a, b)}
            assert len(pids) == 2, "the two connections must be two server sessions"
            a.execute(text("CREATE TABLE trials (number integer PRIMARY KEY, value double precision)"))
            a.commit()
            a.execute(text("INSERT INTO trials VALUES (0, 0.5), (1, 0.25)"))
            # a's transaction is still open: b must not see its rows yet (a server, not one shared file)
            assert b.execute(text("SELECT count(*) FROM trials")).scalar() == 0
            b.rollback()
            a.commit()
            b.execute(text("INSERT INTO trials VALUES (2, 0.125)"))
            b.commit()
            rows = a.execute(text("SELECT number, value FROM trials ORDER BY number")).all()
            assert [tuple(r) for r in rows] == [(0, 0.5), (1, 0.25), (2, 0.125)]
            assert a.execute(text("SHOW listen_addresses")).scalar() == "127.0.0.1"
            assert a.execute(text("SELECT current_database()")).scalar() == "cnnkit"
    finally:
        engine.dispose()
    port = engine.url.port
    for address in other_addresses():
        assert refused(address, port), f"the test server must not be reachable on {address}"


def test_server_is_gone_after_a_failing_test():
    with pytest.raises(RuntimeError, match="the test failed"), running_postgres() as pg:
        engine = create_engine(pg.url)
        with engine.connect() as c:
            assert c.execute(text("SELECT 1")).scalar() == 1
        engine.dispose()
        assert (pg.root / "data" / "postmaster.pid").exists()
        raise RuntimeError("the test failed")
    assert refused("127.0.0.1", pg.port), "the server still listens after teardown"
    assert not pg.root.exists(), f"teardown left {pg.root} behind"
