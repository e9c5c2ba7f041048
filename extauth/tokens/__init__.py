"""Bearer tokens: transport (extract), verification (jwt), key sets (keyset), sources (jwks, fetch), cache."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """What survives verification. Never holds the raw token."""

    claims: Mapping[str, Any]
    user: str
    expires_at: float  # unix seconds (the token's exp)
    # The thumbprint of the key that verified it (extauth.tokens.keyset.thumbprint): a cached
    # verification is forgotten once its key leaves the key set.
    key: str = field(default="", repr=False)
