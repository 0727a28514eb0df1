"""``dermbatch run --ray`` on a real two-node Ray cluster started here (loopback): the same outputs as a local run,
a lost node and a killed driver cost no row and duplicate none."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dermbatch.cli.main import main
from dermbatch.cli.run import with_ray_address
from tests.conftest import HAM, real_images

RAY = Path(sys.executable).with_name("ray")
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")


def test_bare_ray_flag_means_auto():
    assert with_ray_address(["imgs", "--ray", "--out", "r.csv"]) == ["imgs", "--ray", "auto", "--out", "r.csv"]
    assert with_ray_address(["--ray", "imgs", "--out", "r.csv"]) == ["--ray", "auto", "imgs", "--out", "r.csv"]
    assert with_ray_address(["imgs", "--ray"]) == ["imgs", "--ray", "auto"]
    for address in ("auto", "head:6379", "ray://head:10001", "10.0.0.5:6379"):
        assert with_ray_address(["imgs", "--ray", address]) == ["imgs", "--ray", address]
    assert with_ray_address(["--", "--ray"]) == ["--", "--ray"]


def test_ray_missing_is_one_clear_error(monkeypatch, tmp_path, capsys, image_folder):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    code = main(["run", str(image_folder), "--out", str(tmp_path / "r.csv"), "--ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ['Error: --ray needs Ray Data, which is not installed: pip install "dermbatch[ray]"']


def test_pool_options_need_ray(tmp_path, capsys, image_folder):
    assert main(["run", str(image_folder), "--out", str(tmp_path / "r.csv"), "--ray-actors", "2"]) == 2
    assert "pass --ray too" in capsys.readouterr().err


def test_a_local_run_never_imports_ray(tiny_bundle, image_folder, tmp_path):
    code = (f"import sys; from dermbatch.cli.main import main; "
            f"c = main(['run', {str(image_folder)!r}, '--out', {str(tmp_path / 'r.csv')!r}, '--model', "
            f"{str(tiny_bundle.path)!r}, '--backend', 'torch', '-q']); "
            f"assert c == 0, c; assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)


# ---- a real cluster: a head node and a worker node, 1 CPU each, on loopback ------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """``ray start --head`` plus worker nodes, each a ``ray start --block`` process group we can kill."""

    def __init__(self, tmp: Path):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tmp, self.nodes = tmp, []
        self._start("--head", f"--port={self.port}", "--include-dashboard=false")
        self.add_worker()

    def _start(self, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"node{len(self.nodes)}.log", "w")
        proc = subprocess.Popen([str(RAY), "start", "--block", "--num-cpus=1", "--object-store-memory=150000000",
                                 "--disable-usage-stats", *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        self.nodes.append(proc)
        self._wait_for(len(self.nodes))
        return proc

    def add_worker(self) -> subprocess.Popen:
        return self._start(f"--address={self.address}")

    def alive_nodes(self) -> int:
        status = subprocess.run([str(RAY), "status", f"--address={self.address}"], capture_output=True, text=True,
                                timeout=60).stdout
        active = status.split("Active:")[-1].split("Pending:")[0] if "Active:" in status else ""
        return sum(line.strip().split(" ", 1)[-1].startswith("node_") for line in active.splitlines())

    def _wait_for(self, count: int, timeout: float = 120) -> None:
        """Until ``ray status`` lists exactly ``count`` active nodes (a lost node leaves the list, a new one joins)."""
        deadline, seen = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.nodes and self.nodes[-1].poll() is not None:
                raise RuntimeError(f"ray start exited {self.nodes[-1].returncode}; see {self.tmp}")
            try:
                seen = self.alive_nodes()
                if seen == count:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        raise RuntimeError(f"the Ray cluster has {seen} active nodes, not {count}, after {timeout:.0f} s")

    def replace(self, node: subprocess.Popen) -> None:
        """Stop what is left of a node, wait until the cluster has dropped it, and start a fresh worker."""
        self._kill(node)
        self.nodes.remove(node)
        self._wait_for(len(self.nodes))
        self.add_worker()

    @staticmethod
    def raylet_pid(node: subprocess.Popen) -> int:
        """The raylet of a node: the process named raylet in that node's process group."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, rest = stat.read_text().split(" ", 1)
            except OSError:
                continue
            name, fields = rest[1:].rsplit(") ", 1)
            if name == "raylet" and int(fields.split()[2]) == node.pid:  # pgrp: the ray start process's pid
                return int(pid)
        raise RuntimeError(f"no raylet in process group {node.pid}")

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in reversed(self.nodes):
            self._kill(proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if importlib.util.find_spec("ray") is None or not RAY.exists():
        pytest.skip("Ray is not installed")
    with pytest.MonkeyPatch.context() as env:
        # a throw-away loopback cluster: no token authentication, so a token left in ~/.ray by another Ray
        # instance of this user cannot lock the test's own clients (ray status, the driver) out
        env.setenv("RAY_AUTH_MODE", "disabled")
        cluster = LocalCluster(tmp_path_factory.mktemp("ray"))
        try:
            yield cluster
        finally:
            cluster.stop()


def _image_folder(folder: Path, count: int) -> Path:
    """``count`` real HAM10000 images (symlinked, not copied) and 3 bad files."""
    for path in real_images(HAM, count):
        (folder / path.name).symlink_to(path)
    (folder / "bad_text.jpg").write_text("not an image")
    (folder / "bad_empty.png").write_bytes(b"")
    (folder / "bad_truncated.jpg").write_bytes(real_images(HAM, count + 1)[-1].read_bytes()[:3000])
    return folder


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("mixed"), 24)


@pytest.fixture(scope="module")
def more_images(tmp_path_factory):
    """Enough images that a kill lands mid-run even with the tiny bundle's fast models."""
    return _image_folder(tmp_path_factory.mktemp("more"), 96)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "dermbatch", "run", *map(str, args)]


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path, encoding="utf-8")))


def _common(bundle, batch_size: int = 2) -> list[str]:
    return ["--model", str(bundle.path), "--backend", "torch", "--batch-size", str(batch_size), "--workers", "1"]


@pytest.fixture(scope="module")
def local_run(tiny_bundle, mixed_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "results.csv"
    done = subprocess.run(_cli(mixed_images, "--out", out, "--masks", out.parent / "masks", "-q",
                               *_common(tiny_bundle)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr  # the bad files failed, every real image went through
    return out


@pytest.mark.realdata
@pytest.mark.slow
@needs_ray
def test_ray_run_equals_a_local_run(cluster, tiny_bundle, mixed_images, local_run, tmp_path):
    out = tmp_path / "results.csv"
    done = subprocess.run(_cli(mixed_images, "--out", out, "--masks", tmp_path / "masks", "-q",
                               "--ray", cluster.address, *_common(tiny_bundle)),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr
    local, remote = _rows(local_run), _rows(out)
    assert [r["image"] for r in remote] == [r["image"] for r in local] and len(local) == 24
    for a, b in zip(local, remote, strict=True):  # the CSV has 6 decimals: a last-digit rounding flip at most
        assert max(abs(float(a[k]) - float(b[k])) for k in a if k != "image") <= 1e-6 + 1e-12
    local_details, details = _rows(local_run.with_name("results_details.csv")), _rows(tmp_path / "results_details.csv")
    assert len(details) == 27
    for a, b in zip(local_details, details, strict=True):
        assert {k: v for k, v in a.items() if k != "confidence"} == {k: v for k, v in b.items() if k != "confidence"}
    for mask in sorted((local_run.parent / "masks").iterdir()):
        assert (tmp_path / "masks" / mask.name).read_bytes() == mask.read_bytes()
    runtime = json.loads((tmp_path / "results_manifest.json").read_text())["runtime"]
    assert runtime["backend"] == "torch" and runtime["cluster"]["address"] == cluster.address
    assert len(runtime["cluster"]["nodes"]) == 2 and runtime["cluster"]["actors_requested"] == 2
    nodes = {node["node"].split("/")[-1] for node in runtime["cluster"]["nodes"]}
    assert runtime["cluster"]["actors"] and {a.split("/")[-1] for a in runtime["cluster"]["actors"]} <= nodes


def _wait_for_rows(path: Path, count: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(_rows(path)) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {count} rows: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"no {count} rows in {path} after {timeout:.0f} s")


def _assert_each_image_once(out: Path, images: Path) -> None:
    details = [r["image"] for r in _rows(out.with_name(f"{out.stem}_details.csv"))]
    assert sorted(details) == sorted(p.stem for p in images.iterdir())  # every image, exactly one detail row
    results = [r["image"] for r in _rows(out)]
    assert len(results) == len(set(results)) == len(details) - 3  # one row per good image


@pytest.mark.realdata
@pytest.mark.slow
@needs_ray
def test_a_lost_worker_node_loses_no_row(cluster, tiny_bundle, more_images, tmp_path):
    out = tmp_path / "results.csv"
    proc = subprocess.Popen(_cli(more_images, "--out", out, "-q", "--ray", cluster.address,
                                 *_common(tiny_bundle, batch_size=1)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_rows(out.with_name("results_details.csv"), 4, proc)
        os.kill(cluster.raylet_pid(cluster.nodes[-1]), signal.SIGKILL)
        assert proc.poll() is None, "the run ended before the node was lost"
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.replace(cluster.nodes[-1])  # for the tests after this one
    assert proc.returncode == 3, err
    _assert_each_image_once(out, more_images)


@pytest.mark.realdata
@pytest.mark.slow
@needs_ray
def test_a_killed_driver_resumes_without_loss_or_duplicates(cluster, tiny_bundle, more_images, tmp_path):
    out = tmp_path / "results.csv"
    args = [more_images, "--out", out, "-q", "--ray", cluster.address, *_common(tiny_bundle, batch_size=1)]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(out.with_name("results_details.csv"), 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(_rows(out)) < 96, "the run ended before the driver was killed"
    done = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr
    _assert_each_image_once(out, more_images)
