"""Fills a Bursar store's catalog with 1,000 tenants, 100,000 API keys and 10,000
budgets, as the admin API would have created them, for the memory benchmark."""
import hashlib
import json
import sqlite3
import sys
import uuid

db = sqlite3.connect(sys.argv[1])
windows = [{"kind": "daily"}, {"kind": "weekly"}, {"kind": "monthly"}, {"kind": "lifetime"},
           {"kind": "rolling", "seconds": 86400}]
scopes = ["tenant", "campaign", "workflow", "agent", "end_user"]
rows = []
for t in range(1000):
    tid = f"t{t}"
    rows.append(("tenant", tid, json.dumps({"id": tid, "name": tid, "plan": "pro",
                                            "timezone": "Europe/Paris", "mode": "enforce"})))
    for k in range(100):
        secret = f"bsr_memory_bench_{t}_{k:020d}"
        kid = str(uuid.uuid4())
        rows.append(("key", kid, json.dumps({
            "id": kid, "name": f"key {k}", "sha256": hashlib.sha256(secret.encode()).hexdigest(),
            "prefix": secret[:8], "tenant": tid, "team": None, "user": None, "kind": "member",
            "role": None, "created_at": "2026-11-01T00:00:00Z", "expires_at": None, "revoked_at": None})))
    for b in range(10):
        bid = f"{tid}.b{b}"
        rows.append(("budget", bid, json.dumps({
            "id": bid, "tenant": tid, "scope": scopes[b % 5], "selector": "each",
            "window": windows[b % 5], "limit": str(100 + b),
            "thresholds": {"warn_percent": 80, "emergency_percent": 90, "emergency_action": "alert_only"},
            "rollover": False})))
db.executemany("INSERT INTO catalog (kind, id, body) VALUES (?, ?, ?)", rows)
db.commit()
print(f"catalog: {sum(1 for r in rows if r[0] == 'key')} keys, {sum(1 for r in rows if r[0] == 'budget')} budgets")
