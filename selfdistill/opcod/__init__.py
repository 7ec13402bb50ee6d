"""OPCoD (arXiv 2606.14368) tooling: teacher views (gate, anchoring), peer models, the table.

The training method itself is :class:`selfdistill.methods.opcod.OPCoD`.
"""
