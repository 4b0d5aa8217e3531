"""Generated stubs of Baton's public gRPC API (``baton.v1``), from ``baton.proto``.

Regenerate with ``scripts/gen_protos.sh``; a test fails when they are stale."""
