"""Defaults shared by the server and the clients. Imports nothing, so the light client (the
base install, without the server's dependencies) can use it."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_ADDRESS = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
