"""A run that starts its own Ray listens on loopback only: no Ray port is reachable from the network.

A Ray cluster executes the code that reaches it, so every listening socket of the run's processes
(driver, gcs_server, raylet, workers, dashboard, agents) must be bound to 127.0.0.1 or ::1 (an
IPv6 socket bound to ::ffff:127.0.0.1 counts: gRPC listens that way). The sockets are read from
/proc while the run goes on, as users start it (run_encode.py in a subprocess).
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_samples import REPO, descendants, good_samples, kill_pids, tiny_config, write_tar

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from /proc (Linux)")

# /proc/net/{tcp,udp}[6] rows: TCP state 0A is LISTEN; an unconnected UDP socket (07) receives from anyone.
TABLES = {"tcp": "0A", "tcp6": "0A", "udp": "07", "udp6": "07"}


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The kernel prints addresses as 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_ip)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _listening_inodes() -> dict[str, tuple[str, str, int]]:
    """socket inode -> (table, address, port) for every listening socket of this network namespace."""
    out = {}
    for table, state in TABLES.items():
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != state:
                continue
            ip, port = fields[1].split(":")
            out[fields[9]] = (table, str(_address(ip)), int(port, 16))
    return out


def _process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return os.path.basename(argv[0].decode(errors="replace").split()[0]) if argv[0] else ""
    except (OSError, IndexError):
        return ""


def _listening_sockets(pids: list[int]) -> set[tuple[str, str, int, str]]:
    """(process name, table, address, port) of every listening socket held by ``pids``."""
    inodes = _listening_inodes()
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone already
            continue
        name = _process_name(pid)
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found.add((name, *inodes[target[8:-1]]))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def test_a_run_with_its_own_ray_listens_on_loopback_only(tmp_path):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "00000.tar", good_samples(6, size=32))
    config = tiny_config(tmp_path / "tiny.yaml", include_dashboard=True)  # the dashboard is checked too
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1",
                                                                          "PYTHONPATH": str(REPO)}  # fmt: skip
    args = ["--shards", str(tmp_path / "in" / "00000.tar"), "--output", str(tmp_path / "out"), "--config", str(config),
            "--gpus", "0", "--workers", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(REPO / "run_encode.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    helpers: dict[int, str] = {}  # pid -> name, to end leftovers by pid (never by name) after the run
    sockets: set[tuple[str, str, int, str]] = set()
    try:
        deadline = time.time() + 150
        while proc.poll() is None and time.time() < deadline:
            tree = descendants(proc.pid)
            helpers.update((pid, _process_name(pid)) for pid in tree if pid not in helpers)
            sockets |= _listening_sockets([proc.pid, *tree])
            time.sleep(0.3)
        assert proc.poll() is not None, "the run did not end in time"
        log = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        time.sleep(0.5)
        kill_pids(sorted(pid for pid, name in helpers.items() if name and _process_name(pid) == name))
    assert proc.returncode == 0, log[-3000:]

    report = "\n".join(f"{name:24} {table:5} {f'[{address}]' if ':' in address else address}:{port}"
                       for name, table, address, port in sorted(sockets))  # fmt: skip
    wide = {s for s in sockets if not _is_loopback(s[2])}
    assert not wide, f"listening off loopback:\n{report}"
    # Not vacuous: the GCS's, the raylet's and the encoding worker's sockets were among those checked.
    names = {name for name, *_ in sockets}
    assert {"gcs_server", "raylet"} <= names, report
    assert any(name.startswith("ray::ShardEncoder") for name in names), report
    assert len(sockets) >= 8, report
