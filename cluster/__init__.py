"""The control plane of a Baton cluster (mostly not built yet).

This package will own starting or connecting to Ray, the pools of prefill and decode
instances as Ray actors in placement groups, health checks and restarts, scaling, the
placement planner (``cluster.planner``), the admin service, and the ``baton`` command-line
tool. It is the only package that uses ``ray.remote``. Today only the CLI exists
(``cluster.cli``), and it runs the engine offline in the calling process.
"""
