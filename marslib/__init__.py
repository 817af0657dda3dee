"""marslib: MARS-style asynchronous replication of block devices."""

__version__ = "0.4.0"
