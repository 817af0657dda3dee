"""The admin layer: what marsadm does, without argparse.

Each module holds one part of the domain: pure decision functions over a snapshot of the
tree (``handover_refusal(snapshot, live, host) -> str | None`` and the like), tested
directly, and the steps that act on the tree and ask marsd. ``marslib.cli`` parses the
command line, calls one function here and renders what it returns.

- :mod:`.context`: :class:`Admin`, what every step gets (paths, tree, marsd, output);
- :mod:`.snapshot`: a resource's tree values read once, typed;
- :mod:`.view`: the read model (states, lag, advice) behind ``view``;
- :mod:`.cluster`: create, join and leave the cluster;
- :mod:`.membership`: create, join, leave and delete a resource;
- :mod:`.roles`: handover, failover, ``secondary``, split brain, ``invalidate``;
- :mod:`.switches`: up, down, pause and resume, waiting for a condition;
- :mod:`.resize`: growing a resource;
- :mod:`.housekeeping`: log rotation and deletion (marsd owns logfiles);
- :mod:`.devnode`: the block device node of a resource;
- :mod:`.verify`: online verify of a secondary against the primary.
"""
