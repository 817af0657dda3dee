"""mars-app: the demo application that stands in for a customer's container in the lab.

It puts a filesystem on a MARS resource's NBD export (:mod:`marslib.app.volume`), appends
self-checking, numbered records to it (:mod:`marslib.app.writer`, format in
:mod:`marslib.app.records`), keeps a host-local ledger of what it has fsynced, and checks
afterwards that nothing it acknowledged was lost (:mod:`marslib.app.verify`).
Command line: :mod:`marslib.app.cli`; documentation: ``docs/app.md``.
"""
