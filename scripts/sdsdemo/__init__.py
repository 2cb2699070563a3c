"""Development helpers for sds-agent: dev tokens and a local "node" of agent + Envoys.

Used by scripts/quickstart.py and by the end-to-end tests in Tests/EndToEnd. Not part of the
production path: in a cluster, the API server signs the tokens and Kubernetes runs the processes.
"""
