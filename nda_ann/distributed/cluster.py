"""Connecting to a Ray cluster and waiting for its results with a deadline and clear errors.

Ray is imported only here, and only when a function is called: the package imports without it.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from ..errors import NdaError

log = logging.getLogger("nda_ann.distributed")

INSTALL_HINT = "the Ray engine needs Ray: pip install 'nda-ann[ray]'"


class DistributedError(NdaError):
    """A Ray worker or actor failed, died past its retries, or did not answer within the timeout."""


def require_ray() -> Any:
    """The ``ray`` module, or a DistributedError saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise DistributedError(None, INSTALL_HINT) from err
    return ray


def connect(address: str | None = None) -> Any:
    """Ray, connected: to the running session if there is one (``address`` must then be None or
    match), else to ``address`` ("auto", "HOST:PORT", "ray://HOST:PORT"), else to a new local cluster."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise DistributedError(None, f"cannot connect to the Ray cluster at {address or 'a new local cluster'}: {err}") from err
    log.info("connected to Ray: %s", ray.cluster_resources())
    return ray


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1)."""
    ray = require_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def gather(refs: Sequence[Any], timeout_s: float | None, labels: Sequence[str]) -> list[Any]:
    """``ray.get`` of every ref within ``timeout_s`` seconds, or a DistributedError naming the ones
    that did not answer or died. An nda-ann error raised remotely is re-raised as itself."""
    ray = require_ray()
    refs = list(refs)
    if not refs:
        return []
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = [labels[i] for i, r in enumerate(refs) if r in set(pending)]
        raise DistributedError(None, f"no answer within {timeout_s:g} s from {', '.join(late)}; nothing partial was "
                                     "returned (a slow or hung worker: check the cluster, or raise the timeout)")
    out = []
    for ref, label in zip(refs, labels):
        try:
            out.append(ray.get(ref))
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, NdaError):
                raise cause from None
            raise DistributedError(None, f"{label} failed: {err}") from err
        except ray.exceptions.RayError as err:  # actor died past its restarts, worker lost, object lost
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
            if getattr(err, "actor_init_failed", False):  # its __init__ raised: the last line is the error
                raise DistributedError(None, f"{label} could not start: {lines[-1][:500]}") from err
            raise DistributedError(None, f"{label} died and was not recovered by Ray's retries: "
                                         f"{type(err).__name__}: {lines[0][:300]}") from err
    return out
