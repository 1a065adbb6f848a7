"""topo-sched: topology-aware placement and coordinated scaling for disaggregated LLM inference."""

__version__ = "0.1.0"
