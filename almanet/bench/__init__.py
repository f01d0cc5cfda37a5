"""End-to-end benchmarks: what ``almanet bench`` runs, and what ``benchmarks/`` shares with it.

``runner`` measures and prints the table; ``brokers`` starts the brokers
(embedded, nsqd, nats-server); ``workers`` runs a service or a workload
(``workloads``) in a process of its own; ``go_clients`` runs NSQ's Go bench
clients; ``baseline`` is the RPC design almanet replaced (ansq transport, JSON
envelope, one future per call id), which ``benchmarks/`` still measure against.
"""
