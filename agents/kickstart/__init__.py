"""The host bootstrap: the agents' own bundle (bundle.py), laid down by scripts/kickstart."""
