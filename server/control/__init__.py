"""The operator's control plane: ``sepals-server``, its configuration, provisioning, processes.

Only the operator reaches it: nothing here listens on the public address, which
:mod:`sepals.server.front` serves to SuperNodes alone.
"""
