# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Lease(_message.Message):
    __slots__ = ("lease_id", "policy", "user", "ip", "expires_at")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    policy: str
    user: str
    ip: str
    expires_at: float
    def __init__(self, lease_id: _Optional[str] = ..., policy: _Optional[str] = ..., user: _Optional[str] = ..., ip: _Optional[str] = ..., expires_at: _Optional[float] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ("user", "ip", "policy")
    USER_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    user: str
    ip: str
    policy: str
    def __init__(self, user: _Optional[str] = ..., ip: _Optional[str] = ..., policy: _Optional[str] = ...) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ("leases", "quota_overrides")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    quota_overrides: _containers.RepeatedCompositeFieldContainer[QuotaOverride]
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., quota_overrides: _Optional[_Iterable[_Union[QuotaOverride, _Mapping]]] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "policy", "user", "ip")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    policy: str
    user: str
    ip: str
    def __init__(self, lease_id: _Optional[str] = ..., policy: _Optional[str] = ..., user: _Optional[str] = ..., ip: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("released", "lease")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    released: bool
    lease: Lease
    def __init__(self, released: _Optional[bool] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class BanEntry(_message.Message):
    __slots__ = ("ip", "expires_at", "reason")
    IP_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ip: str
    expires_at: float
    reason: str
    def __init__(self, ip: _Optional[str] = ..., expires_at: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class ListBansRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBansResponse(_message.Message):
    __slots__ = ("bans",)
    BANS_FIELD_NUMBER: _ClassVar[int]
    bans: _containers.RepeatedCompositeFieldContainer[BanEntry]
    def __init__(self, bans: _Optional[_Iterable[_Union[BanEntry, _Mapping]]] = ...) -> None: ...

class BanRequest(_message.Message):
    __slots__ = ("ip", "seconds", "reason")
    IP_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ip: str
    seconds: float
    reason: str
    def __init__(self, ip: _Optional[str] = ..., seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class BanResponse(_message.Message):
    __slots__ = ("ban",)
    BAN_FIELD_NUMBER: _ClassVar[int]
    ban: BanEntry
    def __init__(self, ban: _Optional[_Union[BanEntry, _Mapping]] = ...) -> None: ...

class UnbanRequest(_message.Message):
    __slots__ = ("ip",)
    IP_FIELD_NUMBER: _ClassVar[int]
    ip: str
    def __init__(self, ip: _Optional[str] = ...) -> None: ...

class UnbanResponse(_message.Message):
    __slots__ = ("unbanned",)
    UNBANNED_FIELD_NUMBER: _ClassVar[int]
    unbanned: bool
    def __init__(self, unbanned: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecisionCount(_message.Message):
    __slots__ = ("policy", "result", "reason", "count")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    policy: str
    result: str
    reason: str
    count: int
    def __init__(self, policy: _Optional[str] = ..., result: _Optional[str] = ..., reason: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("active_leases", "bans", "decisions", "hostile_signals", "bans_issued", "store_error")
    class HostileSignalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BansIssuedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    BANS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    HOSTILE_SIGNALS_FIELD_NUMBER: _ClassVar[int]
    BANS_ISSUED_FIELD_NUMBER: _ClassVar[int]
    STORE_ERROR_FIELD_NUMBER: _ClassVar[int]
    active_leases: int
    bans: int
    decisions: _containers.RepeatedCompositeFieldContainer[DecisionCount]
    hostile_signals: _containers.ScalarMap[str, int]
    bans_issued: _containers.ScalarMap[str, int]
    store_error: str
    def __init__(self, active_leases: _Optional[int] = ..., bans: _Optional[int] = ..., decisions: _Optional[_Iterable[_Union[DecisionCount, _Mapping]]] = ..., hostile_signals: _Optional[_Mapping[str, int]] = ..., bans_issued: _Optional[_Mapping[str, int]] = ..., store_error: _Optional[str] = ...) -> None: ...

class Revocation(_message.Message):
    __slots__ = ("kind", "subject", "value", "before", "expires_at")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    subject: str
    value: str
    before: float
    expires_at: float
    def __init__(self, kind: _Optional[str] = ..., subject: _Optional[str] = ..., value: _Optional[str] = ..., before: _Optional[float] = ..., expires_at: _Optional[float] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("kind", "subject", "value", "before")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    subject: str
    value: str
    before: float
    def __init__(self, kind: _Optional[str] = ..., subject: _Optional[str] = ..., value: _Optional[str] = ..., before: _Optional[float] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("revocation", "recorded")
    REVOCATION_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    revocation: Revocation
    recorded: bool
    def __init__(self, revocation: _Optional[_Union[Revocation, _Mapping]] = ..., recorded: _Optional[bool] = ...) -> None: ...

class UnrevokeRequest(_message.Message):
    __slots__ = ("kind", "subject", "value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    subject: str
    value: str
    def __init__(self, kind: _Optional[str] = ..., subject: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class UnrevokeResponse(_message.Message):
    __slots__ = ("unrevoked",)
    UNREVOKED_FIELD_NUMBER: _ClassVar[int]
    unrevoked: bool
    def __init__(self, unrevoked: _Optional[bool] = ...) -> None: ...

class ListRevocationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRevocationsResponse(_message.Message):
    __slots__ = ("revocations",)
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    revocations: _containers.RepeatedCompositeFieldContainer[Revocation]
    def __init__(self, revocations: _Optional[_Iterable[_Union[Revocation, _Mapping]]] = ...) -> None: ...

class QuotaOverride(_message.Message):
    __slots__ = ("policy", "user", "connections_per_user", "attempts_per_user_per_minute", "expires_at")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_PER_USER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_PER_USER_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    policy: str
    user: str
    connections_per_user: int
    attempts_per_user_per_minute: int
    expires_at: float
    def __init__(self, policy: _Optional[str] = ..., user: _Optional[str] = ..., connections_per_user: _Optional[int] = ..., attempts_per_user_per_minute: _Optional[int] = ..., expires_at: _Optional[float] = ...) -> None: ...

class SetQuotaRequest(_message.Message):
    __slots__ = ("policy", "user", "connections_per_user", "attempts_per_user_per_minute", "seconds")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_PER_USER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_PER_USER_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    user: str
    connections_per_user: int
    attempts_per_user_per_minute: int
    seconds: float
    def __init__(self, policy: _Optional[str] = ..., user: _Optional[str] = ..., connections_per_user: _Optional[int] = ..., attempts_per_user_per_minute: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class GetQuotaRequest(_message.Message):
    __slots__ = ("user", "policy")
    USER_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    user: str
    policy: str
    def __init__(self, user: _Optional[str] = ..., policy: _Optional[str] = ...) -> None: ...

class QuotaResponse(_message.Message):
    __slots__ = ("overrides",)
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    overrides: _containers.RepeatedCompositeFieldContainer[QuotaOverride]
    def __init__(self, overrides: _Optional[_Iterable[_Union[QuotaOverride, _Mapping]]] = ...) -> None: ...

class ClearQuotaRequest(_message.Message):
    __slots__ = ("user", "policy")
    USER_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    user: str
    policy: str
    def __init__(self, user: _Optional[str] = ..., policy: _Optional[str] = ...) -> None: ...

class ClearQuotaResponse(_message.Message):
    __slots__ = ("cleared",)
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    cleared: bool
    def __init__(self, cleared: _Optional[bool] = ...) -> None: ...
