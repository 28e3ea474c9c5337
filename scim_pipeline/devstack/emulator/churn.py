"""Live directory churn (``--churn N``): N realistic changes a minute, drawn from the seed, applied through the same
mutation path as the control API so they emit the same webhook events.

The mix resembles a company's directory: hires, leavers (deactivated first, deleted some time later), name and
title changes, team moves, new or renamed groups, and returning employees.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from scim_pipeline.devstack.emulator.mutations import MutationError
from scim_pipeline.devstack.emulator.synthetic import GROUP_NAMES, GROUP_SUFFIXES

if TYPE_CHECKING:
    from scim_pipeline.devstack.emulator.server import Emulator

log = logging.getLogger(__name__)

# (kind, weight)
MIX = [("hire", 24), ("leave", 14), ("delete_leaver", 8), ("rename", 10), ("retitle", 8), ("team_move", 18),
       ("join_group", 6), ("new_group", 3), ("rename_group", 3), ("reactivate", 6)]


class Churn:
    def __init__(self, emulator: "Emulator", per_minute: float, seed: int):
        self.emulator = emulator
        self.interval = 60.0 / per_minute
        self.rng = random.Random(f"churn:{seed}")
        self.kinds = [k for k, _ in MIX]
        self.weights = [w for _, w in MIX]
        self.applied = 0

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not stop.is_set():
            next_at += self.interval
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
                return
            except asyncio.TimeoutError:
                pass
            # Off the event loop: a change to a large group can take a moment, and the loop pipes gRPC traffic.
            await asyncio.to_thread(self.step)

    def step(self) -> list:
        """One change (a few attempts to find an applicable one); returns the mutation results."""
        for _ in range(5):
            with self.emulator.store.lock:
                ops = self.plan()
            if not ops:
                continue
            try:
                applied = self.emulator.mutate(ops)
            except MutationError as exc:  # the directory changed under the plan; pick another change
                log.debug("churn skipped: %s", exc)
                continue
            self.applied += 1
            return [a.result() for a in applied]
        return []

    def plan(self) -> list[dict]:
        store, rng = self.emulator.store, self.rng
        dirs = [d for o in store.organizations.values() for d in o.directories]
        if not dirs:
            return []
        d = rng.choice(dirs)
        kind = rng.choices(self.kinds, self.weights)[0]
        groups = [store.groups[g] for g in d.group_ids]
        user = store.users[d.user_ids[rng.randrange(len(d.user_ids))]] if d.user_ids else None
        pools = self.emulator.factory(d.organization_id).pools

        if kind == "hire" or user is None:
            picked = rng.sample(groups, min(len(groups), rng.choice((1, 1, 2)))) if groups else []
            attrs = {"department": picked[0].display_name} if picked else {}
            return [{"op": "create_user", "organization_id": d.organization_id, "directory_id": d.id,
                     "user": attrs, "groups": [g.id for g in picked]}]
        if kind == "leave":
            return [{"op": "deactivate_user", "user_id": user.id}] if user.active else []
        if kind == "delete_leaver":
            return [] if user.active else [{"op": "delete_user", "user_id": user.id}]
        if kind == "reactivate":
            return [] if user.active else [{"op": "reactivate_user", "user_id": user.id}]
        if kind == "rename":
            return [{"op": "update_user", "user_id": user.id,
                     "changes": {"family_name": rng.choice(pools.last_names)}}]
        if kind == "retitle":
            return [{"op": "update_user", "user_id": user.id, "changes": {"title": rng.choice(pools.titles)}}]
        if kind == "team_move" and len(groups) >= 2:
            target = rng.choice([g for g in groups if g.id not in user.groups] or groups)
            ops: list[dict] = []
            if user.groups:
                ops.append({"op": "remove_member", "group_id": user.groups[0], "user_id": user.id})
            ops.append({"op": "add_member", "group_id": target.id, "user_id": user.id})
            ops.append({"op": "update_user", "user_id": user.id, "changes": {"department": target.display_name}})
            return ops
        if kind == "join_group" and groups:
            target = rng.choice(groups)
            return [] if target.id in user.groups else [
                {"op": "add_member", "group_id": target.id, "user_id": user.id}]
        if kind == "new_group":
            name = f"{rng.choice(GROUP_NAMES)} {rng.choice(GROUP_SUFFIXES)} {rng.randrange(100, 999)}"
            return [{"op": "create_group", "organization_id": d.organization_id, "directory_id": d.id,
                     "display_name": name}]
        if kind == "rename_group" and groups:
            g = rng.choice(groups)
            return [{"op": "rename_group", "group_id": g.id,
                     "display_name": f"{g.display_name.split(' (')[0]} ({rng.choice(GROUP_SUFFIXES)})"}]
        return []
