"""Deterministic synthetic directories: the same seed and sizes always give the same organizations, directories,
users, groups, memberships and timestamps.

Faker (seeded) fills small pools of names, titles, companies and places once; every user is then drawn from those
pools with one seeded ``random.Random`` per organization. That keeps 100,000 users to a second or two, where
calling Faker per user would take far longer. The same pools feed the churn generator's hires.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from faker import Faker
from faker.providers.job.en_US import Provider as JobProvider
from faker.providers.person.en_US import Provider as PersonProvider

from scim_pipeline.devstack.emulator.directory import PROVIDERS, Directory, DirectoryStore, Group, Organization, User

BASE_TIME_US = 1_735_689_600_000_000  # 2025-01-01T00:00:00Z: generated history lies in 2025
_DAY_US = 86_400_000_000

GROUP_NAMES = [
    "Engineering", "Sales", "Marketing", "Finance", "Human Resources", "Customer Success", "Support", "Product",
    "Design", "Legal", "Operations", "IT", "Security", "Data", "Admins", "Executives", "Contractors", "Interns",
    "All Staff", "Platform", "Mobile", "Infrastructure", "QA", "Research", "Partnerships", "Procurement",
    "Facilities", "Billing Team", "Developer Relations", "Analytics",
]
GROUP_SUFFIXES = ["EMEA", "APAC", "Americas", "Leads", "Managers", "Berlin", "London", "New York", "Remote"]
EXTRA_GROUPS = (0, 0, 1, 1, 2)  # how many groups a user joins besides their department
ROLE_NAMES = ["admin", "member", "viewer", "billing", "editor", "support", "auditor"]
DIVISIONS = ["Research & Development", "Go-To-Market", "General & Administrative", "Operations"]
LOCALES = ["en-US", "en-GB", "de-DE", "fr-FR", "es-ES", "nl-NL", "ja-JP", "pt-BR"]
ZONES = ["America/New_York", "America/Los_Angeles", "Europe/London", "Europe/Berlin", "Europe/Paris",
         "Asia/Tokyo", "Asia/Singapore", "America/Sao_Paulo", "Australia/Sydney"]


@dataclass
class Pools:
    first_names: list[str]
    last_names: list[str]
    titles: list[str]
    companies: list[str]


def make_pools(seed: int, companies: int) -> Pools:
    fake = Faker("en_US")
    fake.seed_instance(seed)

    def unique(fn, n: int) -> list[str]:
        seen: dict[str, None] = {}
        for _ in range(n * 3):
            seen.setdefault(fn(), None)
            if len(seen) >= n:
                break
        return list(seen)

    # Names and titles are sampled from Faker's own lists in one seeded call each: calling ``first_name()`` per
    # pool entry costs ~0.25 ms a call here, and start-up time matters to every test that starts an emulator.
    return Pools(
        first_names=fake.random_sample(list(PersonProvider.first_names), 400),
        last_names=fake.random_sample(list(PersonProvider.last_names), 700),
        titles=fake.random_sample(list(JobProvider.jobs), 150),
        companies=unique(fake.company, max(companies, 1)),
    )


def _dp_id(rng: random.Random, provider: str) -> str:
    bits = rng.getrandbits(128)
    if provider == "OKTA":
        return "00u" + format(bits, "032x")[:17]
    h = format(bits, "032x")
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower()) or "user"


class UserFactory:
    """Draws realistic users for one organization; shared by the initial data and the churn's hires.

    ``fill`` sets what every listing and the truth need, using ``rng.random()`` and index arithmetic (it is the hot
    loop of start-up); ``profile`` derives the rest of the SCIM profile on first use from the user's own seed.
    """

    def __init__(self, pools: Pools, rng: random.Random, org: Organization, salt: int):
        self.pools, self.rng, self.org, self.salt = pools, rng, org, salt
        self.taken: set[str] = set()
        self.counter = 0
        self.first_slugs = [_slug(n) for n in pools.first_names]
        self.last_slugs = [_slug(n) for n in pools.last_names]
        self.leaders: dict[str, list[User]] = {}  # per directory: its first users, who manage the others
        self.leader_pos: dict[str, int] = {}
        self.providers: dict[str, str] = {}  # directory id -> provider

    def fill(self, user: User, created_at: int, department: str = "") -> None:
        r = self.rng.random
        pools = self.pools
        self.counter += 1
        n = self.counter
        fi = int(r() * len(pools.first_names))
        li = int(r() * len(pools.last_names))
        gs, fs = self.first_slugs[fi], self.last_slugs[li]
        local = f"{gs}.{fs}"
        if local in self.taken:
            local = f"{local}{n}"
        self.taken.add(local)
        domain = self.org.domain
        user.given_name, user.family_name = pools.first_names[fi], pools.last_names[li]
        user.preferred_username = f"{local}@{domain}"
        emails = [(f"{local}@{domain}", "work")]
        if r() < 0.6:
            emails.append((f"{gs[0]}{fs}{n}@{domain}", "other"))
        if r() < 0.3:
            emails.append((f"{local}{1 + int(r() * 99)}@example.com", "home"))
        user.emails = emails
        user.active = r() >= 0.08
        user.department = department
        user.created_at = created_at
        user.updated_at = created_at + int(r() * 60 * _DAY_US)
        leaders = self.leaders.setdefault(user.directory_id, [])
        if len(leaders) < 50:
            self.leader_pos[user.id] = len(leaders)
            leaders.append(user)

    def profile(self, user: User, store: DirectoryStore) -> dict[str, str]:
        # One 128-bit hash of (salt, seq) supplies every choice: seeding a random.Random per user costs more than
        # the rest of the profile, and this is on the cold path of every listing.
        h = int.from_bytes(hashlib.blake2b(user.seq.to_bytes(8, "little"), digest_size=16,
                                           key=self.salt.to_bytes(8, "little")).digest(), "little")
        pools = self.pools
        leaders = self.leaders.get(user.directory_id, [])
        pos = self.leader_pos.get(user.id, len(leaders))
        manager = leaders[h % pos] if pos and (h >> 8) % 10 else None
        manager_profile = store.profile(manager) if manager is not None else None
        dp = f"{h:032x}"
        provider = self.providers.get(user.directory_id, "")
        return {
            "dp_id": ("00u" + dp[:17] if provider == "OKTA"
                      else f"{dp[:8]}-{dp[8:12]}-{dp[12:16]}-{dp[16:20]}-{dp[20:]}"),
            "title": pools.titles[(h >> 16) % len(pools.titles)],
            "employee_number": f"E{user.seq % 10_000_000:07d}",
            "cost_center": f"CC-{100 + (h >> 28) % 900}",
            "division": DIVISIONS[(h >> 40) % len(DIVISIONS)],
            "organization": self.org.display_name,
            "phone_number": f"+1-{200 + (h >> 48) % 790}-555-{(h >> 60) % 10000:04d}",
            "locale": LOCALES[(h >> 76) % len(LOCALES)],
            "zoneinfo": ZONES[(h >> 84) % len(ZONES)],
            "manager_id": manager_profile["dp_id"] if manager_profile else "",
            "manager_name": manager.display_name if manager is not None else "",
        }


def _group_names(rng: random.Random, count: int) -> list[str]:
    names = GROUP_NAMES[:]
    rng.shuffle(names)
    out = names[:count]
    i = 0
    while len(out) < count:
        candidate = f"{names[i % len(names)]} {GROUP_SUFFIXES[(i // len(names)) % len(GROUP_SUFFIXES)]}"
        if i >= len(names) * len(GROUP_SUFFIXES):
            candidate = f"{candidate} {i}"
        if candidate not in out:
            out.append(candidate)
        i += 1
    return out


def generate(seed: int, orgs: int, users_per_org: int, groups_per_org: int
             ) -> tuple[DirectoryStore, dict[str, UserFactory]]:
    """The store for these sizes, and the per-organization user factories (the churn's hires use them)."""
    master = random.Random(f"scim-pipeline-emulator:{seed}")
    store = DirectoryStore(environment_id=f"env_{master.randrange(10**16, 10**17)}",
                           id_base=master.randrange(10**16, 5 * 10**16))
    pools = make_pools(seed, orgs)
    factories: dict[str, UserFactory] = {}
    companies = pools.companies[:]
    master.shuffle(companies)
    for index in range(orgs):
        rng = random.Random(f"scim-pipeline-emulator:{seed}:org:{index}")
        name = companies[index % len(companies)] + ("" if index < len(companies) else f" {index}")
        domain_word = _slug(name.split(",")[0].split(" ")[0]) or "company"
        org_id, seq = store.new_id("org")
        created = BASE_TIME_US + rng.randrange(0, 30 * _DAY_US)
        org = Organization(org_id, seq, name, f"ext-{_slug(name)[:24]}-{index + 1}",
                           f"{domain_word}{index + 1}.example.com", created)
        org.metadata = {"plan": rng.choice(["starter", "growth", "enterprise"])}
        store.add_organization(org)
        factory = UserFactory(pools, rng, org, salt=master.getrandbits(48))
        factories[org.id] = factory
        _generate_org(store, factory, rng, org, users_per_org, groups_per_org, second_directory=_two_dirs(index, rng))
    store.profile_maker = lambda user: factories[user.organization_id].profile(user, store)
    store.changed()
    return store, factories


def new_factory(seed: int, org: Organization, factories: dict[str, UserFactory]) -> UserFactory:
    """The user factory of an organization created after start-up: the same pools, a generator of its own (seeded
    by the seed and the organization's id, so the same mutations give the same users)."""
    existing = next(iter(factories.values()), None)
    pools = existing.pools if existing is not None else make_pools(seed, 1)
    rng = random.Random(f"scim-pipeline-emulator:{seed}:org:{org.id}")
    return UserFactory(pools, rng, org, salt=rng.getrandbits(48))


def _two_dirs(index: int, rng: random.Random) -> bool:
    # The second organization always has two directories (so small test setups cover the case); others sometimes.
    return index == 1 or (index > 1 and rng.random() < 0.2)


def _generate_org(store: DirectoryStore, factory: UserFactory, rng: random.Random, org: Organization, n_users: int,
                  n_groups: int, second_directory: bool) -> None:
    n_dirs = 2 if second_directory and n_users >= 2 and n_groups >= 2 else 1
    providers = rng.sample(PROVIDERS, n_dirs)
    dirs: list[Directory] = []
    for provider in providers:
        dir_id, seq = store.new_id("dir")
        d = Directory(dir_id, seq, org.id, provider, org.created_at + rng.randrange(0, _DAY_US))
        store.add_directory(d)
        factory.providers[d.id] = provider
        dirs.append(d)

    # Split users and groups: the primary directory has most of them.
    user_split = [n_users] if n_dirs == 1 else [n_users - n_users * 3 // 10, n_users * 3 // 10]
    group_split = [n_groups] if n_dirs == 1 else [n_groups - max(1, n_groups * 3 // 10), max(1, n_groups * 3 // 10)]
    names = _group_names(rng, n_groups)
    name_at = 0
    for d, n_u, n_g in zip(dirs, user_split, group_split):
        groups: list[Group] = []
        for name in names[name_at:name_at + n_g]:
            gid, seq = store.new_id("dirgroup")
            g = Group(gid, seq, org.id, d.id, name)
            g.dp_id = _dp_id(rng, d.provider)
            g.external_id = g.dp_id
            g.created_at = d.created_at + rng.randrange(0, _DAY_US)
            g.updated_at = g.created_at + rng.randrange(0, 30 * _DAY_US)
            store.add_group(g)
            groups.append(g)
        name_at += n_g
        # About 60% of the groups carry a role; the first always does, so every directory maps something.
        for i, g in enumerate(groups):
            if i == 0 or rng.random() < 0.6:
                d.role_assignments.append((g.id, ROLE_NAMES[i % len(ROLE_NAMES)] if i < len(ROLE_NAMES)
                                           else rng.choice(ROLE_NAMES)))
        r = rng.random
        span = 300 * _DAY_US
        for i in range(n_u):
            uid, seq = store.new_id("diruser")
            u = User(uid, seq, org.id, d.id)
            primary = None
            if groups:
                n_g = len(groups)
                primary = groups[int(r() * n_g)] if r() < 0.9 else None
                chosen = [primary] if primary else []
                for _ in range(EXTRA_GROUPS[int(r() * len(EXTRA_GROUPS))]):
                    extra = groups[int(r() * n_g)]
                    if extra not in chosen:
                        chosen.append(extra)
                u.groups = [g.id for g in chosen]
            factory.fill(u, d.created_at + (span * i) // max(n_u, 1), primary.display_name if primary else "")
            store.add_user(u)
        if n_u:
            d.user_updated_at = max(store.users[x].updated_at for x in d.user_ids)
        if groups:
            d.group_updated_at = max(g.updated_at for g in groups)
