"""The admin gRPC API (``extauth.admin.v1.Admin``), on its own address ``admin_listen``.

Calls carry ``authorization: Bearer <token>``, the token being the value of the environment
variable ``admin_token_env``, compared in constant time. Off loopback the token is required (the
server refuses to start without it); on loopback it is checked when set. Every call goes through
the request path's Store, so a ban made here reaches every replica.

``service``: the RPCs. ``server``: the token check, TLS and lifecycle. ``tls``: credentials from
PEM files. ``client``: the synchronous client. ``render``: tables and JSON. ``cli``: ``extauth
admin ...``. A new command: its RPC in ``service``, a method in ``client``, a ``Command`` in ``cli``.
"""
