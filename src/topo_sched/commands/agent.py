"""``topo-sched agent``: the node agent (DaemonSet), or a one-shot print of what it sees."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from topo_sched.agent.discovery import METHODS, DiscoveryError, discover
from topo_sched.agent.podresources import DEFAULT_SOCKET, PodResourcesError

log = logging.getLogger("topo_sched.agent")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def agent(
    node_name: Annotated[
        str | None,
        typer.Option(help="This node's name (default: $NODE_NAME, else the host name)."),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Run one discovery and stop.")] = False,
    print_: Annotated[
        bool,
        typer.Option(
            "--print", help="Print the record and GPU allocation as JSON; publish nothing."
        ),
    ] = False,
    socket: Annotated[str, typer.Option(help="kubelet PodResources unix socket.")] = DEFAULT_SOCKET,
    method: Annotated[
        list[str] | None,
        typer.Option(help=f"Discovery methods to try, in order (default: {', '.join(METHODS)})."),
    ] = None,
    sysfs_root: Annotated[
        Path, typer.Option(help="Root of the sysfs tree for the sysfs method.")
    ] = Path("/"),
    interval: Annotated[float, typer.Option(help="Seconds between ticks.")] = 10.0,
    topology_interval: Annotated[
        float, typer.Option(help="Seconds between topology re-discoveries.")
    ] = 300.0,
    kubeconfig: Annotated[
        str | None, typer.Option(help="kubeconfig file (default: in-cluster, then ~/.kube/config).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Discover this node's GPU topology and GPU owners, and publish them as Node annotations.

    Topology: NVML first, `nvidia-smi topo -m` next, sysfs last (the log says which and why).
    GPU owners: kubelet's PodResources v1 API on its unix socket. Publishes
    `topo-sched.io/topology` (on change) and `topo-sched.io/gpu-allocation` (on change,
    rate-limited). With `--once --print` it prints both instead and touches no API.
    """
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    node = node_name or os.environ.get("NODE_NAME") or os.uname().nodename
    methods = tuple(method) if method else METHODS

    def do_discover():
        return discover(node_name=node, methods=methods, sysfs_root=sysfs_root)

    if print_:
        try:
            found = do_discover()
        except DiscoveryError as e:
            _fail(str(e))
        log.info("topology from %s", found.method)
        for reason in found.skipped:
            log.info("skipped %s", reason)
        allocation: dict[str, str] | None
        note = None
        from topo_sched.agent.daemon import gpu_allocation

        try:
            allocation = {
                str(k): v for k, v in sorted(gpu_allocation(found.topology, socket).items())
            }
        except PodResourcesError as e:
            allocation, note = None, str(e)
            log.warning("%s", e)
        out = {
            "method": found.method,
            "skipped": found.skipped,
            "topology": found.topology.to_dict(),
            "gpu_allocation": allocation,
        }
        if note:
            out["gpu_allocation_error"] = note
        typer.echo(json.dumps(out, indent=2))
        return
    from topo_sched.agent.daemon import Agent, AgentSettings
    from topo_sched.kube.client import KubeConfigError, build_api_client
    from topo_sched.kube.errors import KubeError
    from topo_sched.kube.nodes import get_node, patch_node_annotations

    try:
        api = build_api_client(kubeconfig=kubeconfig)
        current = (get_node(api, node).get("metadata") or {}).get("annotations") or {}
    except (KubeConfigError, KubeError) as e:
        _fail(f"cannot reach the Kubernetes API for node {node}: {e}")
    settings = AgentSettings(
        node_name=node,
        socket_path=socket,
        interval_s=interval,
        topology_interval_s=topology_interval,
    )
    runner = Agent(
        settings,
        do_discover,
        lambda ann: patch_node_annotations(api, node, ann),
        current_annotations=current,
    )
    if once:
        written = runner.tick()
        typer.echo(json.dumps({"node": node, "written": written}))
        return
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    try:
        runner.run()
    except KeyboardInterrupt:
        runner.stop()
