"""Exceptions of the secure-aggregation library.

Two kinds of failure matter to a caller and are kept apart: a round that cannot finish because
too many sites dropped out (``SecAggAbort``: harmless, the global model stays unchanged and the
next round proceeds) and a peer or the server breaking the protocol (``ProtocolViolation``: the
site must stop answering this round, because answering could leak its update). Bad
configurations are plain ``ValueError`` raised before any key is generated.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every secure-aggregation failure."""


class SecAggAbort(SecAggError):
    """The round cannot be completed: fewer sites survived than the threshold (or than the minimum
    number of sites a sum must contain). Nothing about any individual update has been revealed."""


class ProtocolViolation(SecAggError):
    """A message broke the protocol (a request for both shares of one node, a tampered ciphertext,
    a call in the wrong stage). The party that raises it has revealed nothing for that message."""
