"""CCOPD (arXiv 2605.30251) tooling: sharding, the FULL / SHARDED / CONCAT settings, evaluation, the table.

The training method itself is :class:`selfdistill.methods.ccopd.CCOPD`.
"""
