"""Running on Ray: connecting, Ray Data's context, live progress, and the cluster's job server."""
