"""``streamrec bench faults``: records lost or applied twice when every process of the stack, the ranking
service included, is SIGKILLed in turn under a sustained stream and steady ranking requests (``streamrec
chaos``, repeated). ``value`` = lost + doubled + served_lost (goal 0): the log's examples missing from the
trainer's checkpoint, ids trained twice, and impressions of answered ranking requests missing from the
impressions topic. served_lost is in the value, not only beside it, because it is the same promise broken:
the service answered (its acknowledgement, as a broker's ack is the producer's) and the record is gone, so a
run that loses served impressions must not score 0. The baseline is the same count for a run without faults,
which is 0 by construction of the checks.

    streamrec bench faults --quick      1 run, 15,000 impressions, each process killed once (~45 s)
    streamrec bench faults              3 runs in a row, 50,000 impressions, each process killed twice
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from benchmarks._common import parser, report
from deploy.chaos import KILL_ORDER, WHAT_DIES, run_chaos
from config import load_config


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=None, help="chaos runs in a row (default 3, quick 1)")
    p.add_argument("--events", type=int, default=None, help="impressions per run (default 50000, quick 15000)")
    a = p.parse_args()
    runs, events = a.runs or (1 if a.quick else 3), a.events or (15_000 if a.quick else 50_000)
    rounds, rate = (1, 1_000.0) if a.quick else (2, 1_500.0)
    logging.basicConfig(level=logging.ERROR)
    results = []
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="streamrec-faults-") as tmp:
            results.append(run_chaos(load_config(), Path(tmp), events=events, rate=rate, rounds=rounds, seed=11 + i,
                                     progress=lambda m: print(m, file=sys.stderr)))
    rows = []
    for i, r in enumerate(results):
        back = max((t for _, t in r.kills), default=0.0)
        rows.append((i + 1, f"{r.impressions:,}", f"{r.labelled:,}", f"{r.trained:,}", f"{r.stored_rows:,}",
                     f"{r.dead_letters:,}/{r.bad_records:,}", r.lost, r.doubled, r.wrong_labels,
                     f"{r.served_requests:,}", f"{r.served_impressions:,}", r.served_lost, f"{r.requests_failed:,}",
                     len(r.kills), f"{back:.1f}", "yes" if r.ok else "NO", f"{r.elapsed_s:.0f}"))
    print(f"killed in turn ({rounds}x per run): " + ", ".join(WHAT_DIES.get(n, n) for n in KILL_ORDER))
    lost, doubled = sum(r.lost for r in results), sum(r.doubled for r in results)
    served_lost = sum(r.served_lost for r in results)
    report("faults", rows, ("run", "impressions", "labelled", "trained", "prediction rows", "dead letters", "lost",
                            "doubled", "wrong labels", "requests answered", "served impressions", "served lost",
                            "requests failed", "kills", "slowest back s", "all checks", "s"),
           value=lost + doubled + served_lost, unit="records", baseline=0, lost=lost, doubled=doubled,
           served_lost=served_lost, served_requests=sum(r.served_requests for r in results),
           served_impressions=sum(r.served_impressions for r in results),
           served_trained=sum(r.served_trained for r in results),
           requests_failed=sum(r.requests_failed for r in results),
           kills=sum(len(r.kills) for r in results), runs=runs, ok=all(r.ok for r in results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
