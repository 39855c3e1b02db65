"""DICOM tools the tests check results with: dicom3tools' validator and an Orthanc PACS.

Both are system packages (`apt-get install dicom3tools orthanc`, as .ci/run does); a missing
one fails the test that needs it, it does not skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import portpicker

# Debian installs Orthanc into /usr/sbin, which is not on a user's PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def tool(name: str) -> str:
    """The path of the executable `name`; fails the test where it is not installed."""
    path = shutil.which(name, path=_SEARCH_PATH)
    assert path, f"{name} not found: apt-get install dicom3tools orthanc (see .ci/run)"
    return path


def dciodvfy_errors(path: str | os.PathLike) -> list[str]:
    """The lines of dciodvfy's report on `path` that contain "Error" (none: the file is a
    valid instance of its IOD)."""
    result = subprocess.run(
        [tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120
    )
    report = result.stdout + result.stderr
    return [line for line in report.splitlines() if "Error" in line]


class Orthanc:
    """A throw-away Orthanc on free loopback ports, its storage in `root`.

    Attributes:
      aet: its AE title; associations called by another title are refused
        (DicomCheckCalledAet).
      dicom_port, http_port: where it listens.
    """

    def __init__(self, root: Path, aet: str = "CSPINE_TEST"):
        self.aet = aet
        self.dicom_port = portpicker.pick_unused_port()
        self.http_port = portpicker.pick_unused_port()
        config = {
            "Name": "cspine_jax test",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
        }
        path = root / "orthanc.json"
        path.write_text(json.dumps(config))
        self._log = open(root / "orthanc.log", "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [tool("Orthanc"), str(path)], stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_until_ready(root / "orthanc.log")

    def _wait_until_ready(self, log: Path, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "Orthanc exited:\n" + log.read_text()[-3000:]
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("Orthanc's REST API did not answer:\n" + log.read_text()[-3000:])

    def get(self, route: str):
        """The JSON answer of Orthanc's REST API at `route` (e.g. "/studies")."""
        url = f"http://127.0.0.1:{self.http_port}{route}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.load(answer)

    def stop(self) -> None:
        """Terminates Orthanc and waits for it to exit."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
