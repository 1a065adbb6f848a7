"""The autoscaler's Kubernetes side: apply a scaling decision to an RBG, record Events about
it, and elect one active replica with a Lease.

- ``actuator.RbgActuator``: one change for all roles of an RBG (JSON Patch on the RBG for
  roles without a scaling adapter, the adapter's ``/scale`` for roles with one), retries,
  rollback.
- ``events.EventRecorder``: best-effort core/v1 Events about the RBG.
- ``leader.LeaseElector``: coordination.k8s.io/v1 Lease leader election.
"""
