"""The host bootstrap, run from the agents' own bundle (built by ``pp bundle``).

- ``host``: ``bin/kickstart``: install the bundle on a host and start its agents
- ``hostconfig``: what this host's agents run with (``<basedir>/agents.json``)
- ``launch``: ``bin/launch/<agent>``: run one agent from an install with those flags
- ``check``: ``bin/check``: a release's agents load from it, dependencies and all
- ``units``: the agents' systemd units, on a host that runs them under systemd
"""
