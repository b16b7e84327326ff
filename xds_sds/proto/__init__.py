"""The repo's own protos and their generated code (``generate.sh``): the signing API between the agent and the
control plane (``signing.proto``) and the SPIFFE Workload API's messages (``workload.proto``)."""
