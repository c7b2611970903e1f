"""pp-preparer: fetch, verify and install every version the intent names for this node.

observe.py reads the disk, plan.py decides (pure), apply.py acts, agent.py ties
them into the shared runtime and __main__.py is the command line.
"""
