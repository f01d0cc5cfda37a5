"""End-to-end benchmarks: workloads that ``almanet bench`` and ``benchmarks/`` run.

``workers`` runs a service (almanet's, or the baseline's) in a process of its
own; ``baseline`` is the RPC design almanet replaced (ansq transport, JSON
envelope, one future per call id), kept to measure against.
"""
