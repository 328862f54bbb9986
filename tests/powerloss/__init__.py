"""A power-loss file system for the tests.

model.py decides what survives a cut; fusefs.py is the FUSE server that logs the calls.
"""
