"""Key version lifecycle: stage -> canary(n%) -> active -> retiring -> revoked.

Pure functions over an immutable `KeyState`; the keyring stores the state in Redis and
applies transitions atomically (optimistic WATCH/MULTI). Every transition bumps
`generation`, which replicas compare to know their cached view is stale.

* `stage(v)`: a new sealed version exists; it serves no traffic.
* `canary(v, percent)`: v serves `percent` % of requests (chosen by request id hash).
* `promote()`: the canary becomes active; the old active goes to retiring (still
  decryptable, never chosen for new requests, so in-flight requests finish on it).
* `rollback()`: a canary goes back to staged, marked failed; right after a promote (no
  canary), the previous active version comes back and the new one is staged.
* `revoke(v)`: v is never injected again, by any replica, once they see the state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = [
    "KeyState",
    "RotationError",
    "canary",
    "choose_version",
    "promote",
    "revoke",
    "rollback",
    "stage",
]


class RotationError(Exception):
    """A transition that the current state does not allow; the message says why."""


@dataclass(frozen=True, slots=True)
class KeyState:
    active: int | None = None
    canary: int | None = None
    canary_percent: int = 0
    previous: int | None = None
    """The version `promote` replaced: what `rollback` restores right after a promote."""
    staged: tuple[int, ...] = ()
    retiring: tuple[int, ...] = ()
    revoked: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()
    """Canary versions rolled back (automatically or by an operator)."""
    generation: int = 0

    def state_of(self, version: int) -> str:
        if version in self.revoked:
            return "revoked"
        if version == self.active:
            return "active"
        if version == self.canary:
            return f"canary({self.canary_percent}%)"
        if version in self.retiring:
            return "retiring"
        if version in self.failed:
            return "staged(failed canary)"
        if version in self.staged:
            return "staged"
        return "unknown"

    def servable(self, version: int) -> bool:
        """May a request that already holds `version` keep using it?"""
        return version not in self.revoked and (
            version == self.active or version == self.canary or version in self.retiring)


def _next(state: KeyState, **changes: object) -> KeyState:
    return replace(state, generation=state.generation + 1, **changes)  # type: ignore[arg-type]


def _without(values: tuple[int, ...], version: int | None) -> tuple[int, ...]:
    return tuple(v for v in values if v != version)


def stage(state: KeyState, version: int) -> KeyState:
    if version in state.revoked or version in state.staged or version == state.active:
        raise RotationError(f"version {version} is already known ({state.state_of(version)})")
    if state.active is None and state.canary is None:
        # The very first version of a credential has nothing to canary against.
        return _next(state, active=version)
    return _next(state, staged=(*state.staged, version))


def canary(state: KeyState, version: int, percent: int) -> KeyState:
    if not 1 <= percent <= 100:
        raise RotationError("canary percent must be from 1 to 100")
    if state.canary is not None and state.canary != version:
        raise RotationError(f"version {state.canary} is already the canary; promote or "
                            "roll it back first")
    if version not in state.staged and version != state.canary:
        raise RotationError(f"version {version} is {state.state_of(version)}, not staged")
    return _next(state, canary=version, canary_percent=percent,
                 staged=_without(state.staged, version), failed=_without(state.failed, version))


def promote(state: KeyState) -> KeyState:
    if state.canary is None:
        raise RotationError("there is no canary to promote")
    retiring = state.retiring if state.active is None else (*state.retiring, state.active)
    return _next(state, active=state.canary, canary=None, canary_percent=0,
                 previous=state.active, retiring=_without(retiring, state.canary))


def rollback(state: KeyState) -> KeyState:
    if state.canary is not None:
        return _next(state, canary=None, canary_percent=0,
                     staged=(*state.staged, state.canary),
                     failed=(*state.failed, state.canary))
    if state.previous is not None and state.previous not in state.revoked:
        return _next(state, active=state.previous, previous=None,
                     retiring=_without(state.retiring, state.previous),
                     staged=(*state.staged, *((state.active,) if state.active else ())),
                     failed=(*state.failed, *((state.active,) if state.active else ())))
    raise RotationError("nothing to roll back: no canary and no previous active version")


def revoke(state: KeyState, version: int) -> KeyState:
    if version == state.active:
        raise RotationError(f"version {version} is active; promote another version first")
    if version in state.revoked:
        raise RotationError(f"version {version} is already revoked")
    if version == state.canary:
        state = replace(state, canary=None, canary_percent=0)
    return _next(state, revoked=(*state.revoked, version),
                 staged=_without(state.staged, version),
                 retiring=_without(state.retiring, version),
                 failed=_without(state.failed, version),
                 previous=None if state.previous == version else state.previous)


def choose_version(state: KeyState, bucket: int) -> int | None:
    """The version a new request uses; `bucket` is 0..99 from the request id."""
    if state.canary is not None and bucket < state.canary_percent:
        return state.canary
    return state.active
