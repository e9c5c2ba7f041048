"""The admin gRPC API (``extauth.admin.v1.Admin``) on its own address, ``admin_listen``.

Bearer token from ``admin_token_env``: required off loopback, checked on loopback when set.
A new command: its RPC in ``service``, a method in ``client``, a ``Command`` in ``cli``.
"""
