"""The scheduler process: the leader lease, the tick's steps (recover, assign, lifecycle, dispatch), metrics.

``loop.Scheduler`` is the process; ``dispatch`` meters chunks into Redis; ``metrics`` serves Prometheus.
Placement decisions are pure functions in ``batchllm.placement``; recurring schedules are a service
(``batchllm.services.schedules``) that the command line hands in as a hook. The scheduler sits above the
store, the queue contract and placement, and never imports ``batchllm.worker`` or ``batchllm.services``.
"""
