#!/usr/bin/env bash
# stemforge benchmark: times every phase of a cold build (empty cache, no
# verify), a warm build, the scan of a root tree and the verification boot,
# and prints the image sizes, each against its budget.
#   bench/run.sh [PROFILE]      (as root; `make bench` builds the binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-debian-bookworm}
bin=${STEMFORGE:-target/x86_64-unknown-linux-gnu/release/stemforge}
out=bench/out
rm -rf --one-file-system "$out"
mkdir -p "$out"
export STEMFORGE_CACHE_DIR="$PWD/$out/cache"

echo "== cold build, no verify (empty cache)"
"$bin" build --profile "$profile" --out "$out/cold" --no-verify --keep-work
echo "== warm build, no verify (cached bootstrap)"
"$bin" build --profile "$profile" --out "$out/warm" --no-verify
echo "== scan of the hardened root tree (5 runs)"
tree="$out/cold/.work/$profile/rootfs"
scan_ms=()
for _ in 1 2 3 4 5; do
  t0=$(date +%s%N); "$bin" scan --root "$tree" --format json >/dev/null; t1=$(date +%s%N)
  scan_ms+=($(( (t1 - t0) / 1000000 )))
done
echo "== verify (boot under QEMU, scan inside)"
"$bin" verify "$out/cold/$profile.qcow2" --out "$out/verify"

python3 - "$out" "$profile" "${scan_ms[@]}" <<'PY'
import json, os, sys
out, profile, scans = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]]
def steps(d):
    j = json.load(open(f"{out}/{d}/{profile}.steps.json"))
    return {s["name"]: s["seconds"] for s in j["steps"]}, j["total_seconds"]
cold, cold_total = steps("cold")
warm, warm_total = steps("warm")
verify = json.load(open(f"{out}/verify/{profile}.verify.json"))
rows = [
    ("cold build, no verify", cold_total, 180),
    ("  bootstrap (cold)", cold.get("bootstrap", 0), None),
    ("  stages", cold.get("stages", 0), None),
    ("  disk assembly", cold.get("disk", 0), 10),
    ("  offline scan", cold.get("scan", 0), None),
    ("  qcow2", cold.get("qcow2", 0), None),
    ("warm build, no verify", warm_total, None),
    ("scan of a root tree (best of 5)", min(scans) / 1000, 1),
    ("verify (boot + scan, TCG)" if "TCG" in verify["accel"] else "verify (boot + scan, KVM)", verify["total_seconds"], 150),
    ("  boot to agent", verify["boot_seconds"] or 0, None),
]
print(f"\n{'phase':<34} {'seconds':>8}  budget")
for name, secs, budget in rows:
    mark = "" if budget is None else (f"<= {budget} s  " + ("ok" if secs <= budget else "OVER"))
    print(f"{name:<34} {secs:>8.1f}  {mark}")
print(f"\n{'image':<34} {'MiB':>8}")
for ext in ("raw", "qcow2"):
    p = f"{out}/cold/{profile}.{ext}"
    st = os.stat(p)
    print(f"{profile}.{ext:<24} {st.st_blocks * 512 / 2**20:>8.1f}  (apparent {st.st_size / 2**20:.0f} MiB)")
print(f"verify passed: {verify['passed']}")
PY
