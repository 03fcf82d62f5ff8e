"""A synthetic key=value recall corpus: a byte stream in which some bytes can be predicted only from far back.

The stream is random filler (digits) with records and, later, queries of the same key:

    ...4071#QKfQKfQKfQKfQKf 93?BAm 0056?QKf 12...
           record of QK = f           query of QK, d bytes after the record

A record is ``#`` and the pair key + value (``QKf``) written ``repeats`` times; the query is ``?`` and the pair
once. The query's value byte is the scored prediction: nothing but the record says which of the 26 lowercase
letters it is (chance 1/26). Keys are 2 uppercase letters, not reused while waiting for their query nor by the
next ``recent_keys`` records. Each record is queried once, at a distance d drawn log-uniformly from
[min_distance, max_distance]: d is the query's value byte minus the record's last value byte, the nearest copy
of the value, so a query at d >= w has no copy of its value inside a window of w. When a query falls due inside
filler or another query is due first it waits, so the actual distances are read back from the text
(``find_queries``).

Why the pair is repeated: with r = 1 a landmark is one softmax-weighted average of the c positions of a chunk.
A record of 16 bytes holds a whole chunk of 8 wherever the chunk boundaries fall, and every such chunk holds the
key and the value together, so one landmark can carry both (a key and value that a chunk boundary separated
could not be matched and read from one landmark).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

RECORD, QUERY, END = b"#", b"?", b" "
KEY_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
VALUE_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
FILLER_ALPHABET = b"0123456789"


@dataclass(frozen=True)
class RecallSpec:
    min_distance: int = 16
    max_distance: int = 1024
    key_length: int = 2
    repeats: int = 5  # key + value pairs in a record
    mean_gap: int = 12  # filler bytes before each record or query: uniform in 0 .. 2 * mean_gap
    recent_keys: int = 96  # a key is not reused by the next this many records

    def __post_init__(self) -> None:
        if not 1 <= self.min_distance <= self.max_distance:
            raise ValueError(f"need 1 <= min_distance ({self.min_distance}) <= max_distance ({self.max_distance})")
        if self.key_length < 1 or self.repeats < 1:
            raise ValueError("key_length and repeats must be >= 1")
        if self.mean_gap < 0 or self.recent_keys < 0:
            raise ValueError("mean_gap and recent_keys must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def chance(self) -> float:
        """Accuracy of a guess that knows the value alphabet but not the record."""
        return 1.0 / len(VALUE_ALPHABET)


def generate(n_bytes: int, spec: RecallSpec, seed: int = 0) -> bytes:
    """``n_bytes`` of recall stream (records left unqueried at the end are simply never asked)."""
    rng = random.Random(seed)
    out = bytearray()
    due: list[tuple[int, bytes, int]] = []  # (position the query's value byte should land at, key, value)
    live: set[bytes] = set()  # keys waiting for their query
    recent: deque[bytes] = deque(maxlen=min(spec.recent_keys, len(KEY_ALPHABET) ** spec.key_length // 2))
    log_lo, log_hi = math.log(spec.min_distance), math.log(spec.max_distance)
    query_head = len(QUERY) + spec.key_length  # bytes of a query before its value
    while len(out) < n_bytes:
        out += bytes(rng.choices(FILLER_ALPHABET, k=rng.randint(0, 2 * spec.mean_gap)))
        if due and due[0][0] <= len(out) + query_head:
            _, key, value = heapq.heappop(due)
            live.discard(key)
            out += QUERY + key + bytes([value]) + END
            continue
        key = _new_key(rng, spec.key_length, recent, live)
        recent.append(key)
        live.add(key)
        value = rng.choice(VALUE_ALPHABET)
        out += RECORD + (key + bytes([value])) * spec.repeats
        last_value = len(out) - 1
        out += END
        distance = round(math.exp(rng.uniform(log_lo, log_hi)))
        heapq.heappush(due, (last_value + distance, key, value))
    return bytes(out[:n_bytes])


def _new_key(rng: random.Random, length: int, *taken) -> bytes:
    while True:
        key = bytes(rng.choices(KEY_ALPHABET, k=length))
        if not any(key in t for t in taken):
            return key


@dataclass(frozen=True)
class Query:
    position: int  # index of the query's value byte in the token array (the byte to predict)
    value: int
    distance: int  # position minus the index of the record's last value byte (the nearest copy of the value)


def find_queries(tokens: np.ndarray, key_length: int = 2) -> list[Query]:
    """Every answerable query in ``tokens`` (byte ids): its record lies inside the array, with the same key.

    Parsed from the bytes themselves, so a split that starts or ends inside a record or query loses only those.
    """
    data = bytes(np.asarray(tokens, dtype=np.uint8))
    records: dict[bytes, int] = {}  # key -> index of its record's last value byte (the latest record)
    found: list[Query] = []
    i = 0
    while (i := _next_marker(data, i)) >= 0:
        key = data[i + 1: i + 1 + key_length]
        value_at = i + 1 + key_length
        if len(key) < key_length or not all(b in KEY_ALPHABET for b in key) or value_at >= len(data) \
                or data[value_at] not in VALUE_ALPHABET:
            i += 1
            continue
        if data[i: i + 1] == RECORD:
            pair = data[i + 1: value_at + 1]
            while data[value_at + 1: value_at + 1 + len(pair)] == pair:  # the record's later copies
                value_at += len(pair)
            records[key] = value_at
        elif key in records:
            found.append(Query(value_at, data[value_at], value_at - records.pop(key)))
        i = value_at
    return found


def _next_marker(data: bytes, start: int) -> int:
    a, b = data.find(RECORD, start), data.find(QUERY, start)
    if a < 0:
        return b
    return a if b < 0 else min(a, b)
