"""The synchronous admin API client ``extauth admin`` is a thin shell over."""

from __future__ import annotations

from typing import Any

import grpc

from extauth._generated.extauth.admin.v1 import admin_pb2, admin_pb2_grpc
from extauth.admin.tls import ClientTls


class AdminError(Exception):
    """An admin call that failed; the message is fit for a terminal (no traceback)."""


class AdminClient:
    """Synchronous client for the admin API. Every method raises AdminError on failure."""

    def __init__(self, address: str, token: str | None = None, *, timeout: float = 5.0,
                 tls: ClientTls | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = (grpc.secure_channel(address, tls.credentials(), options=tls.options())
                         if tls is not None else grpc.insecure_channel(address))
        self._stub = admin_pb2_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            code = e.code()
            details = e.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and "store" not in details:
                raise AdminError(f"cannot reach the admin API at {self.address}: {details}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise AdminError(f"the admin API at {self.address} did not answer within "
                                 f"{self.timeout:g}s") from None
            raise AdminError(f"{code.name.lower()}: {details}") from None

    def list_leases(self, *, user: str | None = None, ip: str | None = None, policy: str = "") -> list[Any]:
        return list(self.connections(user=user, ip=ip, policy=policy).leases)

    def connections(self, *, user: str | None = None, ip: str | None = None, policy: str = "") -> Any:
        """The ListLeasesResponse: the leases, and for a user their quota overrides."""
        req = admin_pb2.ListLeasesRequest(policy=policy)
        if user is not None:
            req.user = user
        if ip is not None:
            req.ip = ip
        return self._call("ListLeases", req)

    def set_quota(self, user: str, policy: str, *, connections: int | None = None,
                  attempts_per_minute: int | None = None, seconds: float = 0.0) -> list[Any]:
        req = admin_pb2.SetQuotaRequest(user=user, policy=policy, seconds=seconds)
        if connections is not None:
            req.connections_per_user = connections
        if attempts_per_minute is not None:
            req.attempts_per_user_per_minute = attempts_per_minute
        return list(self._call("SetQuota", req).overrides)

    def get_quota(self, user: str, policy: str = "") -> list[Any]:
        return list(self._call("GetQuota", admin_pb2.GetQuotaRequest(user=user, policy=policy)).overrides)

    def clear_quota(self, user: str, policy: str = "") -> bool:
        return bool(self._call("ClearQuota", admin_pb2.ClearQuotaRequest(user=user, policy=policy)).cleared)

    def release(self, lease_id: str, *, user: str | None = None, ip: str | None = None,
                policy: str = "") -> Any:
        return self._call("ReleaseLease", admin_pb2.ReleaseLeaseRequest(
            lease_id=lease_id, policy=policy, user=user or "", ip=ip or ""))

    def list_bans(self) -> list[Any]:
        return list(self._call("ListBans", admin_pb2.ListBansRequest()).bans)

    def ban(self, ip: str, seconds: float, reason: str = "") -> Any:
        return self._call("Ban", admin_pb2.BanRequest(ip=ip, seconds=seconds, reason=reason)).ban

    def unban(self, ip: str) -> bool:
        return bool(self._call("Unban", admin_pb2.UnbanRequest(ip=ip)).unbanned)

    def stats(self) -> Any:
        return self._call("Stats", admin_pb2.StatsRequest())

    def revoke(self, kind: str, subject: str, value: str = "", before: float = 0.0) -> Any:
        """The RevokeResponse: the revocation and whether it was recorded."""
        return self._call("Revoke", admin_pb2.RevokeRequest(kind=kind, subject=subject, value=value,
                                                            before=before))

    def unrevoke(self, kind: str, subject: str, value: str = "") -> bool:
        return bool(self._call("Unrevoke", admin_pb2.UnrevokeRequest(
            kind=kind, subject=subject, value=value)).unrevoked)

    def list_revocations(self) -> list[Any]:
        return list(self._call("ListRevocations", admin_pb2.ListRevocationsRequest()).revocations)
