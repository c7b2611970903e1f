"""pp-setlive: run the active version of each app assigned to this node, under runit.

observe (the host as it is) -> plan (pure) -> apply (through the runit adapter),
with a health gate and automatic rollback; see docs/operations.md.
"""
