"""NBD front end: applications read and write a MARS resource through an NBD export."""

from marslib.nbd.server import NbdBackend, NbdServer, start_nbd_server

__all__ = ["NbdBackend", "NbdServer", "start_nbd_server"]
