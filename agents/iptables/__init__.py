"""pp-iptables: open and map each app's ports, touching nothing it does not own."""
