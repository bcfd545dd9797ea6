"""Replica logging: what Serve's logger keeps, and how a client's mistake is logged."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
from collections.abc import Iterator

from deployments.ray_errors import unwrap
from handlers.errors import IrisError

SERVE_LOGGER = "ray.serve"


class ClientErrorsAreNotFailures(logging.Filter):
    """Serve logs every exception a replica method raises as `ERROR Request failed.` with a
    traceback. A client's mistake (a 4xx Iris error: a 404 image URL, a file that is not an
    image) is not a fault of the replica: one WARNING line with what was wrong, no traceback.
    Iris's own faults keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and record.exc_info[1]:
            err = unwrap(record.exc_info[1])
            if isinstance(err, IrisError) and err.status < 500:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
                record.msg = "Client error %s %s: %s"
                record.args = (err.status, err.code or err.type, err.message)
                record.exc_info = record.exc_text = None
        return True


def quiet_client_errors(name: str = SERVE_LOGGER) -> None:
    """Install the filter on Serve's logger in this replica (once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, ClientErrorsAreNotFailures) for f in logger.filters):
        logger.addFilter(ClientErrorsAreNotFailures())


class AccessLinesToFileOnly(logging.Filter):
    """Serve writes each access line to the replica's log file and to its stderr, which Ray
    forwards to the driver's console. Behind the ingress that is a line per internal call,
    two or three per image request: in the files they let one grep follow a request through
    every replica; on make serve's console only the ingress's stay, one per HTTP request (as
    vllm serve's). A filter on the logger (Serve replaces its handlers when it reconfigures
    a replica) that marks them with the attribute Serve's stderr handler drops records by."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "serve_access_log", False):
            record.log_to_stderr = False
        return True


def access_lines_to_file_only(name: str = SERVE_LOGGER) -> None:
    """Install the filter on Serve's logger in this replica (once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, AccessLinesToFileOnly) for f in logger.filters):
        logger.addFilter(AccessLinesToFileOnly())


def behind_the_ingress(name: str = SERVE_LOGGER) -> None:
    """Logging for a replica only the ingress calls (fetcher, preprocessor, LLMServer,
    EmbeddingServer): a client's mistake is a WARNING line, access lines stay in its file."""
    quiet_client_errors(name)
    access_lines_to_file_only(name)


@contextlib.contextmanager
def keep_serve_log_handlers(name: str = SERVE_LOGGER) -> Iterator[None]:
    """vLLM configures logging with `dictConfig`, which closes every existing handler.
    Serve's replica logger writes through a MemoryHandler whose target a close drops:
    its records (with their request ids) would then pile up in memory, never written.
    Reattach the targets afterwards."""
    serve_logger = logging.getLogger(name)
    targets = [(h, h.target) for h in serve_logger.handlers
               if isinstance(h, logging.handlers.MemoryHandler)]
    try:
        yield
    finally:
        for handler, target in targets:
            if handler.target is None and target is not None:
                handler.setTarget(target)  # a closed FileHandler reopens on its next write
