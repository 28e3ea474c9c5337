"""The Scalekit emulator: a local, Scalekit-compatible server for the real ``scalekit-sdk-python``
(docs/emulator.md). Entry point: ``scim_pipeline.devstack.emulator.server:run_from_cli``; the parts are named after
their concept:
``tls`` and ``router`` (one TLS port, ALPN-routed), ``gateway`` (credentials, tokens, faults), ``grpc_services``,
``control`` (token endpoint and control API), ``directory`` and ``synthetic`` (the data), ``mutations``,
``events`` (webhook payloads), ``webhooks`` (delivery) and ``churn``.
"""
