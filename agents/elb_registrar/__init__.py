"""pp-elb-registrar: this instance in each app's load balancers exactly while the app's
active version runs here, passes its health check, and the node is not drained.

observe.py reads the host and AWS, plan.py decides (pure), apply.py acts through
agents/system/aws.py, state.py keeps what was registered, agent.py ties them into
the shared runtime and __main__.py is the command line.
"""
