"""The ServerApp: the encrypted strategy, reply checks, masking and the server's state.

It runs in Flower's ServerApp process and only ever holds the public HE context.
"""
