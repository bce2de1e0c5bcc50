"""The public front of a deployed server: it serves SuperNodes and nothing else.

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), Control API (the ``flwr``
CLI: submit, stop and list runs, register nodes, stream logs) and Runtime API
(ServerApp processes) on one port, and its TLS asks clients for no certificate. On a
public address that lets anyone with the CA certificate control the federation.

So ``sepals-server`` binds the SuperLink to loopback and puts this front on the public
address (``python -m sepals.server.front``, :mod:`~sepals.server.front.cli`):

* :mod:`~sepals.server.front.listener` accepts connections within per-address and
  total shares, and :mod:`~sepals.server.front.connection` terminates TLS and reads
  HTTP/1.1 under deadlines and size caps (:mod:`~sepals.server.front.limits`), so that
  slow, partial or oversized requests cannot hold the front; only complete requests
  go on;
* :mod:`~sepals.server.front.app` forwards exactly the Fleet API's routes,
  ``POST /v1/fleet/<route>``, to the SuperLink and answers ``404`` to anything else.
"""

from sepals.server.front.app import FLEET_ROUTES, FleetFront
from sepals.server.front.limits import MAX_BODY_BYTES, FrontLimits

__all__ = ["FLEET_ROUTES", "MAX_BODY_BYTES", "FleetFront", "FrontLimits"]
