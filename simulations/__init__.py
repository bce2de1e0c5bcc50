"""Local multi-client simulations (``sepals-sim``) on Flower's Ray backend."""
