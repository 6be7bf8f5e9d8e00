"""A seeded synthetic online shop: known customers, their devices and sessions, anonymous visitors.

``generate`` writes ``profiles.<ext>``, ``events.<ext>`` and ``schema.json`` in the hub's import
format. It is vectorized (numpy for the simulation, pyarrow for strings and files) and works in
chunks of customers, so memory stays bounded whatever the size. The same seed and arguments give
byte-identical files; nothing here reads a clock (the caller passes ``end``).

The model, per chunk: each customer has a country (and a city and time zone in it), 1-3 devices
(some with the app) and a Pareto-distributed number of sessions spread over their active span with
daily and weekly seasonality in local time. A session is a landing page (or ``app_open``), maybe a
category page and a search, a few product views, each of which may lead to a ``cart_add``, and
rarely a checkout and a purchase. A device browses anonymously until its login session, which
emits an ``identify`` carrying both ids; from then on its events carry ``user_id`` too. Anonymous
visitors (half as many as customers) browse and abandon carts but never log in or buy.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

Format = Literal["parquet", "csv", "jsonl"]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
U8 = npt.NDArray[np.uint8]

#: Customers simulated (and written) per chunk; bounds the memory used whatever the total.
CHUNK_PROFILES = 10_000
MAX_PROFILES = 9_999_999
#: Anonymous-only visitors generated per known customer.
VISITORS_PER_PROFILE = 0.5

_EXTENSIONS: dict[str, str] = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}
_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000
_YEAR_DAYS = 365.25


@dataclass(frozen=True, slots=True)
class GenerateSummary:
    """What ``generate`` wrote: customers, events, anonymous-only visitors and the files."""

    profiles: int
    events: int
    anonymous_visitors: int
    files: tuple[Path, ...]


def load_demo_schema() -> dict[str, Any]:
    """Return the workspace schema (attributes and event properties) of the demo data."""
    text = resources.files(__package__ or "waymark.demo").joinpath("schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


# --------------------------------------------------------------------------- reference data


@dataclass(frozen=True, slots=True)
class _Country:
    code: str
    weight: float
    currency: str
    names: str
    cities: tuple[tuple[str, str, float], ...]  # (city, IANA zone, weight)
    phone_prefixes: tuple[str, ...]  # E.164 prefixes of mobile numbers
    phone_digits: int  # digits after the prefix


def _prefixes(base: str, middles: Sequence[str], tails: str = "") -> tuple[str, ...]:
    if not tails:
        return tuple(base + m for m in middles)
    return tuple(base + m + t for m in middles for t in tails)


# fmt: off
_NANP_TAIL = "23456789"  # first digit of a NANP exchange code
_COUNTRIES: tuple[_Country, ...] = (
    _Country("US", 0.32, "USD", "en", (
        ("New York", "America/New_York", 0.20), ("Los Angeles", "America/Los_Angeles", 0.14),
        ("Chicago", "America/Chicago", 0.10), ("Houston", "America/Chicago", 0.08),
        ("Phoenix", "America/Phoenix", 0.06), ("Philadelphia", "America/New_York", 0.06),
        ("San Francisco", "America/Los_Angeles", 0.07), ("Seattle", "America/Los_Angeles", 0.07),
        ("Denver", "America/Denver", 0.06), ("Boston", "America/New_York", 0.07),
        ("Atlanta", "America/New_York", 0.05), ("Miami", "America/New_York", 0.04),
    ), _prefixes("+1", ("212", "646", "213", "310", "312", "773", "713", "602", "215", "415",
                        "206", "303", "617", "404", "305"), _NANP_TAIL), 6),
    _Country("GB", 0.12, "GBP", "en", (
        ("London", "Europe/London", 0.45), ("Manchester", "Europe/London", 0.15),
        ("Birmingham", "Europe/London", 0.12), ("Leeds", "Europe/London", 0.10),
        ("Glasgow", "Europe/London", 0.08), ("Bristol", "Europe/London", 0.10),
    ), _prefixes("+447", ("1", "2", "3")), 8),
    _Country("DE", 0.10, "EUR", "de", (
        ("Berlin", "Europe/Berlin", 0.30), ("Hamburg", "Europe/Berlin", 0.18),
        ("München", "Europe/Berlin", 0.18), ("Köln", "Europe/Berlin", 0.14),
        ("Frankfurt am Main", "Europe/Berlin", 0.10), ("Stuttgart", "Europe/Berlin", 0.10),
    ), _prefixes("+49", ("151", "152", "157", "160", "170", "176")), 8),
    _Country("FR", 0.08, "EUR", "fr", (
        ("Paris", "Europe/Paris", 0.40), ("Lyon", "Europe/Paris", 0.14),
        ("Marseille", "Europe/Paris", 0.13), ("Toulouse", "Europe/Paris", 0.11),
        ("Lille", "Europe/Paris", 0.08), ("Bordeaux", "Europe/Paris", 0.08),
        ("Nantes", "Europe/Paris", 0.06),
    ), _prefixes("+336", ("0", "1", "2", "4", "5", "6", "7", "8")), 7),
    _Country("NL", 0.05, "EUR", "nl", (
        ("Amsterdam", "Europe/Amsterdam", 0.35), ("Rotterdam", "Europe/Amsterdam", 0.22),
        ("Den Haag", "Europe/Amsterdam", 0.16), ("Utrecht", "Europe/Amsterdam", 0.13),
        ("Eindhoven", "Europe/Amsterdam", 0.08), ("Groningen", "Europe/Amsterdam", 0.06),
    ), _prefixes("+316", ("1", "2", "3", "4", "5", "8")), 7),
    _Country("ES", 0.05, "EUR", "es", (
        ("Madrid", "Europe/Madrid", 0.38), ("Barcelona", "Europe/Madrid", 0.30),
        ("Valencia", "Europe/Madrid", 0.12), ("Sevilla", "Europe/Madrid", 0.10),
        ("Bilbao", "Europe/Madrid", 0.05), ("Málaga", "Europe/Madrid", 0.05),
    ), _prefixes("+346", ("",)), 8),
    _Country("IT", 0.05, "EUR", "it", (
        ("Roma", "Europe/Rome", 0.32), ("Milano", "Europe/Rome", 0.30),
        ("Napoli", "Europe/Rome", 0.12), ("Torino", "Europe/Rome", 0.11),
        ("Firenze", "Europe/Rome", 0.08), ("Bologna", "Europe/Rome", 0.07),
    ), _prefixes("+393", ("20", "28", "33", "38", "40", "47", "48", "49", "66", "80", "88")), 7),
    _Country("SE", 0.03, "SEK", "sv", (
        ("Stockholm", "Europe/Stockholm", 0.50), ("Göteborg", "Europe/Stockholm", 0.25),
        ("Malmö", "Europe/Stockholm", 0.15), ("Uppsala", "Europe/Stockholm", 0.10),
    ), _prefixes("+467", ("0", "2", "3", "6", "9")), 7),
    _Country("CA", 0.06, "CAD", "en", (
        ("Toronto", "America/Toronto", 0.35), ("Montréal", "America/Toronto", 0.20),
        ("Vancouver", "America/Vancouver", 0.20), ("Calgary", "America/Edmonton", 0.13),
        ("Ottawa", "America/Toronto", 0.12),
    ), _prefixes("+1", ("416", "647", "514", "604", "403", "613"), _NANP_TAIL), 6),
    _Country("AU", 0.05, "AUD", "en", (
        ("Sydney", "Australia/Sydney", 0.38), ("Melbourne", "Australia/Melbourne", 0.34),
        ("Brisbane", "Australia/Brisbane", 0.16), ("Perth", "Australia/Perth", 0.12),
    ), _prefixes("+614", ("0", "1", "2", "3", "6")), 7),
    _Country("IE", 0.02, "EUR", "en", (
        ("Dublin", "Europe/Dublin", 0.60), ("Cork", "Europe/Dublin", 0.20),
        ("Galway", "Europe/Dublin", 0.10), ("Limerick", "Europe/Dublin", 0.10),
    ), _prefixes("+353", ("83", "85", "86", "87", "89")), 7),
    _Country("BE", 0.02, "EUR", "nl", (
        ("Brussel", "Europe/Brussels", 0.35), ("Antwerpen", "Europe/Brussels", 0.30),
        ("Gent", "Europe/Brussels", 0.20), ("Leuven", "Europe/Brussels", 0.15),
    ), _prefixes("+32", ("470", "471", "472", "473", "474", "475", "476", "477", "478", "479",
                         "484", "485", "486", "487", "488", "489", "494", "495", "496", "497")), 6),
)

_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "en": (
        ("Emma", "Olivia", "Ava", "Sophia", "Isabella", "Mia", "Charlotte", "Amelia", "Harper",
         "Grace", "Chloe", "Lily", "Liam", "Noah", "Oliver", "James", "William", "Benjamin",
         "Lucas", "Henry", "Jack", "Thomas", "Daniel", "Samuel"),
        ("Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson",
         "Anderson", "Taylor", "Thomas", "Moore", "Martin", "Thompson", "White", "Harris",
         "Clark", "Lewis", "Walker", "Hall", "Young", "King", "Wright", "O'Brien"),
    ),
    "de": (
        ("Anna", "Lena", "Leonie", "Marie", "Sophie", "Hannah", "Lea", "Johanna", "Katrin",
         "Jana", "Lukas", "Jonas", "Leon", "Finn", "Felix", "Maximilian", "Paul", "Jan",
         "Tobias", "Niklas", "Jürgen", "Matthias"),
        ("Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker",
         "Schulz", "Hoffmann", "Koch", "Richter", "Klein", "Wolf", "Schröder", "Neumann",
         "Zimmermann", "Braun"),
    ),
    "fr": (
        ("Camille", "Léa", "Manon", "Chloé", "Inès", "Sarah", "Juliette", "Emma", "Louise",
         "Jade", "Hugo", "Louis", "Gabriel", "Arthur", "Jules", "Raphaël", "Lucas", "Théo",
         "Nathan", "Mathis"),
        ("Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand",
         "Leroy", "Moreau", "Simon", "Laurent", "Lefèvre", "Michel", "Garcia", "Fontaine",
         "Rousseau", "Girard"),
    ),
    "nl": (
        ("Sanne", "Lotte", "Eva", "Fleur", "Anouk", "Sophie", "Julia", "Emma", "Lisa", "Femke",
         "Daan", "Sem", "Lars", "Thijs", "Bram", "Jesse", "Ruben", "Sven", "Joost", "Pieter"),
        ("de Jong", "Jansen", "de Vries", "van den Berg", "van Dijk", "Bakker", "Janssens",
         "Visser", "Smit", "Meijer", "de Boer", "Mulder", "de Groot", "Bos", "Vos", "Peeters",
         "Hendriks", "van Leeuwen"),
    ),
    "es": (
        ("Lucía", "María", "Paula", "Sofía", "Martina", "Carmen", "Elena", "Laura", "Marta",
         "Sara", "Hugo", "Martín", "Pablo", "Alejandro", "Daniel", "Javier", "Diego", "Adrián",
         "Álvaro", "Sergio"),
        ("García", "Rodríguez", "González", "Fernández", "López", "Martínez", "Sánchez", "Pérez",
         "Gómez", "Martín", "Jiménez", "Ruiz", "Hernández", "Díaz", "Moreno", "Álvarez",
         "Romero", "Navarro"),
    ),
    "it": (
        ("Giulia", "Sofia", "Aurora", "Alice", "Ginevra", "Emma", "Giorgia", "Martina", "Chiara",
         "Francesca", "Leonardo", "Francesco", "Alessandro", "Lorenzo", "Mattia", "Andrea",
         "Gabriele", "Riccardo", "Tommaso", "Matteo"),
        ("Rossi", "Russo", "Ferrari", "Esposito", "Bianchi", "Romano", "Colombo", "Ricci",
         "Marino", "Greco", "Bruno", "Gallo", "Conti", "De Luca", "Mancini", "Costa",
         "Giordano", "Rizzo"),
    ),
    "sv": (
        ("Alice", "Maja", "Elsa", "Astrid", "Wilma", "Ebba", "Saga", "Linnea", "Klara", "Ingrid",
         "William", "Hugo", "Lucas", "Liam", "Oscar", "Elias", "Axel", "Erik", "Nils", "Johan"),
        ("Andersson", "Johansson", "Karlsson", "Nilsson", "Eriksson", "Larsson", "Olsson",
         "Persson", "Svensson", "Gustafsson", "Pettersson", "Jonsson", "Lindberg", "Lindström",
         "Berg", "Holm", "Ek", "Sjöberg"),
    ),
}

# (slug, title, median price in cents, product nouns, search queries)
_CATEGORIES: tuple[tuple[str, str, int, tuple[str, ...], tuple[str, ...]], ...] = (
    ("shoes", "Shoes", 7999,
     ("Sneaker", "Runner", "Boot", "Loafer", "Sandal", "Trail Shoe"),
     ("running shoes", "white sneakers", "leather boots", "sandals", "trail shoes", "loafers")),
    ("apparel", "Apparel", 4499,
     ("T-Shirt", "Hoodie", "Jacket", "Jeans", "Dress", "Sweater"),
     ("hoodie", "rain jacket", "linen shirt", "black jeans", "summer dress", "wool sweater")),
    ("accessories", "Accessories", 2999,
     ("Backpack", "Wallet", "Cap", "Scarf", "Belt", "Watch"),
     ("backpack", "leather wallet", "sunglasses", "baseball cap", "watch", "tote bag")),
    ("home", "Home & Living", 3999,
     ("Mug", "Lamp", "Throw", "Cushion", "Vase", "Candle"),
     ("scented candle", "desk lamp", "ceramic mug", "throw blanket", "vase", "cushion cover")),
    ("beauty", "Beauty", 1999,
     ("Serum", "Cleanser", "Lip Balm", "Moisturizer", "Shampoo", "Perfume"),
     ("face serum", "sunscreen", "shampoo", "perfume", "lip balm", "moisturizer")),
    ("electronics", "Electronics", 12999,
     ("Headphones", "Speaker", "Charger", "Smartwatch", "Earbuds", "Keyboard"),
     ("wireless earbuds", "bluetooth speaker", "usb-c charger", "headphones", "smartwatch",
      "keyboard")),
    ("outdoor", "Outdoor", 6999,
     ("Tent", "Sleeping Bag", "Water Bottle", "Daypack", "Headlamp", "Rain Shell"),
     ("tent", "water bottle", "headlamp", "sleeping bag", "hiking backpack", "rain shell")),
    ("kids", "Kids", 2499,
     ("Puzzle", "Plush", "Building Set", "Rain Boots", "Pajamas", "Storybook"),
     ("building blocks", "plush toy", "puzzle", "kids pajamas", "rain boots", "picture book")),
)
_CATEGORY_WEIGHTS = np.array([0.16, 0.22, 0.12, 0.12, 0.12, 0.10, 0.08, 0.08])
_ADJECTIVES = ("Classic", "Essential", "Everyday", "Urban", "Coastal", "Alpine", "Studio",
               "Heritage", "Nordic", "Modern", "Vintage", "Eco", "Cloud", "Summit", "Metro",
               "Linen")
_SKUS_PER_CATEGORY = 300
_APP_VARIANTS = tuple((p, v) for p in ("ios", "android") for v in ("5.2.0", "5.3.1", "5.4.0"))
_EMAIL_DOMAINS = ("example.com", "example.net", "example.org")  # reserved: never deliverable

# Local-time activity by hour (busy evenings) and by weekday (Monday first; busier weekends).
_HOUR_WEIGHTS = np.array([0.6, 0.35, 0.2, 0.15, 0.15, 0.25, 0.6, 1.2, 1.8, 2.2, 2.4, 2.6,
                          3.0, 3.0, 2.6, 2.5, 2.6, 3.0, 3.6, 4.4, 5.0, 4.8, 3.6, 1.8])
_HOUR_CDF = np.cumsum(_HOUR_WEIGHTS) / _HOUR_WEIGHTS.sum()
_WEEKDAY_WEIGHTS = np.array([0.90, 0.88, 0.92, 0.95, 1.0, 1.10, 1.18])
# fmt: on

# Event codes: index into _EVENT_NAMES; _EVENT_TYPE_OF gives the call type of each.
_PAGE_HOME, _PAGE_CATEGORY, _PAGE_PRODUCT, _PAGE_CART = 0, 1, 2, 3
_IDENTIFY, _APP_OPEN, _SEARCH, _VIEW, _CART_ADD, _CHECKOUT, _PURCHASE = 4, 5, 6, 7, 8, 9, 10
_EVENT_NAMES = (
    "Home",
    "Category",
    "Product",
    "Cart",
    "identify",
    "app_open",
    "search",
    "product_view",
    "cart_add",
    "checkout_started",
    "purchase",
)
_TYPES = ("page", "identify", "track")
_EVENT_TYPE_OF = np.array([0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2], dtype=np.int64)
#: Track event names emitted (all declared in schema.json).
TRACK_EVENTS: tuple[str, ...] = _EVENT_NAMES[5:]
PAGE_NAMES: tuple[str, ...] = _EVENT_NAMES[:4]

# Order of events inside a session (sort keys).
_KEY_HEAD, _KEY_CATEGORY, _KEY_IDENTIFY, _KEY_SEARCH, _KEY_VIEWS = 0, 2, 3, 4, 20
_KEY_CART_PAGE, _KEY_CHECKOUT, _KEY_PURCHASE = 1_000_000, 1_000_001, 1_000_002


def _compact(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@cache
def _email_token(name: str) -> str:
    """Lower-case ASCII letters of ``name`` (diacritics folded, spaces and apostrophes dropped)."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalpha())


@dataclass(frozen=True, slots=True)
class _Geo:
    codes: pa.Array
    weights: F64
    currencies: pa.Array
    groups: tuple[str, ...]
    city_names: pa.Array
    city_zone: I64  # zone index per city
    zones: tuple[str, ...]
    zone_names: pa.Array
    city_ids: tuple[I64, ...]  # per country
    city_weights: tuple[F64, ...]  # per country


@cache
def _geo() -> _Geo:
    zones: list[str] = []
    city_names: list[str] = []
    city_zone: list[int] = []
    city_ids: list[I64] = []
    city_weights: list[F64] = []
    for country in _COUNTRIES:
        ids: list[int] = []
        for name, zone, _ in country.cities:
            if zone not in zones:
                zones.append(zone)
            ids.append(len(city_names))
            city_names.append(name)
            city_zone.append(zones.index(zone))
        w = np.array([c[2] for c in country.cities])
        city_ids.append(np.array(ids, dtype=np.int64))
        city_weights.append(w / w.sum())
    weights = np.array([c.weight for c in _COUNTRIES])
    return _Geo(
        codes=pa.array([c.code for c in _COUNTRIES]),
        weights=weights / weights.sum(),
        currencies=pa.array([c.currency for c in _COUNTRIES]),
        groups=tuple(c.names for c in _COUNTRIES),
        city_names=pa.array(city_names),
        city_zone=np.array(city_zone, dtype=np.int64),
        zones=tuple(zones),
        zone_names=pa.array(zones),
        city_ids=tuple(city_ids),
        city_weights=tuple(city_weights),
    )


@dataclass(frozen=True, slots=True)
class _Catalog:
    price_cents: I64  # per SKU
    rank_cdf: F64  # Zipf popularity of the SKUs inside a category, by rank
    view_props: pa.Array  # product_view / cart_add properties per SKU
    product_page_props: pa.Array  # page "Product" properties per SKU
    category_page_props: pa.Array  # page "Category" properties per category
    category_slugs: pa.Array
    search_props: pa.Array  # per (category, query)
    app_props: pa.Array  # per app variant


def _catalog(rng: np.random.Generator) -> _Catalog:
    n_cat = len(_CATEGORIES)
    per = _SKUS_PER_CATEGORY
    codes = rng.permutation(np.arange(10_000, 100_000))[: n_cat * per]
    prices: list[int] = []
    view_props: list[str] = []
    page_props: list[str] = []
    for c, (slug, _, median, nouns, _) in enumerate(_CATEGORIES):
        raw = median * np.exp(rng.normal(0.0, 0.5, per))
        cents = np.maximum(np.round(raw / 100.0) * 100 - 1, 499).astype(np.int64)
        adjectives = rng.integers(0, len(_ADJECTIVES), per)
        noun_ids = rng.integers(0, len(nouns), per)
        for r in range(per):
            sku = f"SKU-{codes[c * per + r]}"
            price = int(cents[r])
            prices.append(price)
            view_props.append(_compact({"sku": sku, "category": slug, "price": price / 100}))
            title = f"{_ADJECTIVES[adjectives[r]]} {nouns[noun_ids[r]]}"
            page_props.append(_compact({"path": f"/p/{sku.lower()}", "title": title}))
    ranks = 1.0 / np.arange(1, per + 1) ** 1.1
    return _Catalog(
        price_cents=np.array(prices, dtype=np.int64),
        rank_cdf=np.cumsum(ranks) / ranks.sum(),
        view_props=pa.array(view_props),
        product_page_props=pa.array(page_props),
        category_page_props=pa.array(
            [_compact({"path": f"/c/{c[0]}", "title": c[1]}) for c in _CATEGORIES]
        ),
        category_slugs=pa.array([c[0] for c in _CATEGORIES]),
        search_props=pa.array([_compact({"query": q}) for c in _CATEGORIES for q in c[4]]),
        app_props=pa.array([_compact({"platform": p, "app_version": v}) for p, v in _APP_VARIANTS]),
    )


@dataclass(frozen=True, slots=True)
class _World:
    seed: int
    start_ms: int
    end_ms: int
    base_ms: int  # UTC midnight at or before start_ms
    base_weekday: int
    offsets: I64  # (zone, day since base) -> UTC offset in ms
    catalog: _Catalog
    sessions: float = 1.0  # scales every actor's number of sessions


def _utc_offsets(zones: Sequence[str], base: datetime, n_days: int) -> I64:
    table = np.empty((len(zones), n_days), dtype=np.int64)
    for z, name in enumerate(zones):
        zone = ZoneInfo(name)
        for d in range(n_days):
            offset = (base + timedelta(days=d, hours=12)).astimezone(zone).utcoffset()
            table[z, d] = 0 if offset is None else int(offset.total_seconds()) * 1000
    return table


# --------------------------------------------------------------------------- string helpers

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _fixed_strings(chars: U8) -> pa.Array:
    """Return a string array whose i-th value is the bytes of row i of ``chars`` (n x width)."""
    n, width = chars.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    data = np.ascontiguousarray(chars)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def _uuids(rng: np.random.Generator, n: int, unix_ms: I64 | None = None) -> pa.Array:
    """Return ``n`` random UUID strings: version 7 embedding ``unix_ms`` if given, else 4."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    version = 4
    if unix_ms is not None:
        version = 7
        shifts = np.array([40, 32, 24, 16, 8, 0], dtype=np.int64)
        raw[:, :6] = ((unix_ms[:, None] >> shifts) & 0xFF).astype(np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | (version << 4)
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    hexed = np.empty((n, 32), dtype=np.uint8)
    hexed[:, 0::2] = _HEX[raw >> 4]
    hexed[:, 1::2] = _HEX[raw & 0x0F]
    out = np.full((n, 36), ord("-"), dtype=np.uint8)
    for src, dst, width in ((0, 0, 8), (8, 9, 4), (12, 14, 4), (16, 19, 4), (20, 24, 12)):
        out[:, dst : dst + width] = hexed[:, src : src + width]
    return _fixed_strings(out)


def _put_digits(out: U8, col: int, width: int, value: I64) -> None:
    for k in range(width):
        out[:, col + width - 1 - k] = 48 + (value // 10**k) % 10


def _date_chars(days: I64) -> U8:
    """Return ``YYYY-MM-DD`` (n x 10 bytes) for days since the Unix epoch."""
    unique, inverse = np.unique(days, return_inverse=True)
    text = "".join(str(np.datetime64(int(d), "D")) for d in unique).encode()
    table = np.frombuffer(text, dtype=np.uint8).reshape(-1, 10)
    result: U8 = table[inverse.reshape(-1)]
    return result


def _iso_ms(unix_ms: I64) -> pa.Array:
    """Return ISO-8601 UTC strings with milliseconds, ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    n = unix_ms.size
    days, rest = np.divmod(unix_ms, _DAY_MS)
    out = np.empty((n, 24), dtype=np.uint8)
    if n:
        out[:, :10] = _date_chars(days)
    hours, rest = np.divmod(rest, _HOUR_MS)
    minutes, rest = np.divmod(rest, 60_000)
    seconds, millis = np.divmod(rest, 1000)
    for col, ch in ((10, "T"), (13, ":"), (16, ":"), (19, "."), (23, "Z")):
        out[:, col] = ord(ch)
    _put_digits(out, 11, 2, hours)
    _put_digits(out, 14, 2, minutes)
    _put_digits(out, 17, 2, seconds)
    _put_digits(out, 20, 3, millis)
    return _fixed_strings(out)


def _money(cents: I64) -> pa.Array:
    """Return decimal strings with two fraction digits (``12345`` -> ``"123.45"``)."""
    units = pc.cast(pa.array(cents // 100), pa.string())
    fraction = pc.utf8_lpad(pc.cast(pa.array(cents % 100), pa.string()), width=2, padding="0")
    return pc.binary_join_element_wise(units, ".", fraction, "")


def _ints(values: I64) -> pa.Array:
    return pc.cast(pa.array(values), pa.string())


def _timestamps(unix_ms: I64) -> pa.Array:
    return pa.array(unix_ms, type=pa.timestamp("ms", tz="UTC"))


# --------------------------------------------------------------------------- simulation


def _session_starts(rng: np.random.Generator, world: _World, zone: I64, lo: I64, hi: I64) -> I64:
    """Start times in [lo, hi] following local daily and weekly rhythms of each ``zone``."""
    n = zone.size
    day_lo = (lo - world.base_ms) // _DAY_MS
    width = (hi - world.base_ms) // _DAY_MS - day_lo + 1
    day = day_lo + (rng.random(n) * width).astype(np.int64)
    top = _WEEKDAY_WEIGHTS.max()
    pending = np.ones(n, dtype=bool)
    for _ in range(3):  # thinning: redraw days in proportion to how quiet their weekday is
        weekday = (world.base_weekday + day) % 7
        pending &= rng.random(n) * top > _WEEKDAY_WEIGHTS[weekday]
        day = np.where(pending, day_lo + (rng.random(n) * width).astype(np.int64), day)
    hour = np.searchsorted(_HOUR_CDF, rng.random(n), side="right").astype(np.int64)
    local = hour * _HOUR_MS + (rng.random(n) * _HOUR_MS).astype(np.int64)
    day_index = np.clip(day, 0, world.offsets.shape[1] - 1)
    start = world.base_ms + day * _DAY_MS + local - world.offsets[zone, day_index]
    bad = (start < lo) | (start > hi)
    start[bad] = lo[bad] + (rng.random(int(bad.sum())) * (hi - lo)[bad]).astype(np.int64)
    return start


def _group_starts(sorted_keys: I64) -> Mask:
    first = np.ones(sorted_keys.size, dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return first


@dataclass(slots=True)
class _Part:
    session: I64
    key: I64
    code: I64
    props: pa.Array


@dataclass(frozen=True, slots=True)
class _Chunk:
    profiles: pa.Table
    events: pa.Table
    visitors: int
    purchases: int


def _phones(rng: np.random.Generator, seed: int, country: I64, index: I64) -> list[str | None]:
    """Valid mobile numbers in E.164, unique per customer ``index``; about 40% are missing."""
    present = rng.random(index.size) < 0.6
    phones: list[str | None] = [None] * index.size
    multiplier = 2_147_483_647  # a prime: multiplying by it is invertible modulo each space
    shift = 982_451_653 + 7_919 * seed
    for c, spec in enumerate(_COUNTRIES):
        rows = np.flatnonzero(present & (country == c))
        if rows.size == 0:
            continue
        block = 10**spec.phone_digits
        space = len(spec.phone_prefixes) * block
        code = (index[rows] * multiplier + shift + c) % space
        for row, value in zip(rows.tolist(), code.tolist(), strict=True):
            prefix, digits = divmod(value, block)
            phones[row] = f"{spec.phone_prefixes[prefix]}{digits:0{spec.phone_digits}d}"
    return phones


def _profiles_table(
    rng: np.random.Generator,
    world: _World,
    first_index: int,
    country: I64,
    city: I64,
    signup_ms: I64,
    activity: F64,
    ltv_cents: I64,
    updated_ms: I64,
    text: bool,
) -> pa.Table:
    geo = _geo()
    n = country.size
    index = np.arange(first_index, first_index + n, dtype=np.int64)
    user_ids = [f"u{i + 1:07d}" for i in index.tolist()]
    first_names: list[str] = []
    last_names: list[str] = []
    emails: list[str] = []
    first_pick = rng.random(n)
    last_pick = rng.random(n)
    pattern = rng.integers(0, 4, n).tolist()
    domain = rng.choice(len(_EMAIL_DOMAINS), n, p=[0.5, 0.3, 0.2]).tolist()
    for row in range(n):
        firsts, lasts = _NAMES[geo.groups[country[row]]]
        first = firsts[int(first_pick[row] * len(firsts))]
        last = lasts[int(last_pick[row] * len(lasts))]
        first_names.append(first)
        last_names.append(last)
        f, la = _email_token(first), _email_token(last)
        # Every local part ends in the customer's number: e-mails are unique by construction.
        local = (f"{f}.{la}", f"{f}{la}", f"{f[0]}{la}", f"{la}.{f}")[pattern[row]]
        emails.append(f"{local}{index[row] + 1}@{_EMAIL_DOMAINS[domain[row]]}")
    heavy = activity >= np.quantile(activity, 0.9) if n else np.zeros(0, dtype=bool)
    plan_pick = rng.random(n)
    plan_code = np.where(
        heavy,
        np.searchsorted([0.45, 0.80], plan_pick, side="right"),
        np.searchsorted([0.72, 0.92], plan_pick, side="right"),
    )
    end_day = world.end_ms // _DAY_MS
    birth_days = end_day - ((18 + rng.random(n) * 62) * _YEAR_DAYS).astype(np.int64)
    birthday_known = rng.random(n) < 0.75
    birthdays = _fixed_strings(_date_chars(birth_days)) if n else pa.array([], pa.string())
    birthdays = pc.if_else(pa.array(birthday_known), birthdays, pa.scalar(None, pa.string()))
    consent_names = pa.array(["opted_in", "opted_out", "unknown"])
    email_consent = rng.choice(3, n, p=[0.58, 0.14, 0.28])
    phones = _phones(rng, world.seed, country, index)
    has_phone = np.array([p is not None for p in phones], dtype=bool)
    sms_consent = np.where(has_phone, rng.choice(3, n, p=[0.32, 0.18, 0.50]), 2)
    stamp = _iso_ms if text else _timestamps
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(user_ids, pa.string()),
        "email": pa.array(emails, pa.string()),
        "phone": pa.array(phones, pa.string()),
        "first_name": pa.array(first_names, pa.string()),
        "last_name": pa.array(last_names, pa.string()),
        "country": geo.codes.take(pa.array(country)),
        "city": geo.city_names.take(pa.array(city)),
        "timezone": geo.zone_names.take(pa.array(geo.city_zone[city])),
        "signup_at": stamp(signup_ms),
        "plan": pa.array(["free", "plus", "pro"]).take(pa.array(plan_code)),
        "lifetime_value": pa.array(ltv_cents / 100.0, pa.float64()),
        "birthday": birthdays,
        "consent.email.marketing": consent_names.take(pa.array(email_consent)),
        "consent.sms.marketing": consent_names.take(pa.array(sms_consent)),
        "updated_at": stamp(updated_ms),
    }
    return pa.table(columns)


def _make_chunk(
    world: _World, chunk_no: int, first_index: int, n: int, first_order: int, text: bool
) -> _Chunk:
    """Simulate ``n`` customers (numbered from ``first_index``) and half as many visitors."""
    rng = np.random.default_rng(np.random.SeedSequence([world.seed, 1, chunk_no]))
    geo = _geo()
    cat = world.catalog
    n_cat = len(_CATEGORIES)
    visitors = int(n * VISITORS_PER_PROFILE)
    actors = n + visitors
    is_cust = np.arange(actors) < n
    span = world.end_ms - world.start_ms
    room = max(span - _DAY_MS, span // 2)

    # Who and where.
    country = rng.choice(len(_COUNTRIES), actors, p=geo.weights).astype(np.int64)
    city = np.zeros(actors, dtype=np.int64)
    for c in range(len(_COUNTRIES)):
        rows = np.flatnonzero(country == c)
        city[rows] = rng.choice(geo.city_ids[c], rows.size, p=geo.city_weights[c])
    zone = geo.city_zone[city]
    preferred = rng.choice(n_cat, actors, p=_CATEGORY_WEIGHTS).astype(np.int64)

    # When: active span and a heavy-tailed (Lomax) number of sessions in it.
    is_new = is_cust & (rng.random(actors) < 0.3)
    lo = np.full(actors, world.start_ms, dtype=np.int64)
    lo[is_new] = world.start_ms + (rng.random(int(is_new.sum())) * room).astype(np.int64)
    hi = np.full(actors, world.end_ms, dtype=np.int64)
    churned = is_cust & (rng.random(actors) < 0.25)
    hi[churned] = lo[churned] + (
        rng.random(int(churned.sum())) * (world.end_ms - lo[churned])
    ).astype(np.int64)
    visitor_rows = np.flatnonzero(~is_cust)
    lo[visitor_rows] = world.start_ms + (rng.random(visitors) * room).astype(np.int64)
    hi[visitor_rows] = lo[visitor_rows] + (rng.random(visitors) * 14 * _DAY_MS).astype(np.int64)
    hi = np.minimum(np.maximum(hi, lo + 2 * _HOUR_MS), world.end_ms)
    activity = rng.pareto(1.25, actors)
    # Willingness to buy: log-normal, and higher for the most active (loyal) customers.
    propensity = rng.lognormal(0.0, 0.8, actors) / np.exp(0.32) * (0.7 + 0.3 * np.log1p(activity))
    p_cart = np.where(is_cust, np.clip(0.075 * propensity, 0.005, 0.6), 0.05)
    p_checkout = np.clip(0.4 * np.sqrt(propensity), 0.1, 0.85)
    n_sess = np.floor(0.6 + 1.5 * world.sessions * activity * (hi - lo) / span).astype(np.int64)
    n_sess = np.minimum(n_sess, 600)
    n_sess[is_cust & ~is_new & (rng.random(actors) < 0.12)] = 0  # lapsed customers
    n_sess[is_new] = np.maximum(n_sess[is_new], 1)
    n_sess[visitor_rows] = rng.geometric(0.6, visitors)

    # Devices: 1-3 per customer, one per visitor; some run the app.
    n_dev = np.where(is_cust, rng.choice([1, 2, 3], actors, p=[0.55, 0.32, 0.13]), 1)
    dev_first = np.concatenate([[0], np.cumsum(n_dev)]).astype(np.int64)
    devices = int(dev_first[-1])
    dev_actor = np.repeat(np.arange(actors, dtype=np.int64), n_dev)
    dev_rank = np.arange(devices, dtype=np.int64) - dev_first[dev_actor]
    p_app = np.where(is_cust[dev_actor], np.where(dev_rank == 0, 0.25, 0.45), 0.12)
    dev_app = rng.random(devices) < p_app
    dev_variant = rng.integers(0, len(_APP_VARIANTS), devices)
    anonymous_ids = _uuids(rng, devices)

    # Sessions, ordered by device then time.
    s_actor = np.repeat(np.arange(actors, dtype=np.int64), n_sess)
    n_s = s_actor.size
    pick = (rng.random(n_s) ** 2 * n_dev[s_actor]).astype(np.int64)
    s_dev = dev_first[s_actor] + np.minimum(pick, n_dev[s_actor] - 1)
    s_start = _session_starts(rng, world, zone[s_actor], lo[s_actor], hi[s_actor])
    order = np.lexsort((s_start, s_dev))
    s_actor, s_dev, s_start = s_actor[order], s_dev[order], s_start[order]
    first_of_dev = _group_starts(s_dev)
    s_rank = np.arange(n_s) - np.maximum.accumulate(np.where(first_of_dev, np.arange(n_s), 0))

    # Login: a device is anonymous until its login session (which emits identify).
    login = rng.geometric(0.55, devices).astype(np.int64) - 1
    known_main = is_cust[dev_actor] & ~is_new[dev_actor] & (dev_rank == 0)
    login[known_main & (rng.random(devices) < 0.75)] = -1  # logged in before the window
    login = np.minimum(login, np.bincount(s_dev, minlength=devices) - 1)
    login[~is_cust[dev_actor]] = np.iinfo(np.int64).max
    s_login = login[s_dev]
    state = np.where(s_rank < s_login, 0, np.where(s_rank == s_login, 1, 2))

    # Session content.
    app = dev_app[s_dev]
    web = ~app
    focus = np.where(
        rng.random(n_s) < 0.6, preferred[s_actor], rng.choice(n_cat, n_s, p=_CATEGORY_WEIGHTS)
    ).astype(np.int64)
    landing = rng.choice(3, n_s, p=[0.5, 0.3, 0.2])  # Home, Category, Product
    has_category = web & (landing != 1) & (rng.random(n_s) < 0.3)
    has_search = rng.random(n_s) < np.where(app, 0.3, 0.2)
    n_views = rng.geometric(0.38, n_s).astype(np.int64) - 1 + (web & (landing == 2))
    n_views = np.minimum(n_views, 30)

    view_first = np.concatenate([[0], np.cumsum(n_views)[:-1]]).astype(np.int64)
    v_sess = np.repeat(np.arange(n_s, dtype=np.int64), n_views)
    n_v = v_sess.size
    v_pos = np.arange(n_v, dtype=np.int64) - view_first[v_sess]
    v_cat = np.where(
        rng.random(n_v) < 0.75, focus[v_sess], rng.choice(n_cat, n_v, p=_CATEGORY_WEIGHTS)
    ).astype(np.int64)
    v_rank = np.minimum(
        np.searchsorted(cat.rank_cdf, rng.random(n_v), side="right"), _SKUS_PER_CATEGORY - 1
    )
    v_sku = v_cat * _SKUS_PER_CATEGORY + v_rank
    carts = np.flatnonzero(rng.random(n_v) < p_cart[s_actor[v_sess]])
    c_sess = v_sess[carts]
    n_cart = np.bincount(c_sess, minlength=n_s).astype(np.int64)
    cart_cents = (
        np.bincount(c_sess, weights=cat.price_cents[v_sku[carts]], minlength=n_s)
        .round()
        .astype(np.int64)
    )
    first_cart = _group_starts(c_sess)
    cart_category = np.zeros(n_s, dtype=np.int64)
    cart_category[c_sess[first_cart]] = v_cat[carts[first_cart]]
    can_buy = is_cust[s_actor] & (state >= 1)
    checkout = (n_cart > 0) & can_buy & (rng.random(n_s) < p_checkout[s_actor])
    purchase = checkout & (rng.random(n_s) < 0.62)

    # Events of every kind, then ordered by session and position within it.
    currency = geo.currencies.take(pa.array(country))
    parts: list[_Part] = []

    def add(sessions: I64, key: I64 | int, code: int, props: pa.Array) -> None:
        keys = np.broadcast_to(np.asarray(key, dtype=np.int64), sessions.shape)
        parts.append(_Part(sessions, keys, np.full(sessions.size, code, np.int64), props))

    def const(text_value: str, count: int) -> pa.Array:
        return pa.repeat(pa.scalar(text_value, pa.string()), count)

    sel = np.flatnonzero(app)
    add(sel, _KEY_HEAD, _APP_OPEN, cat.app_props.take(pa.array(dev_variant[s_dev[sel]])))
    sel = np.flatnonzero(web & (landing == 0))
    add(sel, _KEY_HEAD, _PAGE_HOME, const(_compact({"path": "/", "title": "Home"}), sel.size))
    sel = np.flatnonzero(web & (landing == 1))
    add(sel, _KEY_HEAD, _PAGE_CATEGORY, cat.category_page_props.take(pa.array(focus[sel])))
    sel = np.flatnonzero(web & (landing == 2))
    add(
        sel, _KEY_HEAD, _PAGE_PRODUCT, cat.product_page_props.take(pa.array(v_sku[view_first[sel]]))
    )
    sel = np.flatnonzero(has_category)
    add(sel, _KEY_CATEGORY, _PAGE_CATEGORY, cat.category_page_props.take(pa.array(focus[sel])))
    sel = np.flatnonzero(state == 1)
    add(sel, _KEY_IDENTIFY, _IDENTIFY, const("{}", sel.size))
    sel = np.flatnonzero(has_search)
    queries = focus[sel] * 6 + rng.integers(0, 6, sel.size)
    add(sel, _KEY_SEARCH, _SEARCH, cat.search_props.take(pa.array(queries)))
    add(v_sess, _KEY_VIEWS + 4 * v_pos, _VIEW, cat.view_props.take(pa.array(v_sku)))
    add(
        c_sess,
        _KEY_VIEWS + 2 + 4 * v_pos[carts],
        _CART_ADD,
        cat.view_props.take(pa.array(v_sku[carts])),
    )
    sel = np.flatnonzero(web & checkout)
    add(
        sel,
        _KEY_CART_PAGE,
        _PAGE_CART,
        const(_compact({"path": "/cart", "title": "Cart"}), sel.size),
    )
    sel = np.flatnonzero(checkout)
    add(
        sel,
        _KEY_CHECKOUT,
        _CHECKOUT,
        pc.binary_join_element_wise(
            '{"cart_value":',
            _money(cart_cents[sel]),
            ',"items":',
            _ints(n_cart[sel]),
            ',"currency":"',
            currency.take(pa.array(s_actor[sel])),
            '"}',
            "",
        ),
    )
    sel = np.flatnonzero(purchase)
    order_ids = pc.utf8_lpad(
        _ints(first_order + np.arange(sel.size, dtype=np.int64)), width=9, padding="0"
    )
    add(
        sel,
        _KEY_PURCHASE,
        _PURCHASE,
        pc.binary_join_element_wise(
            '{"order_id":"ORD',
            order_ids,
            '","revenue":',
            _money(cart_cents[sel]),
            ',"currency":"',
            currency.take(pa.array(s_actor[sel])),
            '","items":',
            _ints(n_cart[sel]),
            ',"category":"',
            cat.category_slugs.take(pa.array(cart_category[sel])),
            '"}',
            "",
        ),
    )

    e_sess = np.concatenate([p.session for p in parts])
    e_key = np.concatenate([p.key for p in parts])
    e_code = np.concatenate([p.code for p in parts])
    props = pa.concat_arrays([p.props for p in parts])
    by_session = np.lexsort((e_key, e_sess))
    es = e_sess[by_session]
    n_e = es.size

    # Times: a session's events follow its start by a few seconds to minutes each.
    gaps = (1000 + rng.exponential(30_000.0, n_e)).astype(np.int64)
    first_of_session = _group_starts(es)
    gaps[first_of_session] = 0
    elapsed = np.cumsum(gaps)
    heads = np.flatnonzero(first_of_session)  # one per session, sessions in order
    ts = s_start[es] + elapsed - elapsed[heads][es]
    if heads.size:
        # Sessions running past the end move back so that they end a little before it.
        overflow = np.maximum.reduceat(ts, heads) - world.end_ms
        slack = (rng.random(heads.size) * 20 * 60_000).astype(np.int64)
        ts -= np.where(overflow > 0, overflow + slack, 0)[es]
    ts = np.clip(ts, world.start_ms, world.end_ms)
    st = state[es]
    identified = (st == 2) | ((st == 1) & (e_key[by_session] >= _KEY_IDENTIFY))

    by_time = np.argsort(ts, kind="stable")
    final = by_session[by_time]
    ts, es, identified = ts[by_time], es[by_time], identified[by_time]
    code = e_code[final]
    e_actor = s_actor[es]

    user_ids = pa.array([f"u{i + 1:07d}" for i in range(first_index, first_index + n)], pa.string())
    events = pa.table(
        {
            "message_id": _uuids(rng, n_e, ts),
            "type": pa.array(_TYPES).take(pa.array(_EVENT_TYPE_OF[code])),
            "event": pa.array(_EVENT_NAMES).take(pa.array(code)),
            "timestamp": _iso_ms(ts) if text else _timestamps(ts),
            "user_id": user_ids.take(pa.array(e_actor, mask=~identified)),
            "anonymous_id": anonymous_ids.take(pa.array(s_dev[es])),
            "properties": props.take(pa.array(final)),
        }
    )

    # Customer attributes that follow from the simulated behaviour.
    last_seen = np.full(actors, -1, dtype=np.int64)
    np.maximum.at(last_seen, e_actor, ts)
    first_login = np.full(actors, np.iinfo(np.int64).max, dtype=np.int64)
    logins = code == _IDENTIFY
    np.minimum.at(first_login, e_actor[logins], ts[logins])
    bought = np.flatnonzero(purchase)
    window_cents = (
        np.bincount(s_actor[bought], weights=cart_cents[bought], minlength=actors)
        .round()
        .astype(np.int64)
    )

    signup = world.start_ms - (_DAY_MS + rng.random(n) * 3 * _YEAR_DAYS * _DAY_MS).astype(np.int64)
    new_rows = np.flatnonzero(is_new[:n] & (first_login[:n] < np.iinfo(np.int64).max))
    signup[new_rows] = first_login[new_rows]
    tenure_days = np.where(is_new[:n], 0.0, (world.start_ms - signup) / _DAY_MS)
    session_rate = n_sess[:n] / max(span / _DAY_MS, 1.0)
    past_orders = np.where(
        is_new[:n], 0, rng.poisson((session_rate * tenure_days * 0.03 + 0.5) * propensity[:n])
    )
    past_cents = (past_orders * 6000 * rng.lognormal(0.0, 0.4, n)).round().astype(np.int64)
    ltv = window_cents[:n] + past_cents
    # Customers not seen in the window were last updated at some time between signup and then.
    quiet_update = signup + (rng.random(n) * (world.start_ms - signup)).astype(np.int64)
    seen = last_seen[:n]
    updated = np.where(seen >= 0, np.maximum(signup, seen), np.maximum(signup, quiet_update))
    profiles = _profiles_table(
        rng, world, first_index, country[:n], city[:n], signup, activity[:n], ltv, updated, text
    )
    return _Chunk(profiles, events, visitors, int(purchase.sum()))


# --------------------------------------------------------------------------- writers


class _Sink(Protocol):
    def write(self, table: pa.Table) -> None: ...
    def close(self) -> None: ...


#: Columns with (nearly) one value per row: dictionary encoding would only cost time there.
_DISTINCT_COLUMNS = frozenset(
    {"message_id", "email", "phone", "signup_at", "updated_at", "timestamp", "lifetime_value"}
)


class _ParquetSink:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            dictionary = [name for name in table.column_names if name not in _DISTINCT_COLUMNS]
            self._writer = pq.ParquetWriter(
                self._path,
                table.schema,
                compression="zstd",
                compression_level=1,
                use_dictionary=dictionary,
            )
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class _CsvSink:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer: pacsv.CSVWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = pacsv.CSVWriter(str(self._path), table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class _JsonLinesSink:
    """One JSON object per row, encoded by DuckDB's ``to_json`` (fast, and exact JSON)."""

    _ROWS_PER_PASS = 100_000

    def __init__(self, path: Path) -> None:
        self._file = path.open("wb")
        self._db = duckdb.connect()

    def write(self, table: pa.Table) -> None:
        for start in range(0, table.num_rows, self._ROWS_PER_PASS):
            self._db.register("chunk", table.slice(start, self._ROWS_PER_PASS))
            try:
                result = self._db.sql("SELECT to_json(c) AS line FROM chunk AS c")
                lines = result.to_arrow_table().column(0)
            finally:
                self._db.unregister("chunk")
            for piece in lines.chunks:
                self._write_values(pc.binary_join_element_wise(piece.cast(pa.string()), "", "\n"))

    def _write_values(self, values: pa.Array) -> None:
        """Write the concatenated bytes of a string array without nulls."""
        if len(values) == 0:
            return
        offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset :]
        data = values.buffers()[2]
        self._file.write(memoryview(data)[int(offsets[0]) : int(offsets[len(values)])])

    def close(self) -> None:
        self._file.close()
        self._db.close()


def _sink(fmt: Format, path: Path) -> _Sink:
    if fmt == "parquet":
        return _ParquetSink(path)
    if fmt == "csv":
        return _CsvSink(path)
    return _JsonLinesSink(path)


# --------------------------------------------------------------------------- entry point


def generate(
    out_dir: Path,
    *,
    profiles: int = 1000,
    seed: int = 7,
    end: datetime,
    days: int = 180,
    fmt: Format = "parquet",
    progress: Callable[[int, int], None] | None = None,
    sessions: float = 1.0,
) -> GenerateSummary:
    """Write the demo shop's ``profiles``, ``events`` and ``schema.json`` into ``out_dir``.

    ``end`` (timezone-aware) closes the window of ``days`` days that all event timestamps fall
    in. Files are replaced atomically when complete; a failure leaves no partial file behind.
    ``progress(done, total)`` is called after each chunk of customers. ``sessions`` scales
    everyone's number of sessions (and so the events: about 15 per customer at 1.0, the
    default). The same arguments always produce byte-identical files. Raises ``ValueError`` on
    an invalid argument.
    """
    if fmt not in _EXTENSIONS:
        raise ValueError(f"fmt must be one of {sorted(_EXTENSIONS)}, got {fmt!r}")
    if not 1 <= profiles <= MAX_PROFILES:
        raise ValueError(f"profiles must be between 1 and {MAX_PROFILES}, got {profiles}")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if seed < 0:
        raise ValueError(f"seed must not be negative, got {seed}")
    if not 0.1 <= sessions <= 10.0:  # NaN fails too
        raise ValueError(f"sessions must be between 0.1 and 10, got {sessions}")
    if end.tzinfo is None or end.utcoffset() is None:
        raise ValueError("end must be timezone-aware")

    end_utc = end.astimezone(UTC)
    end_ms = (end_utc - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    start_ms = end_ms - days * _DAY_MS
    base_ms = start_ms - start_ms % _DAY_MS
    base = datetime.fromtimestamp(base_ms / 1000, tz=UTC)
    n_days = (end_ms - base_ms) // _DAY_MS + 2
    world = _World(
        seed=seed,
        start_ms=start_ms,
        end_ms=end_ms,
        base_ms=base_ms,
        base_weekday=base.weekday(),
        offsets=_utc_offsets(_geo().zones, base, n_days),
        catalog=_catalog(np.random.default_rng(np.random.SeedSequence([seed, 0]))),
        sessions=sessions,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    ext = _EXTENSIONS[fmt]
    text = fmt != "parquet"
    targets = (out_dir / f"profiles.{ext}", out_dir / f"events.{ext}")
    partials = tuple(path.with_name(path.name + ".partial") for path in targets)
    profile_sink, event_sink = _sink(fmt, partials[0]), _sink(fmt, partials[1])
    n_events = n_visitors = orders = 0
    try:
        for chunk_no, first in enumerate(range(0, profiles, CHUNK_PROFILES)):
            size = min(CHUNK_PROFILES, profiles - first)
            chunk = _make_chunk(world, chunk_no, first, size, orders + 1, text)
            profile_sink.write(chunk.profiles)
            event_sink.write(chunk.events)
            n_events += chunk.events.num_rows
            n_visitors += chunk.visitors
            orders += chunk.purchases
            if progress is not None:
                progress(first + size, profiles)
    except BaseException:
        for sink in (profile_sink, event_sink):
            sink.close()
        for path in partials:
            path.unlink(missing_ok=True)
        raise
    profile_sink.close()
    event_sink.close()
    for partial, target in zip(partials, targets, strict=True):
        os.replace(partial, target)
    schema_path = out_dir / "schema.json"
    schema_path.write_bytes(
        resources.files(__package__ or "waymark.demo").joinpath("schema.json").read_bytes()
    )
    return GenerateSummary(
        profiles=profiles,
        events=n_events,
        anonymous_visitors=n_visitors,
        files=(*targets, schema_path),
    )
