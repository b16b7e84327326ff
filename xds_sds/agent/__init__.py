"""The node agent (``mesh-identity agent``): makes every private key where the workload runs, obtains SVIDs
for them through the control plane's signing API, and serves SDS and the SPIFFE Workload API on Unix sockets."""
