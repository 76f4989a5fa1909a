"""A gRPC rate-limiting sidecar for Envoy (RLS v3) over Redis sliding windows."""

__version__ = "0.1.0"
