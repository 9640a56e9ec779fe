"""The batch-system baseline of docs/BENCHMARKS.md: the recommendation
candidates of `streamscore rebuild` (docs/RECOMMENDATIONS.md) computed by
DuckDB in SQL over the same interactions exported to Parquet.

  python3 scripts/bench_duckdb.py INTERACTIONS.jsonl OUT_DIR [REDIS_PORT]

Converts the JSON lines to Parquet (timed apart: the export), then times the
SQL: co-occurrence of each interaction with the distinct items among the
user's previous `cooccurrence_window` interactions (weights of both kinds, growth
2^((t - t0) / half-life) of the newer one), both directions; the strongest
`max_neighbours` per item; per user the neighbours of their last
`history_cap` items weighted by kind and age, minus what they bought; top
`top_k`, ties by item id. Same default knobs as config/streamscore.toml.
The incremental pruning of the Rust builder is exact top-N here, so lists
can differ slightly; with REDIS_PORT given, the script reports how much the
top-k lists agree with the `recs:{user}` of the current generation.
"""
import json
import subprocess
import sys
import time

import duckdb

HISTORY_CAP, COOCCURRENCE_WINDOW, MAX_NEIGHBOURS, TOP_K = 30, 10, 50, 20
HALF_LIFE_MS = 7 * 24 * 3600 * 1000
WEIGHTS = "CASE kind WHEN 'view' THEN 1.0 WHEN 'click' THEN 2.0 WHEN 'add_to_cart' THEN 4.0 ELSE 8.0 END"


def main():
    src, out = sys.argv[1], sys.argv[2]
    redis_port = sys.argv[3] if len(sys.argv) > 3 else None
    con = duckdb.connect()
    t = time.time()
    con.execute(
        f"COPY (SELECT row_number() OVER () AS seq, user_id, item_id, kind, event_time "
        f"FROM read_json('{src}', format='newline_delimited', "
        f"columns={{'event_id':'VARCHAR','user_id':'VARCHAR','item_id':'VARCHAR','kind':'VARCHAR','event_time':'BIGINT'}})) "
        f"TO '{out}/interactions.parquet' (FORMAT parquet)"
    )
    export_s = time.time() - t
    n = con.execute(f"SELECT count(*) FROM '{out}/interactions.parquet'").fetchone()[0]
    print(f"export to Parquet: {n} interactions in {export_s:.1f} s (not part of the timing below)")

    t = time.time()
    con.execute(f"""
      CREATE TEMP TABLE ev AS
      SELECT user_id, item_id, kind, event_time, {WEIGHTS} AS w,
             row_number() OVER (PARTITION BY user_id ORDER BY seq) AS n
      FROM '{out}/interactions.parquet'""")
    t0, tmax = con.execute("SELECT min(event_time), max(event_time) FROM ev").fetchone()
    con.execute(f"""
      CREATE TEMP TABLE pairs AS
      SELECT a.item_id AS i, b.item_id AS o,
             a.w * arg_max(b.w, b.n) * pow(2, (a.event_time - {t0}) / {HALF_LIFE_MS}) AS c
      FROM ev a JOIN ev b
        ON a.user_id = b.user_id AND b.n >= a.n - {COOCCURRENCE_WINDOW} AND b.n < a.n AND b.item_id <> a.item_id
      GROUP BY a.user_id, a.n, a.item_id, a.w, a.event_time, b.item_id""")
    con.execute(f"""
      CREATE TEMP TABLE nb AS
      SELECT i, o, c FROM (
        SELECT i, o, sum(c) AS c, row_number() OVER (PARTITION BY i ORDER BY sum(c) DESC, o) AS r
        FROM (SELECT i, o, c FROM pairs UNION ALL SELECT o AS i, i AS o, c FROM pairs)
        GROUP BY i, o)
      WHERE r <= {MAX_NEIGHBOURS}""")
    con.execute(f"""
      CREATE TEMP TABLE cand AS
      WITH last AS (SELECT user_id, max(n) AS mx FROM ev GROUP BY user_id),
      hist AS (
        SELECT e.user_id, e.item_id, sum(e.w * pow(2, (e.event_time - {tmax}) / {HALF_LIFE_MS})) AS hw
        FROM ev e JOIN last l USING (user_id) WHERE e.n > l.mx - {HISTORY_CAP}
        GROUP BY e.user_id, e.item_id),
      bought AS (
        SELECT user_id, item_id FROM (
          SELECT user_id, item_id, row_number() OVER (PARTITION BY user_id ORDER BY min(n) DESC) AS r
          FROM ev WHERE kind = 'purchase' GROUP BY user_id, item_id)
        WHERE r <= {HISTORY_CAP}),
      scored AS (
        SELECT h.user_id, nb.o AS item_id, sum(h.hw * nb.c) AS score
        FROM hist h JOIN nb ON nb.i = h.item_id
        WHERE NOT EXISTS (SELECT 1 FROM bought b WHERE b.user_id = h.user_id AND b.item_id = nb.o)
        GROUP BY h.user_id, nb.o)
      SELECT user_id, item_id, score FROM (
        SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY score DESC, item_id) AS r FROM scored)
      WHERE r <= {TOP_K}""")
    con.execute(f"COPY cand TO '{out}/candidates.parquet' (FORMAT parquet)")
    sql_s = time.time() - t
    users = con.execute("SELECT count(DISTINCT user_id) FROM cand").fetchone()[0]
    print(f"duckdb {duckdb.__version__}: candidates of {users} users in {sql_s:.1f} s")

    if redis_port:
        sample = [r[0] for r in con.execute(
            "SELECT DISTINCT user_id FROM cand ORDER BY hash(user_id) LIMIT 1000").fetchall()]
        mine = {}
        for u, i in con.execute(
                "SELECT user_id, item_id FROM cand WHERE user_id IN (SELECT unnest(?))", [sample]).fetchall():
            mine.setdefault(u, set()).add(i)
        cli = ["redis-cli", "-p", redis_port]
        gen = json.loads(subprocess.check_output(cli + ["GET", "recs:meta"]))["generation"]
        overlap = []
        for u in sample:
            # The field of the generation's parity (docs/REDIS.md).
            raw = subprocess.check_output(cli + ["HGET", f"recs:{u}", str(gen % 2)]).strip()
            if not raw:
                continue
            theirs = {x["item_id"] for x in json.loads(raw)["items"]}
            if theirs and mine.get(u):
                overlap.append(len(theirs & mine[u]) / max(len(theirs), len(mine[u])))
        mean = sum(overlap) / max(len(overlap), 1)
        print(f"agreement with streamscore's lists: mean top-{TOP_K} overlap {mean:.3f} over {len(overlap)} users")


if __name__ == "__main__":
    main()
