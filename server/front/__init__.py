"""The public front of a deployed server: it serves SuperNodes and nothing else.

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), Control API (the ``flwr``
CLI: submit, stop and list runs, register nodes, stream logs) and Runtime API
(ServerApp processes) on one port, and its TLS asks clients for no certificate. On a
public address that lets anyone with the CA certificate control the federation.

So ``sepals-server`` binds the SuperLink to loopback and puts this front on the public
address (``python -m sepals.server.front``, :mod:`~sepals.server.front.cli`). It has
three jobs, one module each:

* :mod:`~sepals.server.front.listener` terminates TLS and speaks HTTP/1.1 under
  deadlines and size and connection limits, so that slow or partial requests cannot
  hold it (:mod:`~sepals.server.front.limits`); only complete requests go on;
* :mod:`~sepals.server.front.app` forwards exactly the Fleet API's routes,
  ``POST /v1/fleet/<route>``, to the SuperLink and answers ``404`` to anything else.
"""

from sepals.server.front.app import FLEET_ROUTES, FleetFront
from sepals.server.front.limits import MAX_BODY_BYTES, FrontLimits

__all__ = ["FLEET_ROUTES", "MAX_BODY_BYTES", "FleetFront", "FrontLimits"]
