#!/usr/bin/env bash
# stemforge benchmark: times every phase of a cold build (empty cache, no
# verify), a warm build of every output (its peak memory too), the layer
# cache (a no-op rebuild, an edit of the last stage, a package added to a
# stage's list), the scan of
# a root tree and the verification boot (median of VERIFY_RUNS, default 3),
# and prints the output sizes, each against its budget.
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
echo "== warm build of every output, no verify (cached bootstrap)"
# Peak resident memory of the build process itself (host tools are
# children of their own and are not counted by RUSAGE_SELF of stemforge;
# ru_maxrss of the children is the largest single process).
python3 - "$bin" "$profile" "$out" <<'PY' > "$out/warm.rss"
import resource, subprocess, sys
bin, profile, out = sys.argv[1:]
subprocess.run([bin, "build", "--profile", profile, "--out", f"{out}/warm",
                "--no-verify", "--format", "all"], check=True, stdout=sys.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
PY
echo "== layer cache: a no-op rebuild, an edit of the last stage, a package added (raw, no verify)"
stages="$out/stages"
cp -r stages "$stages"
timed() {  # NAME: a build of the copied stages; wall time and layer counts kept
  local t0 t1
  t0=$(date +%s%N)
  "$bin" build --profile "$profile" --stages "$stages" --out "$out/edit" --verify never --format raw
  t1=$(date +%s%N)
  echo $(( (t1 - t0) / 1000000 )) > "$out/$1.ms"
  cp "$out/edit/$profile.steps.json" "$out/$1.steps.json"
}
timed first
timed noop
echo "# bench: an edit" >> "$stages/90-system/files/umask.sh"
timed edit
sed -i 's/install: \[cron, libpam-pwquality\]/install: [cron, libpam-pwquality, acl]/' "$stages/80-accounts/stage.yml"
timed package
echo "== scan of the hardened root tree (5 runs)"
tree="$out/cold/.work/$profile/tree"
scan_ms=()
for _ in 1 2 3 4 5; do
  t0=$(date +%s%N); "$bin" scan --root "$tree" --format json >/dev/null; t1=$(date +%s%N)
  scan_ms+=($(( (t1 - t0) / 1000000 )))
done
# Peak resident memory of one scan of the whole catalog.
python3 - "$bin" "$tree" <<'PY' > "$out/scan.rss"
import resource, subprocess, sys
subprocess.run([sys.argv[1], "scan", "--root", sys.argv[2], "--format", "json"],
               stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
PY
echo "== role builds: the base and each role, raw, cached bootstrap; each role verified once"
"$bin" build --profile "$profile" --out "$out/role-base" --no-verify --format raw
roles=()
known=$("$bin" profiles)
for role in docker postgres k8s-node; do
  if grep -q "^$profile-$role " <<<"$known"; then
    roles+=("$role")
    "$bin" build --profile "$profile-$role" --out "$out/role-$role" --format raw || true
  fi
done
echo "${roles[@]}" > "$out/roles"
echo "== scan of the image files (raw, qcow2; 3 runs each)"
for f in raw qcow2; do
  best=
  for _ in 1 2 3; do
    t0=$(date +%s%N); "$bin" scan --image "$out/cold/$profile.$f" --format json >/dev/null; t1=$(date +%s%N)
    ms=$(( (t1 - t0) / 1000000 )); if [ -z "$best" ] || [ "$ms" -lt "$best" ]; then best=$ms; fi
  done
  echo "$best" > "$out/image-$f.ms"
  python3 - "$bin" "$out/cold/$profile.$f" <<'PY' > "$out/image-$f.rss"
import resource, subprocess, sys
subprocess.run([sys.argv[1], "scan", "--image", sys.argv[2], "--format", "json"],
               stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
PY
done
runs=${VERIFY_RUNS:-3}
for i in $(seq 1 "$runs"); do
  echo "== verify $i/$runs (boot under QEMU, scan inside)"
  "$bin" verify "$out/cold/$profile.qcow2" --out "$out/verify$i"
done

python3 - "$out" "$profile" "$runs" "${scan_ms[@]}" <<'PY'
import glob, json, os, statistics, sys
out, profile, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
scans = [int(x) for x in sys.argv[4:]]
def steps(d):
    j = json.load(open(f"{out}/{d}/{profile}.steps.json"))
    return {s["name"]: s["seconds"] for s in j["steps"]}, j["total_seconds"]
cold, cold_total = steps("cold")
warm, warm_total = steps("warm")
verifies = [json.load(open(f"{out}/verify{i}/{profile}.verify.json")) for i in range(1, runs + 1)]
live_scans = [json.load(open(f"{out}/verify{i}/{profile}.scan.json"))["duration_ms"] / 1000 for i in range(1, runs + 1)]
scan_rss_mib = int(open(f"{out}/scan.rss").read()) / 1024
verify = verifies[0]
boots = [v["boot_seconds"] or 0 for v in verifies]
rss_mib = int(open(f"{out}/warm.rss").read()) / 1024
formats = {k.strip(): v for k, v in warm.items() if k.startswith("  ")}
rows = [
    ("cold build, no verify", cold_total, 180),
    ("  bootstrap (cold)", cold.get("bootstrap", 0), None),
    ("  stages", cold.get("stages", 0), None),
    ("  disk assembly", cold.get("disk", 0), 10),
    ("  offline scan", cold.get("scan", 0), None),
    ("  qcow2", cold.get("qcow2", 0), None),
    ("warm build, every output, no verify", warm_total, 90),
    ("  formats (side by side)", warm.get("formats", 0), None),
] + [(f"    {k}", v, None) for k, v in formats.items()] + [
    ("  manifest + SHA256SUMS", warm.get("manifest", 0), None),
    ("scan of a root tree (best of 5)", min(scans) / 1000, 1),
    ("verify (boot + scan, TCG)" if "TCG" in verify["accel"] else "verify (boot + scan, KVM)", statistics.median(v["total_seconds"] for v in verifies), None),
    (f"  boot to agent (median of {runs})", statistics.median(boots), 60),
    (f"  live scan in the guest (median)", statistics.median(live_scans), 10),
]
def layers_note(name):
    import re
    j = json.load(open(f"{out}/{name}.steps.json"))
    note = next((s["note"] for s in j["steps"] if s["name"] == "stages"), "")
    m = re.search(r"layers: (\d+) made, (\d+) from the cache", note)
    return f"layers: {m[1]} made, {m[2]} found" if m else note
for name, label, budget in [
    ("noop", "no-op rebuild (raw)", 3),
    ("edit", "edit of a last-stage file -> raw", 8),
    ("package", "a package added to 80-accounts", None),
]:
    secs = int(open(f"{out}/{name}.ms").read()) / 1000
    rows.append((label, secs, budget))
    j = json.load(open(f"{out}/{name}.steps.json"))
    stages_s = next((s["seconds"] for s in j["steps"] if s["name"] == "stages"), 0)
    rows.append((f"  {layers_note(name)}", stages_s, None))
print(f"\n{'phase':<34} {'seconds':>8}  budget")
for name, secs, budget in rows:
    mark = "" if budget is None else (f"<= {budget} s  " + ("ok" if secs <= budget else "OVER"))
    print(f"{name:<34} {secs:>8.1f}  {mark}")
print(f"{'peak memory of the build (MiB)':<34} {rss_mib:>8.0f}  <= 1024 MiB  " + ("ok" if rss_mib <= 1024 else "OVER"))
print(f"{'peak memory of a scan (MiB)':<34} {scan_rss_mib:>8.0f}  <= 256 MiB  " + ("ok" if scan_rss_mib <= 256 else "OVER"))
for f in ("raw", "qcow2"):
    secs = int(open(f"{out}/image-{f}.ms").read()) / 1000
    mib = int(open(f"{out}/image-{f}.rss").read()) / 1024
    print(f"{'scan of the ' + f + ' image (best of 3)':<34} {secs:>8.1f}  <= 3 s  " + ("ok" if secs <= 3 else "OVER"))
    print(f"{'  its peak memory (MiB)':<34} {mib:>8.0f}  <= 256 MiB  " + ("ok" if mib <= 256 else "OVER"))
print(f"\n{'output':<64} {'MiB':>8}  budget")
budgets = {"qcow2": 230, "go_agent.tgz": 200}
for p in sorted(glob.glob(f"{out}/warm/*")):
    st = os.stat(p)
    name = os.path.basename(p)
    mib = st.st_blocks * 512 / 2**20
    b = next((v for k, v in budgets.items() if name.endswith(k)), None)
    mark = "" if b is None else (f"<= {b} MiB  " + ("ok" if mib <= b else "OVER"))
    print(f"{name:<64} {mib:>8.1f}  {mark}")
print(f"verify passed: {all(v['passed'] for v in verifies)}; boots: {', '.join(f'{b:.0f} s' for b in boots)}")
roles = open(f"{out}/roles").read().split()
if roles:
    base = json.load(open(f"{out}/role-base/{profile}.steps.json"))["total_seconds"]
    print(f"\n{'role (cached bootstrap, raw)':<34} {'adds s':>8}  budget         verify (TCG)")
    for role in roles:
        d, name = f"{out}/role-{role}", f"{profile}-{role}"
        j = json.load(open(f"{d}/{name}.steps.json"))
        build = j["total_seconds"] - sum(s["seconds"] for s in j["steps"] if s["name"] == "verify")
        try:
            v = json.load(open(f"{d}/{name}.verify.json"))
            proofs = v["agent"]["role_proofs"] if v.get("agent") else []
            state = ("passed" if v["passed"] else "FAILED") + f" in {v['total_seconds']:.0f} s, " + ", ".join(
                "proof " + ("skipped" if p.get("skipped") else ("ok" if p["passed"] else "FAILED")) for p in proofs)
        except FileNotFoundError:
            state = "no verdict"
        adds = build - base
        print(f"{role:<34} {adds:>8.1f}  <= 60 s  {'ok' if adds <= 60 else 'OVER'}  {state}")
PY
