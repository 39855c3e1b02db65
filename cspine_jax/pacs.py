"""Send DICOM files to a PACS (a DICOM Storage SCP) by C-STORE, with pynetdicom.

One association for all the files: each file's status is one line; a peer that cannot be
reached, refuses the association, drops it or answers a store with a failure status raises
`StoreError`, one line naming the peer and what happened. The files are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pydicom
from pynetdicom import AE
from pynetdicom.status import code_to_category

CALLING_AE = "CSPINE_JAX"
# Seconds to connect, to wait for the association's answer and for each store's response.
TIMEOUT_S = 30.0
# pynetdicom logs every refusal and failure at ERROR through the root logger (absl's, on
# stderr): what went wrong is the one line of `StoreError` instead.
logging.getLogger("pynetdicom").propagate = False


class StoreError(Exception):
    """A C-STORE that did not succeed; message `<called AE>@<host>:<port>: <problem>`."""

    def __init__(self, peer: str, problem: str):
        super().__init__(f"{peer}: {' '.join(str(problem).split())}")


def parse_peer(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port).

    Raises:
      ValueError: not HOST:PORT with a port in 1..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def send(
    paths: Sequence[str],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = CALLING_AE,
    report: Callable[[str], object] = print,
    timeout_s: float = TIMEOUT_S,
) -> None:
    """C-STOREs each file of `paths` to `called_ae` at `host:port`, reporting each status.

    report: called with one line per file: `stored <path> at <peer>: 0x0000 Success` (or a
      warning status, which keeps the file).

    Raises:
      StoreError: no connection, the association refused or dropped, a store without a
        response or with a failure status; the line names the peer and the status.
    """
    peer = f"{called_ae}@{host}:{port}"
    datasets = [pydicom.dcmread(path) for path in paths]
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    for context in sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        ae.add_requested_context(*context)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if assoc.is_rejected:
        answer = assoc.acceptor.primitive
        raise StoreError(
            peer,
            f"association rejected ({answer.result_str}, {answer.source_str}: "
            f"{answer.reason_str}); calling AE {calling_ae}",
        )
    if not assoc.is_established:
        raise StoreError(
            peer,
            "no association (connection refused, unreachable, or no acceptable "
            "presentation context)",
        )
    try:
        for path, ds in zip(paths, datasets, strict=True):
            status = assoc.send_c_store(ds)
            if "Status" not in status:  # no response: aborted, or timed out
                raise StoreError(peer, f"no C-STORE response for {path} (association lost)")
            code = int(status.Status)
            category = code_to_category(code)
            if category not in ("Success", "Warning"):
                raise StoreError(peer, f"C-STORE of {path}: status 0x{code:04X} {category}")
            report(f"stored {path} at {peer}: status 0x{code:04X} {category}")
    finally:
        if assoc.is_established:
            assoc.release()
