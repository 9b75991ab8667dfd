"""The Python API: one module per command (`loratool.api.merge` defines `merge` and `MergeResult`),
plus `report` for the result types several commands share.

The public names are the top-level package's (`loratool.merge`, `from loratool import MergeResult`),
which imports the module that defines each on first use; importing this package imports none of them.
"""
