"""A block device node ``/dev/mars/R`` for a resource's NBD export on its primary.

Two backends, chosen by what the kernel has: ``nbd-client`` onto ``/dev/nbdN`` where
``/sys/module/nbd`` exists (:mod:`.kernel`), else nbdfuse plus a buffered loop device
(:mod:`.fuse`). :mod:`.node` attaches, inspects and detaches one node; :mod:`.service` is
marsd's side (the ``todo-HOST/device`` switch, the control commands). ``MARS_DEV_DIR``
moves ``/dev/mars`` (tests). docs/block-device.md explains it all.
"""

from marslib.devnode.common import FUSE, KERNEL, NodeInfo, dev_dir
from marslib.devnode.node import attach, choose_backend, detach, in_use, node_state

__all__ = ["FUSE", "KERNEL", "NodeInfo", "attach", "choose_backend", "detach", "dev_dir",
           "in_use", "node_state"]
