"""test."""
X = 1
