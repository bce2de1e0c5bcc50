"""The sepals server, in its three trust zones.

* :mod:`sepals.server.front`: the public front, the only thing on the public address;
  it serves SuperNodes (Flower's Fleet API) and nothing else.
* :mod:`sepals.server.control`: the operator's control plane (``sepals-server``, its
  configuration, key provisioning, the processes it supervises).
* :mod:`sepals.server.serverapp`: the ServerApp and its encrypted strategy, which only
  ever hold the public HE context.

:mod:`sepals.server.nodes` (which authenticated node is which client) is written by the
control plane and read by the ServerApp.
"""
