"""Generated grpc stubs for the grpc backend; regenerate with ``scripts/gen_protos.sh``."""
