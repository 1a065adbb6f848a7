"""Engine performance profiles measured on a GPU (``topo-sched profile``).

- :mod:`.bench` (needs PyTorch with a CUDA GPU, imported only by the command that measures):
  times a slice of transformer layers of a model shape with random bf16 weights.
- :mod:`.fit` (numpy only): derives prefill tokens/s against prompt length, a decode ITL model
  ``a + b*batch + c*batch*context`` and the sequences one GPU sustains at an ITL target.
- :mod:`.profile_io`: the profile JSON (model, GPU, software, raw timings, fits, method) and
  :func:`~.profile_io.to_engine_profile`, which turns it into the simulator's ``EngineProfile``.
- :mod:`.dynamo`: reads NVIDIA Dynamo profiler output into the same fits.
- :mod:`.capacity`: per-replica capacity hints for the autoscaler from a profile.

Nothing here imports torch at module level: the base install works without it.
"""
