"""The outage spool: tracking that outlives the MLflow server.

While an http(s) tracking server is away, each run's writes go to a directory of its own on local disk, in order
(files.py); they are replayed into MLflow once the server answers (replay.py): by the study itself, at its next run,
or by `python study/sync.py` (sync.py). The study sees one face, `SpoolingClient` (client.py), an MlflowClient whose
writes never wait on the server.
"""
from study.spool.client import SpoolingClient, server_up

__all__ = ["SpoolingClient", "server_up"]
