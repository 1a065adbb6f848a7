"""The ``topo-sched`` command line: one typer app, one sub-module per command group.

Each command module in ``topo_sched.commands`` is thin: it parses flags, builds objects and
calls the core or an adapter. Errors a user can cause end as one line on stderr and exit 2.
"""

from __future__ import annotations

import typer

from topo_sched.commands import agent as agent_cmd
from topo_sched.commands import autoscaler as autoscaler_cmd
from topo_sched.commands import extender as extender_cmd
from topo_sched.commands import profile as profile_cmd
from topo_sched.commands import simulate as simulate_cmd
from topo_sched.commands import topology as topology_cmd

app = typer.Typer(
    name="topo-sched",
    help=(
        "Topology-aware placement and coordinated scaling for disaggregated LLM inference "
        "(RoleBasedGroup prefill/decode) on Kubernetes GPU clusters."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(topology_cmd.app, name="topology")
app.command("agent")(agent_cmd.agent)
app.command("autoscaler")(autoscaler_cmd.autoscaler)
app.command("extender")(extender_cmd.extender)
app.command("explain")(extender_cmd.explain)
app.command("profile")(profile_cmd.profile)
app.command("simulate")(simulate_cmd.simulate)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
