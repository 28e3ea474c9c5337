"""The order in which one organization's changes reach the application, defined once: the delivery clients send
in it (``batches``) and the ledger reads in it (``RANK_SQL``)."""

from __future__ import annotations

from typing import Iterable

# The protocol's order within one organization (docs/delivery-protocol.md): creates and reactivations; then updates, memberships added, roles granted;
# then memberships removed, roles revoked; then deactivations and deletes. Within a tier the finer rank below puts a
# user's attributes before the memberships and roles that name it.
DELIVERY_RANK = {
    ("user", "create"): 0,
    ("user", "reactivate"): 0,
    ("user", "update"): 1,
    ("group", "update"): 1,  # groups (the SCIM 2.0 protocol only): renamed before members are added,
    ("membership", "add"): 2,
    ("role", "grant"): 3,
    ("membership", "remove"): 4,
    ("role", "revoke"): 5,
    ("user", "deactivate"): 6,
    ("user", "delete"): 7,
    ("group", "delete"): 7,  # deleted once their members are removed
}
_UNKNOWN_RANK = 8  # sent last; the application rejects them on their own


def order_changes(changes: Iterable[dict]) -> list[dict]:
    """One organization's changes in delivery order; a stable sort, so the caller's order holds within a rank."""
    return sorted(changes, key=lambda c: DELIVERY_RANK.get((c.get("entity"), c.get("op")), _UNKNOWN_RANK))


def batches(changes: Iterable[dict], size: int = 500) -> list[list[dict]]:
    """``order_changes``, cut into consecutive batches of at most ``size``. Send them in this order, one after the
    other, and stop at the first that is not delivered (``changes_protocol.send_changes`` does, halving a batch
    the application cannot take)."""
    if size < 1:
        raise ValueError("batch size must be at least 1")
    ordered = order_changes(changes)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


# The same order as a SQL expression over a ledger row's ``entity`` and ``op``.
RANK_SQL = "CASE " + " ".join(
    f"WHEN entity = '{e}' AND op = '{o}' THEN {r}" for (e, o), r in DELIVERY_RANK.items()
) + f" ELSE {_UNKNOWN_RANK} END"
