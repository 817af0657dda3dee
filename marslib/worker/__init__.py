"""Resource workers: each resource's data path in a process of its own.

marsd keeps the metadata exchange, the control socket, the network ports and the
reconcile loop; the bricks of each resource (a primary's device, logger and NBD export; a
secondary's sync, fetch and replay) run in a worker process that marsd starts, talks to
over a socketpair and restarts when it dies, so that resources use as many cores as
there are. ``marsd --workers off`` runs them in marsd's own loop instead.

- :mod:`marslib.worker.messages`: the channel's frame format and typed messages
- :mod:`marslib.worker.channel`: requests, replies and events over a unix socket
- :mod:`marslib.worker.handle`: what marsd uses of a running resource (both modes)
- :mod:`marslib.worker.local`: resources run in the calling process
- :mod:`marslib.worker.process`: the worker process (``python -m marslib.worker``)
- :mod:`marslib.worker.supervisor`: marsd's side: start, proxy, notice the end
"""
