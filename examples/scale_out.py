"""Several instances and a partitioned gallery on PostgreSQL, in one script.

Who it is for: developers putting the store under a matching service with several workers
(or hosts), and anyone checking what docs/scale-out.md promises before they deploy it.

It creates a store in a PostgreSQL schema, opens two more instances of it (in a service
each would be its own process or host), enrols on one and finds the subject on another,
erases on one and shows no instance returns the subject any more, then opens the gallery
as two partitions and merges their answers into the single-index answer. The schema is
dropped at the end.

    pip install 'biotemplate[postgres]'
    python examples/scale_out.py postgresql://postgres@127.0.0.1:5432/test

The thresholds are for the synthetic templates used here, nothing else.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import time
from pathlib import Path

import biotemplate as bt
from biotemplate.synthetic import Gallery, make_gallery, probes

POLICY = {"epoch": "1d", "purposes": {"watchlist": {
    "max_retention": "1y", "default_retention": "30d",
    "modes": ["identification", "investigation"], "match_threshold": 0.6}}}


def main(server: str) -> None:
    schema = f"example_{secrets.token_hex(4)}"
    url = f"{server}{'&' if '?' in server else '?'}schema={schema}"
    people = make_gallery(200, 1, 128, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        keys = bt.FileKeyProvider.generate(Path(tmp) / "master.key")
        first = bt.TemplateStore.create(url, dim=128, model="synthetic-v1",
                                        policy=bt.RetentionPolicy.from_dict(POLICY),
                                        key_provider=keys)
        try:
            run(first, url, keys, people)
        finally:
            first.close()
            drop(server, schema)


def run(first: bt.TemplateStore, url: str, keys: bt.KeyProvider, people: Gallery) -> None:
    worker = bt.TemplateStore.open(url, key_provider=keys)  # another process, in a service
    first.enroll_many(people.templates, subject_ids=people.subject_ids,
                      purposes=["watchlist"], actor="enrolment-desk")
    probe = probes(people, [42], seed=1)[0]
    found = []
    for _ in range(200):  # the feed brings the enrolment within milliseconds
        found = worker.search(probe, purpose="watchlist", actor="analyst").candidates
        if found:
            break
        time.sleep(0.01)
    print(f"the other instance finds {found[0].subject_id} (score {found[0].score:.3f})")
    first.erase_subject(found[0].subject_id, actor="dpo", reason="erasure request")
    again = worker.search(probe, purpose="watchlist", actor="analyst").candidates
    print(f"after the erasure on the first instance, the other returns {len(again)} "
          "candidates, at once")
    worker.close()
    halves = [bt.TemplateStore.open(url, key_provider=keys, partition=(i, 2)) for i in (0, 1)]
    try:
        print(f"two partitions index {[h.stats().indexed for h in halves]} subjects")
        probe = probes(people, [7], seed=2)[0]
        merged = bt.merge_results([h.search(probe, purpose="watchlist", k=5, actor="analyst")
                                   for h in halves], k=5)
        single = first.search(probe, purpose="watchlist", k=5, actor="analyst")
        assert [c.record_id for c in merged.candidates] == \
            [c.record_id for c in single.candidates]
        print(f"merged partitions: {[c.subject_id for c in merged.candidates]}, the same "
              "as one index")
    finally:
        for h in halves:
            h.close()


def drop(server: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(server.split("?")[0], autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/test")
