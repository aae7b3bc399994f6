"""Testing aids for areal and its plugins: tiny offline models and the conformance kit.

Nothing here is imported by ``import areal_core``; torch is imported only when a builder runs.
"""
