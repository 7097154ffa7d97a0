//! Property-based fuzzing of every parser that reads outside input: OS
//! profiles and stages (YAML), waivers, the scanner's file parsers (run
//! through scans of generated root trees), the SBOM's dpkg reader, and the
//! disk image readers (GPT, ext4, qcow2) on mutated real images.
//!
//! Every property runs a bounded number of cases, so the whole file takes
//! about a minute or two in a debug build on two cores; `PROPTEST_CASES=N`
//! runs N cases of each instead. A failure is shrunk and its seed saved in
//! `tests/props.proptest-regressions`, which every later run tries first.
//! Each property prints how many cases it ran (on stderr, past the test
//! harness's capture).
//!
//! The scanner properties share one oracle: a control that fails when its
//! file is empty may pass on generated text only when that text sets what
//! the control asks for (its keyword, module, key or path); random bytes
//! in sshd_config never make `PermitRootLogin no` pass.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::any::Any;
use std::collections::HashMap;
use std::fmt::Debug;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};
use stemforge::config::ConfigError;
use stemforge::scan::check::Check;
use stemforge::scan::outcome::Status;
use stemforge::scan::target::Target;
use stemforge::scan::{self, ScanContext, Selection};
use stemforge::stage::{Catalog, StageSource};

// ---------------------------------------------------------------------------
// Allocation watch: the largest single allocation is recorded, so a
// property can tell a reader that sizes a buffer from a field it did not
// check; one past REFUSED_ABOVE is refused (the process stops with the
// case that asked for it) rather than left to exhaust the machine.

struct Watched;

/// The largest allocation asked for since the last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);
const REFUSED_ABOVE: usize = 4 << 30;
/// The case running, for the message of a refused allocation.
static CASE: Mutex<String> = Mutex::new(String::new());

fn allowed(size: usize) -> bool {
    LARGEST.fetch_max(size, Ordering::Relaxed);
    if size <= REFUSED_ABOVE {
        return true;
    }
    let say = |b: &[u8]| {
        // SAFETY: writes a valid buffer to stderr; allocates nothing.
        unsafe { libc::write(2, b.as_ptr().cast(), b.len()) };
    };
    say(b"\nprops: refusing an allocation over 4 GiB; the case asking for it:\n");
    if let Ok(case) = CASE.try_lock() {
        say(case.as_bytes());
    }
    false
}

// SAFETY: every call is passed on to the system allocator unchanged,
// except refused sizes, which return null as an allocator may.
unsafe impl GlobalAlloc for Watched {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !allowed(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !allowed(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !allowed(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Watched = Watched;

/// The most one image case may allocate at once: its images are a few
/// MiB, so anything near this was sized from an unchecked field.
const ALLOCATION_BUDGET: usize = 64 << 20;

// ---------------------------------------------------------------------------
// The runner

/// Cases run by all properties of this process so far.
static TOTAL: AtomicUsize = AtomicUsize::new(0);

fn config(default_cases: u32) -> Config {
    // Config::default() reads PROPTEST_* from the environment.
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = default_cases;
    }
    c.source_file = Some(file!());
    c.max_shrink_iters = 1024;
    c.max_shrink_time = 120_000;
    c
}

fn note(line: &str) {
    // Straight to the process's stderr: the harness captures print!.
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Run `test` on `default_cases` values of `strategy` and print how many
/// ran.
fn property<S>(
    name: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let ran = AtomicUsize::new(0);
    let started = Instant::now();
    let mut runner = TestRunner::new(config(default_cases));
    let result = runner.run(&strategy, |v| {
        ran.fetch_add(1, Ordering::Relaxed);
        let text = format!("{name}: {v:?}\n");
        if let Ok(mut case) = CASE.lock() {
            *case = text;
        }
        test(v)
    });
    let n = ran.load(Ordering::Relaxed);
    let total = TOTAL.fetch_add(n, Ordering::Relaxed) + n;
    note(&format!(
        "props: {name}: {n} cases in {:.1} s (all properties of this run so far: {total})",
        started.elapsed().as_secs_f64()
    ));
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

fn fail(msg: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(msg.into())
}

fn panic_text(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Run `f` on a thread of its own: its result, or a failure when it
/// panics or is still running after `limit`.
fn bounded<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TestCaseError> {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name("props-case".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| fail(format!("starting the case's thread: {e}")))?;
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = worker.join();
            Ok(v)
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err(fail(format!("still running after {} s", limit.as_secs())))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let why = match worker.join() {
                Err(p) => panic_text(&*p),
                Ok(()) => "no result".into(),
            };
            Err(fail(format!("panicked: {why}")))
        }
    }
}

/// A scan or a load of small inputs: far more than any takes.
const SCAN_LIMIT: Duration = Duration::from_secs(30);
/// Opening and scanning one mutated image.
const IMAGE_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Generated text

/// Tokens every format gets besides its own words: quoting, escapes,
/// numbers at the edges of their types, odd Unicode.
const ODD: &[&str] = &[
    "\"",
    "'",
    "''",
    "\\",
    "\\040",
    "\\0",
    "\\\\",
    "[",
    "]",
    "{",
    "}",
    "#",
    "=",
    "==",
    ":",
    ",",
    ";",
    "*",
    "?",
    "%",
    "$",
    "..",
    "../",
    "/",
    "//",
    "\0",
    "\r",
    "\t",
    "\u{a0}",
    "\u{feff}",
    "\u{2028}",
    "\u{212a}",
    "é",
    "0",
    "-0",
    "-1",
    "+1",
    "0x",
    "0x7fffffffffffffff",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "1e999",
    "NaN",
];

const SEPARATORS: &[&str] = &[" ", " ", " ", "\t", "=", " = ", "  ", ",", ""];
const LEADS: &[&str] = &["", "", "", "", " ", "\t", "#", "-", "@", "\u{a0}"];
const EOLS: &[&str] = &["\n", "\n", "\n", "\n", "\r\n", "\\\n", ""];

fn token(words: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::sample::select(words).prop_map(str::to_string),
        2 => "[A-Za-z0-9_./:,=@*+-]{0,10}",
        2 => prop::sample::select(ODD).prop_map(str::to_string),
        1 => any::<String>().prop_map(|s| s.chars().take(6).collect::<String>()),
    ]
    .boxed()
}

fn line(words: &'static [&'static str], seps: &'static [&'static str]) -> BoxedStrategy<String> {
    (
        prop::sample::select(LEADS),
        prop::collection::vec((token(words), prop::sample::select(seps)), 0..6),
    )
        .prop_map(|(lead, parts)| {
            let mut s = lead.to_string();
            for (t, sep) in parts {
                s.push_str(&t);
                s.push_str(sep);
            }
            s
        })
        .boxed()
}

fn lines(words: &'static [&'static str], seps: &'static [&'static str]) -> BoxedStrategy<String> {
    prop::collection::vec((line(words, seps), prop::sample::select(EOLS)), 0..20)
        .prop_map(|ls| ls.into_iter().map(|(l, e)| l + e).collect())
        .boxed()
}

/// One change to a seed file.
#[derive(Debug, Clone)]
enum Edit {
    Byte(usize, u8),
    Insert(usize, String),
    Delete(usize, usize),
    DupLine(usize),
    DropLine(usize),
    SwapLines(usize, usize),
    /// Replace what follows a line's `: `, `= `, first blank or `- `.
    Value(usize, String),
    Indent(usize, i8),
    Truncate(usize),
    /// Give the `nth` `key: value` of a key (block or flow style) another
    /// value.
    Set(&'static str, usize, String),
}

fn edits(
    words: &'static [&'static str],
    seps: &'static [&'static str],
) -> BoxedStrategy<Vec<Edit>> {
    let text = prop_oneof![token(words), line(words, seps).prop_map(|l| l + "\n")];
    let edit = prop_oneof![
        2 => (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Byte(a, b)),
        3 => (any::<usize>(), text).prop_map(|(a, t)| Edit::Insert(a, t)),
        1 => (any::<usize>(), 0usize..64).prop_map(|(a, n)| Edit::Delete(a, n)),
        1 => any::<usize>().prop_map(Edit::DupLine),
        2 => any::<usize>().prop_map(Edit::DropLine),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        4 => (any::<usize>(), token(words)).prop_map(|(a, t)| Edit::Value(a, t)),
        1 => (any::<usize>(), -4i8..5).prop_map(|(a, d)| Edit::Indent(a, d)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        4 => (prop::sample::select(words), any::<usize>(), token(words))
            .prop_map(|(k, n, v)| Edit::Set(k, n, v)),
    ];
    prop::collection::vec(edit, 1..8).boxed()
}

fn split_lines(b: &[u8]) -> Vec<Vec<u8>> {
    b.split(|c| *c == b'\n').map(<[u8]>::to_vec).collect()
}

fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match e {
            Edit::Byte(i, v) => {
                if !b.is_empty() {
                    let n = b.len();
                    b[i % n] = *v;
                }
            }
            Edit::Insert(i, t) => {
                let p = at(*i, b.len());
                b.splice(p..p, t.bytes());
            }
            Edit::Delete(i, n) => {
                let p = at(*i, b.len());
                let end = (p + n).min(b.len());
                b.drain(p..end);
            }
            Edit::Truncate(i) => {
                let p = at(*i, b.len());
                b.truncate(p);
            }
            Edit::Set(key, nth, value) => {
                let needle = format!("{key}: ");
                let n = needle.len();
                let starts: Vec<usize> = (0..b.len().saturating_sub(n))
                    .filter(|&i| b[i..i + n] == *needle.as_bytes())
                    .filter(|&i| i == 0 || b" \t{-".contains(&b[i - 1]))
                    .collect();
                if !starts.is_empty() {
                    let from = starts[nth % starts.len()] + n;
                    let to = b[from..]
                        .iter()
                        .position(|c| b",}\n#".contains(c))
                        .map_or(b.len(), |p| from + p);
                    b.splice(from..to, value.bytes());
                }
            }
            Edit::DupLine(i)
            | Edit::DropLine(i)
            | Edit::SwapLines(i, _)
            | Edit::Value(i, _)
            | Edit::Indent(i, _) => {
                let mut ls = split_lines(&b);
                let n = ls.len();
                let k = i % n;
                match e {
                    Edit::DupLine(_) => {
                        let l = ls[k].clone();
                        ls.insert(k, l);
                    }
                    Edit::DropLine(_) => {
                        ls.remove(k);
                    }
                    Edit::SwapLines(_, j) => ls.swap(k, j % n),
                    Edit::Value(_, v) => {
                        let l = &ls[k];
                        let cut = [&b": "[..], b"= ", b"- ", b" ", b"\t"]
                            .iter()
                            .find_map(|sep| {
                                l.windows(sep.len())
                                    .position(|w| w == *sep)
                                    .map(|p| p + sep.len())
                            })
                            .unwrap_or(l.len());
                        let mut nl = l[..cut].to_vec();
                        if cut == l.len() {
                            nl.extend_from_slice(b": ");
                        }
                        nl.extend_from_slice(v.as_bytes());
                        ls[k] = nl;
                    }
                    Edit::Indent(_, d) => {
                        let l = &mut ls[k];
                        if *d >= 0 {
                            l.splice(0..0, std::iter::repeat_n(b' ', *d as usize));
                        } else {
                            let strip = l
                                .iter()
                                .take(d.unsigned_abs() as usize)
                                .take_while(|c| **c == b' ')
                                .count();
                            l.drain(..strip);
                        }
                    }
                    _ => unreachable!("line edits only"),
                }
                b = ls.join(&b'\n');
            }
        }
    }
    b
}

/// Random bytes, lines of the format's words, or edited seeds.
fn text(
    words: &'static [&'static str],
    seps: &'static [&'static str],
    seeds: &'static [&'static str],
) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..1024),
        3 => lines(words, seps).prop_map(String::into_bytes),
        3 => (prop::sample::select(seeds), edits(words, seps))
            .prop_map(|(s, e)| mutate(s.as_bytes(), &e)),
    ]
    .boxed()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `s` for case-insensitive comparisons (ASCII, as the parsers fold).
fn folded(b: &[u8]) -> String {
    lossy(b).to_ascii_lowercase()
}

/// The first word after each `prefix` in `s`, folded.
fn words_after(s: &str, prefix: &str) -> Vec<String> {
    s.split(prefix)
        .skip(1)
        .filter_map(|r| r.split_whitespace().next())
        .map(str::to_ascii_lowercase)
        .collect()
}

// ---------------------------------------------------------------------------
// Scanning generated trees

fn catalog() -> &'static Catalog {
    static C: OnceLock<Catalog> = OnceLock::new();
    C.get_or_init(|| Catalog::load(&StageSource::Embedded).expect("the catalog loads"))
}

fn context(roles: &[&str]) -> ScanContext {
    ScanContext {
        distro: "debian".into(),
        codename: "bookworm".into(),
        version: "12".into(),
        pretty_name: "Debian GNU/Linux 12 (bookworm)".into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        roles_from: "command line".into(),
        profile: String::new(),
    }
}

fn kinds_of(c: &Check, out: &mut Vec<&'static str>) {
    match c {
        Check::Kind(name, _) => out.push(name),
        Check::All(cs) | Check::Any(cs) => cs.iter().for_each(|c| kinds_of(c, out)),
    }
}

/// (id, what it checks) of the controls with a check of one of `kinds`.
fn controls_of(kinds: &[&str]) -> Vec<(String, String)> {
    catalog()
        .controls()
        .filter(|(_, c)| {
            let mut k = Vec::new();
            kinds_of(&c.check, &mut k);
            k.iter().any(|k| kinds.contains(k))
        })
        .map(|(_, c)| (c.id.clone(), c.check.describe()))
        .collect()
}

type Files = Vec<(String, Vec<u8>)>;

fn write_tree(root: &Path, files: &[(String, Vec<u8>)]) {
    for (path, bytes) in files {
        let host = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(host.parent().expect("a parent")).expect("making a directory");
        std::fs::write(&host, bytes).expect("writing a file");
    }
}

type Results = HashMap<String, (Status, Vec<String>)>;

/// Scan a root tree of `files` (all controls when `ids` is empty).
fn scan_files(files: &[(String, Vec<u8>)], roles: &[&str], ids: &[String]) -> Results {
    let dir = tempfile::tempdir().expect("a temporary directory");
    write_tree(dir.path(), files);
    let t = Target::root(dir.path()).expect("the tree opens");
    let sel = Selection {
        ids: ids.to_vec(),
        ..Default::default()
    };
    let report = scan::run(catalog(), &t, &context(roles), &sel);
    report
        .results
        .into_iter()
        .map(|r| (r.id, (r.status, r.evidence)))
        .collect()
}

/// The controls one file decides, and how they stand when it is empty.
struct Scene {
    roles: &'static [&'static str],
    /// (id, what it checks).
    judged: Vec<(String, String)>,
    baseline: HashMap<String, Status>,
}

impl Scene {
    fn new(
        roles: &'static [&'static str],
        kinds: &[&str],
        baseline_files: Files,
        keep: impl Fn(&str) -> bool,
    ) -> Scene {
        let judged: Vec<(String, String)> = controls_of(kinds)
            .into_iter()
            .filter(|(_, what)| keep(what))
            .collect();
        assert!(!judged.is_empty(), "no control of {kinds:?}");
        let ids: Vec<String> = judged.iter().map(|(id, _)| id.clone()).collect();
        let baseline = scan_files(&baseline_files, roles, &ids)
            .into_iter()
            .map(|(id, (s, _))| (id, s))
            .collect();
        Scene {
            roles,
            judged,
            baseline,
        }
    }

    /// Scan the whole catalog over `files`: it completes, and a judged
    /// control that fails on the baseline passes only when `excused`
    /// (given what the control checks) finds its setting in the text.
    fn judge(
        &self,
        files: Files,
        excused: impl Fn(&str) -> bool,
    ) -> Result<Results, TestCaseError> {
        let roles = self.roles;
        let results = bounded(SCAN_LIMIT, move || scan_files(&files, roles, &[]))?;
        for (id, what) in &self.judged {
            let Some((status, evidence)) = results.get(id) else {
                return Err(fail(format!("{id}: no result")));
            };
            if *status == Status::Pass && self.baseline[id] != Status::Pass && !excused(what) {
                return Err(fail(format!(
                    "{id} ({what}) passes on text that does not set it: {evidence:?}"
                )));
            }
        }
        Ok(results)
    }
}

fn file(path: &str, bytes: impl Into<Vec<u8>>) -> (String, Vec<u8>) {
    (path.to_string(), bytes.into())
}

// ---------------------------------------------------------------------------
// sshd_config

const SSHD_CONFIG: &str = "/etc/ssh/sshd_config";

const SSHD_WORDS: &[&str] = &[
    "PermitRootLogin",
    "permitrootlogin",
    "X11Forwarding",
    "MaxAuthTries",
    "LogLevel",
    "IgnoreRhosts",
    "HostbasedAuthentication",
    "PermitEmptyPasswords",
    "PermitUserEnvironment",
    "ClientAliveInterval",
    "ClientAliveCountMax",
    "Ciphers",
    "MACs",
    "KexAlgorithms",
    "Banner",
    "UsePAM",
    "LoginGraceTime",
    "MaxSessions",
    "MaxStartups",
    "AllowTcpForwarding",
    "DisableForwarding",
    "PasswordAuthentication",
    "Include",
    "include",
    "Match",
    "User",
    "all",
    "sshd_config",
    "sshd_config.d/*.conf",
    "/etc/ssh/sshd_config",
    "/etc/ssh/*",
    "no",
    "yes",
    "prohibit-password",
    "without-password",
    "INFO",
    "VERBOSE",
    "3",
    "300",
    "aes256-ctr,aes128-ctr",
    "3des-cbc",
    "hmac-sha2-512",
    "hmac-md5",
    "/etc/issue.net",
    "none",
];

const SSHD_SEEDS: &[&str] = &[
    include_str!("../stages/50-sshd/files/hardening.conf"),
    "Include /etc/ssh/sshd_config.d/*.conf\n#PermitRootLogin prohibit-password\nKbdInteractiveAuthentication no\nUsePAM yes\nX11Forwarding yes\nPrintMotd no\nAcceptEnv LANG LC_*\nSubsystem\tsftp\t/usr/lib/openssh/sftp-server\nMatch User anoncvs\n\tPermitRootLogin yes\n",
];

#[test]
fn sshd_config() {
    let scene = Scene::new(&[], &["sshd"], vec![file(SSHD_CONFIG, "")], |_| true);
    property(
        "sshd_config",
        500,
        text(SSHD_WORDS, SEPARATORS, SSHD_SEEDS),
        |bytes| {
            let t = folded(&bytes);
            let parsed = stemforge::scan::kinds::sshd::parse_sshd_t(&lossy(&bytes));
            prop_assert!(parsed.keys().all(|k| !k.is_empty()));
            scene.judge(vec![file(SSHD_CONFIG, bytes)], |what| {
                words_after(what, "sshd ").iter().any(|k| t.contains(k))
            })?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// fstab

const FSTAB_WORDS: &[&str] = &[
    "UUID=0b5f0e9e-1d2c-4c6b-9f43-1d1c2a3b4c5d",
    "LABEL=root",
    "PARTUUID=1",
    "/dev/vda1",
    "tmpfs",
    "/",
    "/tmp",
    "/var",
    "/var/tmp",
    "/var/log",
    "/var/log/audit",
    "/home",
    "/dev/shm",
    "/boot/efi",
    "\\057tmp",
    "/var\\040log",
    "ext4",
    "vfat",
    "swap",
    "none",
    "defaults",
    "nodev",
    "nosuid",
    "noexec",
    "nodev,nosuid,noexec",
    "rw,nodev",
    "errors=remount-ro",
    "bind",
    "0",
    "1",
    "2",
];

const FSTAB_SEEDS: &[&str] = &[
    "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n",
    "UUID=0b5f / ext4 errors=remount-ro 0 1\nUUID=1 /boot/efi vfat umask=0077 0 1\nUUID=2 /var ext4 nodev 0 2\nUUID=3 /var/tmp ext4 nodev,nosuid,noexec 0 2\nUUID=4 /var/log ext4 nodev,nosuid,noexec 0 2\nUUID=5 /var/log/audit ext4 nodev,nosuid,noexec 0 2\nUUID=6 /home ext4 nodev,nosuid 0 2\ntmpfs /tmp tmpfs nodev,nosuid,noexec,size=1G 0 0\ntmpfs /dev/shm tmpfs nodev,nosuid,noexec 0 0\n",
];

#[test]
fn fstab() {
    let scene = Scene::new(&[], &["mount"], vec![file("/etc/fstab", "")], |_| true);
    property(
        "fstab",
        500,
        text(FSTAB_WORDS, SEPARATORS, FSTAB_SEEDS),
        |bytes| {
            let s = lossy(&bytes);
            let entries = stemforge::scan::kinds::mount::parse_fstab(&s);
            prop_assert!(
                entries
                    .iter()
                    .all(|e| e.line >= 1 && e.line <= s.lines().count())
            );
            let _ = stemforge::scan::kinds::mount::parse_mountinfo(&s);
            // The parser undoes \NNN escapes: so does the oracle.
            let t = stemforge::fsutil::unescape_octal(&s).to_ascii_lowercase();
            scene.judge(vec![file("/etc/fstab", bytes)], |what| {
                words_after(what, "mount ").iter().any(|p| t.contains(p))
            })?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// Audit rules

const AUDIT_WORDS: &[&str] = &[
    "-w",
    "-p",
    "-k",
    "-a",
    "-A",
    "-S",
    "-F",
    "-C",
    "-e",
    "-b",
    "-f",
    "-r",
    "-D",
    "-i",
    "-c",
    "--backlog_wait_time",
    "--reset-lost",
    "--loginuid-immutable",
    "always,exit",
    "exit,always",
    "never,task",
    "always",
    "exit",
    "wa",
    "rwxa",
    "x",
    "arch=b64",
    "arch=b32",
    "auid>=1000",
    "auid!=4294967295",
    "auid!=-1",
    "auid!=unset",
    "key=identity",
    "dir=/etc/",
    "perm=wa",
    "path=/usr/bin/su",
    "uid!=euid",
    "/etc/passwd",
    "/etc/shadow",
    "/etc/sudoers.d/",
    "/",
    "init_module",
    "delete_module",
    "adjtimex,settimeofday",
    "all",
    "identity",
    "2",
    "1",
    "0",
    "8192",
];

const AUDIT_SEEDS: &[&str] = &[
    include_str!("../stages/60-auditd/files/50-stemforge.rules"),
    include_str!("../stages/60-auditd/files/99-stemforge-finalize.rules"),
    include_str!("../stages/91-role-docker/files/60-stemforge-docker.rules"),
    "## First rule - delete all\n-D\n-b 8192\n--backlog_wait_time 60000\n-f 1\n",
];

const AUDIT_RULES: &str = "/etc/audit/rules.d/50-fuzz.rules";

#[test]
fn audit_rules() {
    let scene = Scene::new(&[], &["audit_rule"], vec![file(AUDIT_RULES, "")], |_| true);
    property(
        "audit_rules",
        500,
        text(AUDIT_WORDS, SEPARATORS, AUDIT_SEEDS),
        |bytes| {
            let s = lossy(&bytes);
            for l in s.lines() {
                let _ =
                    stemforge::scan::kinds::audit::parse_rule(l).map(|r| r.map(|r| r.to_string()));
            }
            let t = s.to_ascii_lowercase();
            let n = t.lines().count();
            scene.judge(vec![file(AUDIT_RULES, bytes)], |what| {
                (what.contains("audit rule") && (t.contains("-w") || t.contains("-a")))
                    || (what.contains("immutable") && t.contains("-e"))
                    || words_after(what, "at least ")
                        .iter()
                        .any(|k| k.parse::<usize>().is_ok_and(|k| n >= k))
            })?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// key = value files: auditd.conf, login.defs, pwquality.conf, ...

const KV_WORDS: &[&str] = &[
    "max_log_file",
    "max_log_file_action",
    "space_left_action",
    "admin_space_left_action",
    "disk_full_action",
    "disk_error_action",
    "num_logs",
    "log_group",
    "PASS_MAX_DAYS",
    "PASS_MIN_DAYS",
    "PASS_WARN_AGE",
    "UMASK",
    "ENCRYPT_METHOD",
    "INACTIVE",
    "minlen",
    "dcredit",
    "ucredit",
    "lcredit",
    "ocredit",
    "minclass",
    "maxrepeat",
    "dictcheck",
    "enforcing",
    "enforce_for_root",
    "difok",
    "Storage",
    "Compress",
    "ForwardToSyslog",
    "LLMNR",
    "MulticastDNS",
    "[Journal]",
    "[Resolve]",
    "persistent",
    "yes",
    "no",
    "keep_logs",
    "ROTATE",
    "email",
    "halt",
    "SYSLOG",
    "SINGLE",
    "0",
    "-1",
    "1",
    "14",
    "60",
    "365",
    "027",
    "077",
    "SHA512",
    "YESCRYPT",
    "#",
    " # note",
];

const KV_SEEDS: &[&str] = &[
    include_str!("../stages/60-auditd/files/auditd.conf"),
    include_str!("../stages/80-accounts/files/pwquality.conf"),
    include_str!("../stages/90-system/files/journald.conf"),
    include_str!("../stages/45-firewall/files/resolved.conf"),
    "MAIL_DIR /var/mail\nPASS_MAX_DAYS\t60\nPASS_MIN_DAYS\t1\nPASS_WARN_AGE\t7\nUMASK\t\t077\nENCRYPT_METHOD YESCRYPT\n",
    "GROUP=100\nHOME=/home\nINACTIVE=35\nSHELL=/bin/sh\n",
];

const KV_FILES: &[&str] = &[
    "/etc/audit/auditd.conf",
    "/etc/login.defs",
    "/etc/security/pwquality.conf",
    "/etc/default/useradd",
    "/etc/systemd/journald.conf.d/60-stemforge.conf",
    "/etc/systemd/resolved.conf.d/60-stemforge.conf",
];

#[test]
fn key_value_files() {
    let scenes: Vec<Scene> = KV_FILES
        .iter()
        .map(|path| {
            Scene::new(&[], &["kv"], vec![file(path, "")], |what| {
                what.contains(path)
            })
        })
        .collect();
    property(
        "key_value_files",
        500,
        (0..KV_FILES.len(), text(KV_WORDS, SEPARATORS, KV_SEEDS)),
        |(which, bytes)| {
            let parsed = stemforge::scan::kinds::kv::parse_kv(&lossy(&bytes));
            prop_assert!(parsed.windows(2).all(|w| w[0].0 < w[1].0));
            let t = folded(&bytes);
            scenes[which].judge(vec![file(KV_FILES[which], bytes)], |what| {
                // `PATH KEY EXPECTATION`: the key is the second word.
                what.split_whitespace()
                    .nth(1)
                    .is_some_and(|k| t.contains(&k.to_ascii_lowercase()))
            })?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// PAM

const PAM_SERVICES: &[&str] = &[
    "passwd",
    "su",
    "login",
    "common-auth",
    "common-account",
    "common-password",
    "common-session",
];

const PAM_WORDS: &[&str] = &[
    "auth",
    "account",
    "password",
    "session",
    "-session",
    "required",
    "requisite",
    "sufficient",
    "optional",
    "[success=1 default=ignore]",
    "[default=die",
    "include",
    "substack",
    "@include",
    "pam_unix.so",
    "pam_pwquality.so",
    "pam_pwhistory.so",
    "pam_wheel.so",
    "pam_securetty.so",
    "pam_deny.so",
    "/lib/x86_64-linux-gnu/security/pam_unix.so",
    "use_uid",
    "group=root",
    "remember=24",
    "remember=",
    "enforce_for_root",
    "use_authtok",
    "retry=3",
    "passwd",
    "su",
    "login",
    "common-auth",
    "common-password",
    "common-account",
    "common-session",
    "../su",
    ".hidden",
];

const PAM_SEEDS: &[&str] = &[
    "password\trequisite\t\t\tpam_pwquality.so retry=3\npassword\trequired\t\t\tpam_pwhistory.so remember=24 use_authtok enforce_for_root\npassword\t[success=1 default=ignore]\tpam_unix.so obscure use_authtok try_first_pass yescrypt\npassword\trequisite\t\t\tpam_deny.so\npassword\trequired\t\t\tpam_permit.so\n",
    "@include common-password\n",
    "auth       sufficient pam_rootok.so\nauth       required   pam_wheel.so \\\n  use_uid group=root\n@include common-auth\n",
    "auth [success=1 default=ignore] pam_unix.so nullok\nauth requisite pam_deny.so\n",
];

#[test]
fn pam() {
    let empty: Files = PAM_SERVICES
        .iter()
        .map(|s| file(&format!("/etc/pam.d/{s}"), ""))
        .collect();
    let scene = Scene::new(&[], &["pam"], empty.clone(), |_| true);
    property(
        "pam",
        500,
        (
            0..PAM_SERVICES.len(),
            text(PAM_WORDS, SEPARATORS, PAM_SEEDS),
        ),
        |(which, bytes)| {
            let t = folded(&bytes);
            let mut files = empty.clone();
            files[which].1 = bytes;
            scene.judge(files, |what| {
                what.split(|c: char| c.is_whitespace() || c == ',')
                    .filter(|w| w.ends_with(".so"))
                    .any(|m| t.contains(&m.to_ascii_lowercase()))
            })?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// passwd, shadow, group

/// Account databases that fail every account control they can: a second
/// uid 0, root in gid 1, a system account with a shell, a NIS entry, a
/// user whose group (4242) is missing, members where there may be none,
/// an empty password and a hash.
const BAD_PASSWD: &str = "root:x:0:1:root:/root:/bin/bash\ntoor:x:0:0::/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/sh\n+::::::\nvcap:x:1000:4242::/home/vcap:/bin/bash\nbob:x:1001:27::/home/bob:/bin/bash\n";
const BAD_SHADOW: &str = "root::19000:0:99999:7:::\ntoor:$6$salt$hash:19000:0:99999:7:::\n";
const BAD_GROUP: &str =
    "root:x:0:\nsudo:x:27:alice\nshadow:x:42:eve\ndocker:x:999:mallory\ndaemon:x:1:\n";

const ACCOUNT_WORDS: &[&str] = &[
    "root",
    "toor",
    "daemon",
    "vcap",
    "bob",
    "alice",
    "eve",
    "sudo",
    "shadow",
    "docker",
    "x",
    "*",
    "!",
    "!!",
    "",
    "0",
    "1",
    "27",
    "42",
    "999",
    "1000",
    "65534",
    "/root",
    "/home/vcap",
    "/bin/bash",
    "/usr/sbin/nologin",
    "/bin/false",
    "+",
    "-",
    "+@netgroup",
    "$6$salt$hash",
];

const ACCOUNT_SEPARATORS: &[&str] = &[":", ":", ":", ",", "", " "];

#[test]
fn account_databases() {
    let base = vec![
        file("/etc/passwd", BAD_PASSWD),
        file("/etc/shadow", BAD_SHADOW),
        file("/etc/group", BAD_GROUP),
    ];
    let scene = Scene::new(&[], &["accounts"], base, |_| true);
    let appended = || {
        prop::collection::vec(line(ACCOUNT_WORDS, ACCOUNT_SEPARATORS), 0..6).prop_map(|ls| {
            ls.into_iter()
                .map(|l| l.replace(['\n', '\r'], "") + "\n")
                .collect::<String>()
        })
    };
    property(
        "account_databases",
        500,
        (appended(), appended(), appended()),
        |(passwd, shadow, group)| {
            let u = stemforge::scan::users::Users::parse(
                &format!("{BAD_PASSWD}{passwd}"),
                &format!("{BAD_GROUP}{group}"),
            );
            let _ = u.subordinate(&passwd);
            // Lines after the first of a name change nothing the system
            // reads: first entries win, as in glibc's files database.
            prop_assert_eq!(&u.groups["sudo"], &(27, vec!["alice".to_string()]));
            let appended = format!("{passwd}{shadow}{group}");
            scene.judge(
                vec![
                    file("/etc/passwd", format!("{BAD_PASSWD}{passwd}")),
                    file("/etc/shadow", format!("{BAD_SHADOW}{shadow}")),
                    file("/etc/group", format!("{BAD_GROUP}{group}")),
                ],
                // Only a group with vcap's gid can repair a failure.
                |what| what.contains("every primary group exists") && appended.contains("4242"),
            )?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// dpkg status, apt indexes and copyright files (scanner and SBOM)

const DPKG_WORDS: &[&str] = &[
    "Package:",
    "Status:",
    "Version:",
    "Architecture:",
    "Source:",
    "Description:",
    "Homepage:",
    "Maintainer:",
    "Installed-Size:",
    "Multi-Arch:",
    "SHA256:",
    "Format:",
    "Files:",
    "License:",
    "Copyright:",
    " .",
    " ",
    "install ok installed",
    "deinstall ok config-files",
    "hold ok half-configured",
    "installed",
    "unpacked",
    "openssh-server",
    "auditd",
    "telnet",
    "xserver-xorg-core",
    "nis",
    "rsh-server",
    "apparmor",
    "1:9.2p1-2+deb12u3",
    "1:7.3p1-1",
    "0.17+2.4-2",
    "amd64",
    "all",
    "foo (1.0)",
    "(",
    "GPL-2+",
    "GPL-2+ or Artistic",
    "MIT and BSD-3-clause",
    "Apache-2.0 with LLVM exception",
    ", and",
    "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "../../etc",
];

const DPKG_SEEDS: &[&str] = &[
    "Package: auditd\nStatus: install ok installed\nPriority: optional\nArchitecture: amd64\nVersion: 1:3.0.9-1\nDescription: User space tools for security auditing\n The audit package contains the user space utilities.\n\nPackage: telnet\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 0.17+2.4-2\n\nPackage: openssh-server\nStatus: install ok installed\nArchitecture: amd64\nSource: openssh (1:9.2p1-2)\nVersion: 1:9.2p1-2+deb12u3\nHomepage: https://www.openssh.com/\nMaintainer: Debian OpenSSH Maintainers <debian-ssh@lists.debian.org>\n",
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: x\n\nFiles: *\nCopyright: 2020 Someone\nLicense: GPL-2+ or Artistic\n\nFiles: debian/*\nLicense: MIT and BSD-3-clause, or Apache-2.0\n\nLicense: GPL-2+\n text\n .\n more\n",
    "Package: auditd\nVersion: 1:3.0.9-1\nArchitecture: amd64\nSHA256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\n",
];

fn sbom_meta() -> stemforge::formats::sbom::SbomMeta {
    stemforge::formats::sbom::SbomMeta {
        name: "fuzz".into(),
        version: "1".into(),
        distro: "debian".into(),
        distro_version: "12".into(),
        codename: "bookworm".into(),
        created: chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("a time"),
        tool_version: stemforge::VERSION.into(),
        namespace_seed: "seed".into(),
    }
}

/// The SBOM reader over a tree whose dpkg status, apt index and a
/// copyright file hold `status`, `index` and `copyright`: an error or
/// packages whose SBOM documents are valid JSON.
fn sbom_of(status: Vec<u8>, index: Vec<u8>, copyright: Vec<u8>) -> Result<(), String> {
    use stemforge::formats::sbom;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = dir.path().join("root");
    let lists = dir.path().join("lists");
    write_tree(
        &root,
        &[
            file("/var/lib/dpkg/status", status),
            file("/usr/share/doc/auditd/copyright", copyright),
        ],
    );
    write_tree(
        &lists,
        &[file(
            "/deb_dists_bookworm_main_binary-amd64_Packages",
            index,
        )],
    );
    let Ok(pkgs) = sbom::read_packages(&root, Some(&lists)) else {
        return Ok(());
    };
    let meta = sbom_meta();
    for doc in [
        sbom::spdx_json(&pkgs, &meta),
        sbom::cyclonedx_json(&pkgs, &meta),
    ] {
        let doc = doc.map_err(|e| format!("{e:#}"))?;
        serde_json::from_slice::<serde_json::Value>(&doc).map_err(|e| e.to_string())?;
    }
    let txt = sbom::packages_txt(&pkgs);
    if txt.lines().count() < pkgs.len() {
        return Err(format!(
            "packages.txt lists fewer than {} packages",
            pkgs.len()
        ));
    }
    Ok(())
}

#[test]
fn dpkg_status_and_sbom() {
    let scene = Scene::new(
        &[],
        &["package"],
        vec![file("/var/lib/dpkg/status", "")],
        |_| true,
    );
    let t = || text(DPKG_WORDS, SEPARATORS, DPKG_SEEDS);
    property(
        "dpkg_status_and_sbom",
        400,
        (t(), t(), t()),
        |(status, index, copyright)| {
            let s = lossy(&status);
            let installed = stemforge::scan::kinds::package::installed(&s);
            prop_assert!(installed.iter().all(|n| s.contains(n.as_str())));
            let _ = stemforge::formats::sbom::copyright_licenses(&lossy(&copyright));
            let folded = s.to_ascii_lowercase();
            scene.judge(vec![file("/var/lib/dpkg/status", status.clone())], |what| {
                what.split(|c: char| c.is_whitespace() || ",;:".contains(c))
                    .filter(|w| w.len() >= 3)
                    .filter(|w| !["packages", "present", "absent"].contains(w))
                    .any(|w| folded.contains(&w.to_ascii_lowercase()))
            })?;
            bounded(SCAN_LIMIT, move || sbom_of(status, index, copyright))?.map_err(fail)?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// sysctl.d

const SYSCTL_WORDS: &[&str] = &[
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.*.rp_filter",
    "net/ipv4/conf/all/accept_redirects",
    "net.ipv4.conf.default.accept_source_route",
    "net.ipv6.conf.all.accept_ra",
    "kernel.randomize_va_space",
    "kernel.kptr_restrict",
    "kernel.dmesg_restrict",
    "kernel.yama.ptrace_scope",
    "fs.suid_dumpable",
    "fs.protected_hardlinks",
    "-net.ipv4.tcp_syncookies",
    "kernel.*",
    "*",
    "[a-",
    "=",
    ";",
    "0",
    "1",
    "2",
];

const SYSCTL_SEEDS: &[&str] = &[
    "net.ipv4.conf.default.rp_filter = 2\nnet.ipv4.conf.*.rp_filter = 2\n-net.ipv4.conf.all.accept_source_route = 0\nkernel.randomize_va_space = 2\nfs.suid_dumpable = 0\n",
];

#[test]
fn sysctl_d() {
    let path = "/etc/sysctl.d/99-fuzz.conf";
    let scene = Scene::new(&[], &["sysctl"], vec![file(path, "")], |_| true);
    property(
        "sysctl_d",
        400,
        text(SYSCTL_WORDS, SEPARATORS, SYSCTL_SEEDS),
        |bytes| {
            let t = folded(&bytes).replace('/', ".");
            scene.judge(vec![file(path, bytes)], |what| {
                // A glob in a key may set any parameter.
                t.contains(['*', '?', '['])
                    || words_after(what, "sysctl ")
                        .iter()
                        .filter_map(|k| k.rsplit('.').next().map(str::to_string))
                        .any(|last| t.contains(&last))
            })?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// PostgreSQL: postgresql.conf and pg_hba.conf

const PG_CONF: &str = "/etc/postgresql/15/main/postgresql.conf";
const PG_HBA: &str = "/etc/postgresql/15/main/pg_hba.conf";

const PG_WORDS: &[&str] = &[
    "ssl",
    "password_encryption",
    "log_connections",
    "log_disconnections",
    "log_line_prefix",
    "logging_collector",
    "log_file_mode",
    "client_min_messages",
    "shared_preload_libraries",
    "pgaudit.log",
    "pgaudit.log_level",
    "data_directory",
    "hba_file",
    "include",
    "include_if_exists",
    "include_dir",
    "'conf.d'",
    "'/var/lib/postgresql/15/main'",
    "'/etc/postgresql/15/main/pg_hba.conf'",
    "'postgresql.conf'",
    "on",
    "off",
    "scram-sha-256",
    "md5",
    "'pgaudit'",
    "'%m [%p] %q%u@%d '",
    "'it''s'",
    "'\\'",
    "local",
    "host",
    "hostssl",
    "hostnossl",
    "all",
    "postgres",
    "peer",
    "trust",
    "cert",
    "0.0.0.0/0",
    "127.0.0.1",
    "255.0.0.0",
    "::1/128",
    "clientcert=verify-full",
];

const PG_SEEDS: &[&str] = &[
    include_str!("../stages/92-role-postgres/files/pg_hba.conf"),
    include_str!("../stages/92-role-postgres/files/50-stemforge.conf"),
    "data_directory = '/var/lib/postgresql/15/main'\nhba_file = '/etc/postgresql/15/main/pg_hba.conf'\nssl = on\ninclude_dir = 'conf.d'\n",
];

#[test]
fn postgresql() {
    let scene = Scene::new(
        &["postgres"],
        &["pg_setting", "pg_hba"],
        vec![file(PG_CONF, ""), file(PG_HBA, "")],
        |_| true,
    );
    property(
        "postgresql",
        400,
        (any::<bool>(), text(PG_WORDS, SEPARATORS, PG_SEEDS)),
        |(conf, bytes)| {
            let s = lossy(&bytes);
            if let Ok(ds) = stemforge::scan::kinds::pg::parse_conf(&s) {
                prop_assert!(ds.iter().all(|(n, _)| *n >= 1));
            }
            let _ = stemforge::scan::kinds::pghba::parse_hba(&s);
            let t = s.to_ascii_lowercase();
            let files = if conf {
                vec![file(PG_CONF, bytes), file(PG_HBA, "")]
            } else {
                vec![file(PG_CONF, ""), file(PG_HBA, bytes)]
            };
            scene.judge(files, |what| {
                let settings = what
                    .strip_prefix("postgresql: ")
                    .map(|r| r.split(", ").filter_map(|p| p.split_whitespace().next()))
                    .into_iter()
                    .flatten()
                    .any(|k| t.contains(&k.to_ascii_lowercase()));
                settings || (what.starts_with("pg_hba.conf") && t.contains("peer"))
            })?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// JSON and YAML documents (daemon.json, the kubelet's configuration)

const DAEMON_JSON: &str = "/etc/docker/daemon.json";
const KUBELET_YAML: &str = "/var/lib/kubelet/config.yaml";

const DOC_KEYS: &[&str] = &[
    "icc",
    "userns-remap",
    "no-new-privileges",
    "live-restore",
    "userland-proxy",
    "log-driver",
    "log-opts",
    "tag",
    "default-ulimits",
    "nofile",
    "nproc",
    "Hard",
    "insecure-registries",
    "hosts",
    "iptables",
    "authentication",
    "anonymous",
    "enabled",
    "webhook",
    "authorization",
    "mode",
    "readOnlyPort",
    "tlsCipherSuites",
    "protectKernelDefaults",
    "0",
    "1",
    "",
];

const DOC_WORDS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"icc\"",
    "\"log-opts\"",
    "true",
    "false",
    "null",
    "0",
    "-0",
    "1e400",
    "\"{{.Name}}\"",
    "journald",
    "Webhook",
    "TLS_AES_128_GCM_SHA256",
    "---",
    "...",
    "&a",
    "*a",
    "<<: *a",
    "!!str",
    "!!binary",
    "? ",
    "- ",
    "|",
    ">",
];

const DOC_SEEDS: &[&str] = &[
    include_str!("../stages/91-role-docker/files/daemon.json"),
    include_str!("../stages/93-role-k8s-node/files/config.yaml"),
];

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(DOC_KEYS).prop_map(Value::from),
        ".{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(DOC_KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

fn document() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        2 => text(DOC_WORDS, SEPARATORS, DOC_SEEDS),
        2 => (json_value(), any::<bool>(), edits(DOC_WORDS, SEPARATORS)).prop_map(|(v, yaml, e)| {
            let s = if yaml {
                serde_yaml::to_string(&v).unwrap_or_default()
            } else {
                serde_json::to_string_pretty(&v).unwrap_or_default()
            };
            if e.len() > 4 { mutate(s.as_bytes(), &e) } else { s.into_bytes() }
        }),
    ]
    .boxed()
}

#[test]
fn json_and_yaml_documents() {
    use stemforge::scan::keypath;
    let scene = Scene::new(
        &["docker", "k8s-node"],
        &["json", "yaml"],
        vec![file(DAEMON_JSON, "{}"), file(KUBELET_YAML, "{}")],
        |_| true,
    );
    property(
        "json_and_yaml_documents",
        500,
        (
            any::<bool>(),
            document(),
            json_value(),
            prop::collection::vec(prop::sample::select(DOC_KEYS), 0..5),
        ),
        |(yaml, bytes, value, path)| {
            let path = path.join(".");
            if let Some(v) = keypath::lookup(&value, &path) {
                let _ = keypath::render(v);
            }
            let s = lossy(&bytes);
            let (target, parsed) = if yaml {
                (KUBELET_YAML, stemforge::scan::kinds::yaml::parse(&s))
            } else {
                (DAEMON_JSON, stemforge::scan::kinds::json::parse(&s))
            };
            let files = vec![
                file(
                    DAEMON_JSON,
                    if yaml { b"{}".to_vec() } else { bytes.clone() },
                ),
                file(KUBELET_YAML, if yaml { bytes } else { b"{}".to_vec() }),
            ];
            let results = scene.judge(files, |what| {
                // A key can only be set in a document that parses, by a
                // top-level key the document has.
                let Ok(doc) = &parsed else { return false };
                what.strip_prefix(target)
                    .and_then(|r| r.strip_prefix(": "))
                    .map(|r| r.split(", ").filter_map(|p| p.split_whitespace().next()))
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k.split('.').next())
                    .any(|top| doc.get(top).is_some())
            })?;
            if parsed.is_err() {
                for (id, what) in &scene.judged {
                    if what.starts_with(target) && !what.contains("absent") {
                        prop_assert_ne!(
                            results[id].0,
                            Status::Pass,
                            "{} on an unparsable {}",
                            id,
                            target
                        );
                    }
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// Waivers

const WAIVER_WORDS: &[&str] = &[
    "waivers:",
    "- control:",
    "control:",
    "reason:",
    "approver:",
    "expires:",
    "profiles:",
    "roles:",
    "sshd-idle-timeout",
    "sshd-root-login",
    "no-such-control",
    "ISSM",
    "vendor agent",
    "2027-01-31",
    "1999-12-31",
    "9999-12-31",
    "2027-02-30",
    "+262143-12-31",
    "0000-01-01",
    "someday",
    "[debian-bookworm]",
    "[docker]",
    "[]",
    "~",
    "''",
];

const WAIVER_SEEDS: &[&str] = &[
    "waivers:\n  - control: sshd-idle-timeout\n    reason: vendor agent needs long sessions\n    approver: ISSM\n    expires: 2027-01-31\n    profiles: [debian-bookworm]\n  - control: sshd-root-login\n    reason: r\n    approver: a\n    expires: 1999-12-31\n    roles: [docker]\n",
];

#[test]
fn waivers() {
    use stemforge::scan::waiver;
    let report = {
        let t = tempfile::tempdir().expect("a temporary directory");
        let target = Target::root(t.path()).expect("the tree opens");
        scan::run(catalog(), &target, &context(&[]), &Selection::default())
    };
    let ids: Vec<&'static str> = catalog()
        .controls()
        .map(|(_, c)| &*c.id.clone().leak())
        .collect();
    let ids: &'static [&'static str] = ids.leak();
    let entry = (
        prop::sample::select(ids),
        token(WAIVER_WORDS),
        token(WAIVER_WORDS),
        prop::sample::select(WAIVER_WORDS),
    )
        .prop_map(|(c, r, a, e)| {
            format!("  - control: {c}\n    reason: {r}\n    approver: {a}\n    expires: {e}\n")
        });
    let strategy = prop_oneof![
        text(WAIVER_WORDS, SEPARATORS, WAIVER_SEEDS),
        (
            prop::collection::vec(entry, 0..4),
            edits(WAIVER_WORDS, SEPARATORS),
            any::<bool>()
        )
            .prop_map(|(es, e, edit)| {
                let s = format!("waivers:\n{}", es.concat());
                if edit {
                    mutate(s.as_bytes(), &e)
                } else {
                    s.into_bytes()
                }
            }),
    ];
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("waivers.yml");
    property("waivers", 800, strategy, |bytes| {
        std::fs::write(&path, &bytes).expect("writing the waiver file");
        let p = path.clone();
        let loaded = bounded(SCAN_LIMIT, move || waiver::load(&p, catalog()))?;
        let ws = match loaded {
            Ok(ws) => ws,
            Err(e) => {
                prop_assert_eq!(&e.file, &path);
                prop_assert!(e.to_string().starts_with(&path.display().to_string()));
                return Ok(());
            }
        };
        let mut r = report.clone();
        let today = chrono::NaiveDate::from_ymd_opt(2026, 6, 1).expect("a date");
        waiver::apply(&mut r, &ws, "debian-bookworm", today);
        for (before, after) in report.results.iter().zip(&r.results) {
            prop_assert!(
                before.status == after.status
                    || (matches!(before.status, Status::Fail | Status::Error)
                        && after.status == Status::Waived),
                "{}: {:?} became {:?}",
                before.id,
                before.status,
                after.status
            );
        }
        prop_assert_eq!(r.summary, scan::summarize(&r.results));
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// Profiles and stages (YAML)

const YAML_WORDS: &[&str] = &[
    // Profile keys.
    "extends",
    "name",
    "description",
    "os",
    "distro",
    "codename",
    "version",
    "bootstrap",
    "mirror",
    "suites",
    "suite_mirrors",
    "components",
    "keyring",
    "variant",
    "kernel",
    "packages",
    "disk",
    "size",
    "partitions",
    "mount",
    "fs",
    "options",
    "label",
    "mounts",
    "bind",
    "boot",
    "cmdline",
    "timeout",
    "bios",
    "secure_boot",
    "roles",
    "role_inputs",
    "formats",
    // Stage keys.
    "summary",
    "when",
    "install",
    "install_on",
    "purge",
    "files",
    "path",
    "source",
    "content",
    "permissions",
    "owner",
    "group",
    "sysctl",
    "services",
    "enable",
    "disable",
    "mask",
    "kernel_modules",
    "supersedes",
    "control",
    "reason",
    "script",
    "controls",
    "id",
    "title",
    "severity",
    "refs",
    "faq",
    "stig",
    "cis",
    "rationale",
    "fix",
    "check",
    "break",
    "target",
    "needs",
    "scope",
    "file",
    "sshd",
    "kv",
    "all",
    "any",
    "pam",
    "accounts",
    "json",
    "yaml",
    "audit_rule",
    "write",
    "append",
    "replace",
    "chmod",
    "chown",
    "remove",
    "symlink",
    "mkdir",
    "pattern",
    "with",
    "equals",
    "one_of",
    "min",
    "max",
    "subset_of",
    "contains",
    "matches",
    "absent",
    "key",
    "value",
    "keys",
    // Values.
    "~",
    "null",
    "[]",
    "{}",
    "''",
    "\"\"",
    "0",
    "-1",
    "1",
    "0x10",
    "true",
    "false",
    "yes",
    "18446744073709551615",
    "18446744073709551616",
    "16777215TiB",
    "17179869183GiB",
    "1e999",
    "512MiB",
    "64MiB",
    "5GiB",
    "1K",
    "*a",
    "&a x",
    "!!binary AAAA",
    "<<: *a",
    "|",
    ">",
    "? x",
    "- x",
    "[a, [b, {c: d}]]",
    "{a: 1, a: 2}",
    "'unterminated",
    "\"\\u0000\"",
    "%",
    "@",
    "`",
    "--- ",
    "...",
    "ext4",
    "vfat",
    "/",
    "/boot/efi",
    "/tmp",
    "//x",
    "/a/../b",
    "nodev",
    "x=y",
    "size=",
    "defaults",
    "debian",
    "ubuntu",
    "bookworm",
    "noble",
    "http://x",
    "https://deb.debian.org/debian",
    "/usr/share/keyrings/x.gpg",
    "minbase",
    "raw",
    "qcow2",
    "stemcells",
    "debian-bookworm",
    "ubuntu-noble",
    "docker",
    "high",
    "medium",
    "low",
    "offline",
    "live",
    "image",
    "0644",
    "0999",
    "root",
    "(",
    "[a-",
    "(?m)^",
    "(a*)*$",
    "a{1000}{1000}",
    "\\p{Foo}",
    "UBTU-22-255040",
    "4.2.1",
    "ubuntu2204-v2.0.0:5.2.10",
    "apply.sh",
    "hardening.conf",
];

const PROFILE_KEYS: &[&str] = &[
    "extends",
    "name",
    "os",
    "distro",
    "codename",
    "version",
    "mirror",
    "suites",
    "bookworm-security",
    "components",
    "keyring",
    "variant",
    "dpkg_path_exclude",
    "kernel",
    "size",
    "mount",
    "fs",
    "options",
    "label",
    "bind",
    "cmdline",
    "timeout",
    "bios",
    "secure_boot",
    "roles",
    "formats",
];

const STAGE_KEYS: &[&str] = &[
    "name",
    "summary",
    "roles",
    "os",
    "version",
    "target",
    "needs",
    "install",
    "purge",
    "path",
    "source",
    "content",
    "mode",
    "owner",
    "group",
    "enable",
    "disable",
    "mask",
    "control",
    "reason",
    "script",
    "id",
    "title",
    "severity",
    "faq",
    "stig",
    "cis",
    "check",
    "path",
    "key",
    "value",
    "pattern",
    "with",
    "min",
    "max",
    "matches",
    "one_of",
    "contains",
    "subset_of",
    "absent",
    "separate",
    "options",
    "service",
    "type",
    "module",
    "rule",
    "min_count",
    "immutable",
    "keys",
    "PermitRootLogin",
    "text",
];

fn leaked(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// The YAML files of a directory tree: (path relative to it, text).
fn yaml_files(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("reading a directory") {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "yml") {
                let text = std::fs::read_to_string(&p).expect("reading a YAML file");
                out.push((
                    p.strip_prefix(dir).expect("inside").to_path_buf(),
                    leaked(text),
                ));
            }
        }
    }
    out.sort();
    out
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("making a directory");
    for e in std::fs::read_dir(from).expect("reading a directory") {
        let e = e.expect("a directory entry");
        let p = e.path();
        if p.is_dir() {
            copy_tree(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copying a file");
        }
    }
}

/// A real file, edited, or bytes in its place.
/// Values a key of a profile or stage is given: sizes at the edges of
/// u64 and of their units, paths, names and options that are nearly
/// right.
const YAML_VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "15MiB",
    "16MiB",
    "64MiB",
    "5GiB",
    "1.5GiB",
    "5gib",
    "5GB",
    " 5 GiB",
    "0x10",
    "18446744073709551615",
    "18446744073709551616",
    "18446744073709551615B",
    "17592186044415MiB",
    "17592186044416MiB",
    "16777215TiB",
    "16777216TiB",
    "9223372036854775807",
    "~",
    "[]",
    "{}",
    "''",
    "/",
    "/boot/efi",
    "/var",
    "/var/",
    "//var",
    "/var/../etc",
    "var",
    "/a b",
    "ext4",
    "vfat",
    "tmpfs",
    "btrfs",
    "[nodev, nosuid]",
    "[nosiud]",
    "[size=]",
    "[umask=0077]",
    "root",
    "ESP",
    "audit",
    "twelve-chars",
    "debian",
    "ubuntu",
    "bookworm",
    "noble",
    "[bookworm]",
    "[]",
    "http://deb.debian.org/debian",
    "ftp://x",
    "/usr/share/keyrings/debian-archive-keyring.gpg",
    "keyring.gpg",
    "minbase",
    "tiny",
    "[all]",
    "[raw, qcow2]",
    "[nonsense]",
    "debian-bookworm",
    "debian-bookworm-docker",
    "missing",
    "../os-profiles/debian-bookworm",
    "[docker]",
    "[\"a b\"]",
    "true",
    "4294967296",
    "*a",
    "&a x",
    "!!binary AAAA",
    "0644",
    "0999",
    "high",
    "offline",
    "[/usr/local/bin/kubelet]",
    "'(a'",
];

const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "16MiB",
    "1TiB",
    "18446744073709551615",
    "18446744073709551616",
    "18446744073709551615B",
    "17592186044415MiB",
    "17592186044416MiB",
    "16777215TiB",
    "9223372036854775807",
    "4294967295",
    "4294967296",
    "0777777",
    "99999999999999999999",
];

fn yaml_case(
    n: usize,
    keys: &'static [&'static str],
) -> BoxedStrategy<(usize, Option<Vec<Edit>>, Vec<u8>)> {
    let set = (
        prop::sample::select(keys),
        any::<usize>(),
        prop::sample::select(YAML_VALUES),
    )
        .prop_map(|(k, n, v)| Edit::Set(k, n, v.to_string()));
    // Numbers a loader computes with: sizes, counts, modes.
    const KEYS: &[&str] = &["size", "timeout", "mode", "min", "max", "min_count"];
    let number = (
        prop::sample::select(KEYS),
        any::<usize>(),
        prop::sample::select(NUMBERS),
    )
        .prop_map(|(k, n, v)| Edit::Set(k, n, v.to_string()));
    let focused = prop::collection::vec(prop_oneof![2 => set, 1 => number], 1..4);
    prop_oneof![
        3 => (0..n, focused).prop_map(|(i, e)| (i, Some(e), Vec::new())),
        3 => (0..n, edits(YAML_WORDS, SEPARATORS)).prop_map(|(i, e)| (i, Some(e), Vec::new())),
        1 => (0..n, lines(YAML_WORDS, SEPARATORS)).prop_map(|(i, l)| (i, None, l.into_bytes())),
        1 => (0..n, prop::collection::vec(any::<u8>(), 0..512)).prop_map(|(i, b)| (i, None, b)),
    ]
    .boxed()
}

fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A configuration error names a file of the set being loaded, first.
fn names_a_file(e: &ConfigError, dir: &Path, embedded: &str) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    prop_assert!(
        e.file.starts_with(dir) || e.file.starts_with(embedded),
        "{shown}: names {} (not under {} or {embedded})",
        e.file.display(),
        dir.display()
    );
    prop_assert!(
        shown.starts_with(&e.file.display().to_string()),
        "{shown} does not start with its file"
    );
    prop_assert!(!e.message.is_empty(), "{shown}: an empty message");
    Ok(())
}

#[test]
fn profiles() {
    use stemforge::profile::{ProfileSource, load};
    let dir = tempfile::tempdir().expect("a temporary directory");
    let originals = yaml_files(&root_dir().join("os-profiles"));
    for (rel, text) in &originals {
        std::fs::write(dir.path().join(rel), text).expect("copying a profile");
    }
    let n = originals.len();
    property(
        "profiles",
        1500,
        yaml_case(n, PROFILE_KEYS),
        |(i, edits, bytes)| {
            let (rel, original) = &originals[i];
            let path = dir.path().join(rel);
            let bytes = match edits {
                Some(e) => mutate(original.as_bytes(), &e),
                None => bytes,
            };
            std::fs::write(&path, &bytes).expect("writing the profile");
            let (p, source) = (
                path.display().to_string(),
                ProfileSource::Dir(dir.path().to_path_buf()),
            );
            let loaded = bounded(SCAN_LIMIT, move || load(&p, &source))?;
            std::fs::write(&path, original).expect("restoring the profile");
            match loaded {
                Ok(p) => {
                    let parts: u64 = p.disk.partitions.iter().map(|x| x.size).sum();
                    prop_assert!(p.disk.size >= parts, "a disk smaller than its partitions");
                }
                Err(e) => names_a_file(&e, dir.path(), "os-profiles")?,
            }
            Ok(())
        },
    );
}

/// A small tree for scanning with a fuzzed catalog.
fn small_tree() -> Files {
    vec![
        file("/etc/ssh/sshd_config", SSHD_SEEDS[0]),
        file("/etc/fstab", FSTAB_SEEDS[1]),
        file("/etc/passwd", BAD_PASSWD),
        file("/etc/group", BAD_GROUP),
        file("/etc/shadow", BAD_SHADOW),
        file("/etc/login.defs", KV_SEEDS[4]),
        file("/var/lib/dpkg/status", DPKG_SEEDS[0]),
        file(AUDIT_RULES, AUDIT_SEEDS[0]),
    ]
}

#[test]
fn stages() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    copy_tree(&root_dir().join("stages"), dir.path());
    let originals: Vec<(PathBuf, &'static str)> = yaml_files(dir.path())
        .into_iter()
        .filter(|(p, _)| p.ends_with("stage.yml"))
        .collect();
    let tree = tempfile::tempdir().expect("a temporary directory");
    write_tree(tree.path(), &small_tree());
    let tree_path = tree.path().to_path_buf();
    let n = originals.len();
    property(
        "stages",
        350,
        yaml_case(n, STAGE_KEYS),
        |(i, edits, bytes)| {
            let (rel, original) = &originals[i];
            let path = dir.path().join(rel);
            let bytes = match edits {
                Some(e) => mutate(original.as_bytes(), &e),
                None => bytes,
            };
            std::fs::write(&path, &bytes).expect("writing the stage");
            let source = StageSource::Dir(dir.path().to_path_buf());
            let tree = tree_path.clone();
            // A catalog that loads scans: the fuzzed checks run too.
            let loaded = bounded(SCAN_LIMIT, move || {
                Catalog::load(&source).map(|c| {
                    let t = Target::root(&tree).expect("the tree opens");
                    scan::run(&c, &t, &context(&[]), &Selection::default()).summary
                })
            })?;
            std::fs::write(&path, original).expect("restoring the stage");
            if let Err(e) = loaded {
                names_a_file(&e, dir.path(), "stages")?;
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// Disk images: GPT, ext4 and qcow2

const ROOT_UUID: &str = "0b5f0e9e-1d2c-4c6b-9f43-1d1c2a3b4c5d";
const LOG_UUID: &str = "5a1e2b3c-4d5e-4f60-8172-8394a5b6c7d8";
const SECTOR: u64 = 512;
const ROOT_LBA: u64 = 64;
const ROOT_SECTORS: u64 = 8192;
const LOG_LBA: u64 = ROOT_LBA + ROOT_SECTORS;
const LOG_SECTORS: u64 = 2048;
const DISK_SECTORS: u64 = LOG_LBA + LOG_SECTORS + 64;

/// A byte range of an image where mutations land.
#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    len: u64,
}

/// A header field of an image: where, how wide, which byte order.
#[derive(Debug, Clone, Copy)]
struct Field {
    at: u64,
    width: u8,
    big_endian: bool,
}

struct Image {
    bytes: Vec<u8>,
    regions: Vec<Region>,
    fields: Vec<Field>,
}

struct Images {
    raw: Image,
    /// Where the inodes of [`INODES`] are in the raw image.
    inodes: HashMap<&'static str, u64>,
    qcow2: Image,
    qcow2_compressed: Image,
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mkfs(tree: &Path, out: &Path, bytes: u64, uuid: &str, label: &str, features: &str) {
    let f = std::fs::File::create(out).expect("creating a file system image");
    f.set_len(bytes).expect("sizing it");
    run(std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "1024", "-N", "128", "-I", "256"])
        .args(["-U", uuid, "-L", label, "-O", features, "-d"])
        .arg(tree)
        .arg(out));
}

fn debugfs(img: &Path, request: &str) -> String {
    run(std::process::Command::new("debugfs")
        .args(["-R", request])
        .arg(img))
}

/// Where the inode of `path` is in the file system image `img`.
fn inode_offset(img: &Path, path: &str) -> u64 {
    let text = debugfs(img, &format!("imap {path}"));
    let parse = || -> Option<u64> {
        let block: u64 = text
            .split("located at block ")
            .nth(1)?
            .split(',')
            .next()?
            .trim()
            .parse()
            .ok()?;
        let off = text.split("offset 0x").nth(1)?.split_whitespace().next()?;
        Some(block * 1024 + u64::from_str_radix(off, 16).ok()?)
    };
    parse().unwrap_or_else(|| panic!("debugfs imap {path}: {text}"))
}

/// The data blocks of `path` in `img`.
fn blocks_of(img: &Path, path: &str) -> Vec<u64> {
    debugfs(img, &format!("blocks {path}"))
        .split_whitespace()
        .filter_map(|b| b.parse().ok())
        .collect()
}

fn le(at: u64, width: u8) -> Field {
    Field {
        at,
        width,
        big_endian: false,
    }
}

fn be(at: u64, width: u8) -> Field {
    Field {
        at,
        width,
        big_endian: true,
    }
}

/// The fields ext4 readers size things from: the superblock's counts,
/// sizes and features, the first group descriptor, and the inodes and
/// directory blocks of the paths a scan reads.
fn ext4_fields(img: &Path, start: u64, inodes: &[&str]) -> (Vec<Field>, Vec<Region>) {
    let sb = start + 1024;
    let mut fields: Vec<Field> = [
        (0x0, 4),
        (0x4, 4),
        (0x14, 4),
        (0x18, 4),
        (0x20, 4),
        (0x28, 4),
        (0x38, 2),
        (0x4c, 4),
        (0x54, 4),
        (0x58, 2),
        (0x5c, 4),
        (0x60, 4),
        (0x64, 4),
        (0xe0, 4),
        (0xfe, 2),
        (0x150, 4),
        (0x15c, 2),
    ]
    .iter()
    .map(|&(o, w)| le(sb + o, w))
    .collect();
    let gd = start + 2048;
    fields.extend([(0x0, 4), (0x4, 4), (0x8, 4), (0xc, 2), (0x12, 2)].map(|(o, w)| le(gd + o, w)));
    let mut regions = Vec::new();
    for path in inodes {
        let inode = start + inode_offset(img, path);
        fields.extend(
            [
                (0x0, 2),
                (0x4, 4),
                (0x1a, 2),
                (0x1c, 4),
                (0x20, 4),
                (0x28, 2),
                (0x2a, 2),
                (0x2c, 2),
                (0x2e, 2),
                (0x34, 4),
                (0x38, 2),
                (0x3a, 2),
                (0x3c, 4),
                (0x6c, 4),
                (0x80, 2),
            ]
            .map(|(o, w)| le(inode + o, w)),
        );
        regions.push(Region {
            start: inode,
            len: 256,
        });
        // A directory's entries.
        if !path.contains('.') || *path == "/" {
            for b in blocks_of(img, path).into_iter().take(2) {
                regions.push(Region {
                    start: start + b * 1024,
                    len: 1024,
                });
            }
        }
    }
    (fields, regions)
}

/// The GPT's header fields (both copies) and its first two entries.
fn gpt_fields(total: u64) -> Vec<Field> {
    let mut fields = Vec::new();
    for h in [SECTOR, total - SECTOR] {
        fields.extend(
            [
                (8, 4),
                (12, 4),
                (24, 8),
                (32, 8),
                (40, 8),
                (48, 8),
                (72, 8),
                (80, 4),
                (84, 4),
            ]
            .map(|(o, w)| le(h + o, w)),
        );
    }
    for e in [2 * SECTOR, 2 * SECTOR + 128] {
        fields.extend([(0, 8), (32, 8), (40, 8), (48, 8)].map(|(o, w)| le(e + o, w)));
    }
    fields
}

fn root_tree(dir: &Path) {
    let fstab = format!(
        "UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\nUUID={LOG_UUID} /var/log ext4 nodev,nosuid,noexec 0 2\nLABEL=missing /srv ext4 defaults 0 2\ntmpfs /tmp tmpfs nodev,nosuid,noexec 0 0\n"
    );
    let mut files = small_tree();
    files.retain(|(p, _)| p != "/etc/fstab");
    files.push(file("/etc/fstab", fstab));
    files.push(file(
        "/etc/os-release",
        "ID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
    ));
    files.push(file("/etc/pam.d/su", PAM_SEEDS[2]));
    files.push(file("/usr/lib/x/data", vec![7u8; 5000]));
    write_tree(dir, &files);
    std::fs::create_dir_all(dir.join("var/log")).expect("a mount point");
    std::os::unix::fs::symlink("usr/lib", dir.join("lib")).expect("a symlink");
    std::os::unix::fs::symlink("/etc/ssh/sshd_config", dir.join("etc/alt")).expect("a symlink");
    // Longer than 59 bytes: kept in a data block, not in the inode.
    let long = format!("/usr/lib/x/{}/../data", "d".repeat(70));
    std::os::unix::fs::symlink(long, dir.join("etc/long")).expect("a symlink");
}

/// The paths whose inodes the raw image's mutations aim at.
const INODES: &[&str] = &[
    "/",
    "/etc",
    "/etc/fstab",
    "/etc/long",
    "/etc/alt",
    "/etc/ssh",
    "/etc/ssh/sshd_config",
    "/etc/os-release",
    "/usr/lib/x/data",
    "/var/log",
];

fn qcow2_layout(b: &[u8]) -> (Vec<Region>, Vec<Field>) {
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let cluster = 1u64 << be32(20);
    let l1_size = u64::from(be32(36));
    let l1_at = be64(40);
    let refcounts = be64(48);
    let mut regions = vec![
        Region { start: 0, len: 112 },
        Region {
            start: 0,
            len: cluster.min(b.len() as u64),
        },
        Region {
            start: l1_at,
            len: l1_size * 8,
        },
        Region {
            start: refcounts,
            len: u64::from(be32(56)) * cluster,
        },
    ];
    let mut fields: Vec<Field> = [
        (4, 4),
        (8, 8),
        (16, 4),
        (20, 4),
        (24, 8),
        (32, 4),
        (36, 4),
        (40, 8),
        (48, 8),
        (56, 4),
        (60, 4),
        (64, 8),
        (72, 8),
        (80, 8),
        (96, 4),
        (100, 4),
        (104, 1),
    ]
    .map(|(o, w)| be(o, w))
    .to_vec();
    fields.extend((0..4).map(|i| be(refcounts + 8 * i, 8)));
    for i in 0..l1_size {
        fields.push(be(l1_at + 8 * i, 8));
        let l2 = be64((l1_at + i * 8) as usize) & 0x00ff_ffff_ffff_fe00;
        if l2 != 0 {
            regions.push(Region {
                start: l2,
                len: cluster,
            });
            fields.extend((0..32).map(|j| be(l2 + 8 * j, 8)));
        }
    }
    let len = b.len() as u64;
    regions.retain(|r| r.len > 0 && r.start + r.len <= len);
    fields.retain(|f| f.at + u64::from(f.width) <= len);
    (regions, fields)
}

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let d = dir.path();
        root_tree(&d.join("root"));
        let log = d.join("log");
        write_tree(&log, &[file("/audit/audit.log", "type=DAEMON_START\n")]);
        // The root without checksums, so mutations reach every structure;
        // the log partition with them.
        mkfs(
            &d.join("root"),
            &d.join("root.img"),
            ROOT_SECTORS * SECTOR,
            ROOT_UUID,
            "root",
            "^metadata_csum,^has_journal",
        );
        mkfs(
            &log,
            &d.join("log.img"),
            LOG_SECTORS * SECTOR,
            LOG_UUID,
            "log",
            "^has_journal",
        );
        let raw = d.join("disk.raw");
        {
            use gpt::partition_types::LINUX_FS;
            let mut f = std::fs::File::options()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&raw)
                .expect("creating the disk");
            f.set_len(DISK_SECTORS * SECTOR).expect("sizing the disk");
            gpt::mbr::ProtectiveMBR::with_lb_size((DISK_SECTORS - 1) as u32)
                .overwrite_lba0(&mut f)
                .expect("writing the protective MBR");
            let mut disk = gpt::GptConfig::new()
                .writable(true)
                .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
                .create_from_device(f, Some(uuid::Uuid::from_u128(7)))
                .expect("a GPT");
            disk.add_partition_at("root", 1, ROOT_LBA, ROOT_SECTORS, LINUX_FS, 0)
                .expect("the root partition");
            disk.add_partition_at("log", 2, LOG_LBA, LOG_SECTORS, LINUX_FS, 0)
                .expect("the log partition");
            disk.write().expect("writing the GPT");
        }
        let mut bytes = std::fs::read(&raw).expect("reading the disk");
        for (img, lba) in [("root.img", ROOT_LBA), ("log.img", LOG_LBA)] {
            let fs = std::fs::read(d.join(img)).expect("reading a file system");
            let at = (lba * SECTOR) as usize;
            bytes[at..at + fs.len()].copy_from_slice(&fs);
        }
        std::fs::write(&raw, &bytes).expect("writing the disk");
        let root = ROOT_LBA * SECTOR;
        let log = LOG_LBA * SECTOR;
        let total = bytes.len() as u64;
        let (mut fields, inode_regions) = ext4_fields(&d.join("root.img"), root, INODES);
        let inodes = INODES
            .iter()
            .map(|p| (*p, root + inode_offset(&d.join("root.img"), p)))
            .collect();
        let (log_fields, _) = ext4_fields(&d.join("log.img"), log, &["/audit"]);
        fields.extend(log_fields);
        fields.extend(gpt_fields(total));
        let mut regions = vec![
            Region {
                start: 0,
                len: 64 << 10,
            },
            Region {
                start: SECTOR,
                len: 92,
            },
            Region {
                start: 2 * SECTOR,
                len: 256,
            },
            Region {
                start: root + 1024,
                len: 1024,
            },
            Region {
                start: root + 2048,
                len: 1024,
            },
            Region {
                start: root,
                len: 256 << 10,
            },
            Region {
                start: log + 1024,
                len: 1024,
            },
            Region {
                start: log,
                len: 64 << 10,
            },
            Region {
                start: total - 33 * SECTOR,
                len: 33 * SECTOR,
            },
            Region {
                start: 0,
                len: total,
            },
        ];
        regions.extend(inode_regions);
        let convert = |name: &str, extra: &[&str]| {
            let out = d.join(name);
            run(std::process::Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .args(extra)
                .arg(&raw)
                .arg(&out));
            let b = std::fs::read(&out).expect("reading the qcow2");
            let (regions, fields) = qcow2_layout(&b);
            Image {
                regions,
                fields,
                bytes: b,
            }
        };
        let qcow2 = convert("disk.qcow2", &["-o", "cluster_size=4096"]);
        let qcow2_compressed = convert("disk-c.qcow2", &["-c"]);
        Images {
            inodes,
            raw: Image {
                bytes,
                regions,
                fields,
            },
            qcow2,
            qcow2_compressed,
        }
    })
}

/// One change to an image's bytes.
#[derive(Debug, Clone)]
enum Poke {
    Byte(u8),
    Xor(u8),
    Le16(u16),
    Le32(u32),
    Le64(u64),
    Be32(u32),
    Be64(u64),
    Zero(u16),
}

/// A field's new value: one of its own, or the old one moved a little.
#[derive(Debug, Clone)]
enum Value {
    Set(u64),
    Add(i32),
}

/// Where a change lands: at an offset of a region, or on a field.
#[derive(Debug, Clone)]
enum Hit {
    Bytes(usize, u64, Poke),
    Field(usize, Value),
}

const EDGES_32: &[u32] = &[
    0,
    1,
    2,
    3,
    9,
    12,
    16,
    21,
    22,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x1000,
    0xffff,
    0x10000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    128,
    256,
];
const EDGES_64: &[u64] = &[
    0,
    1,
    2,
    7,
    64,
    128,
    256,
    0x200,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    1 << 62,
    1 << 63,
    u64::MAX,
    u64::MAX - 1,
    0x00ff_ffff_ffff_fe00,
    0x4000_0000_0000_0000,
];

fn poke() -> impl Strategy<Value = Poke> {
    let u32s = prop_oneof![any::<u32>(), prop::sample::select(EDGES_32)];
    let u64s = prop_oneof![any::<u64>(), prop::sample::select(EDGES_64)];
    prop_oneof![
        3 => any::<u8>().prop_map(Poke::Byte),
        3 => any::<u8>().prop_map(Poke::Xor),
        1 => any::<u16>().prop_map(Poke::Le16),
        2 => u32s.clone().prop_map(Poke::Le32),
        1 => u64s.clone().prop_map(Poke::Le64),
        2 => u32s.prop_map(Poke::Be32),
        2 => u64s.prop_map(Poke::Be64),
        1 => (1u16..4096).prop_map(Poke::Zero),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => prop::sample::select(EDGES_64).prop_map(Value::Set),
        1 => any::<u64>().prop_map(Value::Set),
        2 => (0u64..4096).prop_map(Value::Set),
        2 => (-64i32..64).prop_map(Value::Add),
    ]
}

/// Mutations of an image; a truncation (a fraction of the length, in
/// 1/65536); for a raw disk, whether the GPT's checksums are made right
/// again after, so its changed fields are read rather than refused.
#[derive(Debug, Clone)]
struct Damage {
    hits: Vec<Hit>,
    truncate: Option<u16>,
    fix_gpt: bool,
}

fn damage() -> impl Strategy<Value = Damage> {
    let hit = prop_oneof![
        (any::<usize>(), any::<u64>(), poke()).prop_map(|(r, o, p)| Hit::Bytes(r, o, p)),
        (any::<usize>(), value()).prop_map(|(f, v)| Hit::Field(f, v)),
    ];
    (
        prop::collection::vec(hit, 0..8),
        prop::option::weighted(0.1, any::<u16>()),
        prop::bool::weighted(0.75),
    )
        .prop_map(|(hits, truncate, fix_gpt)| Damage {
            hits,
            truncate,
            fix_gpt,
        })
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Recompute the CRCs of both GPT headers and their entry arrays, so a
/// changed field is read instead of refused for its checksum.
fn fix_gpt(b: &mut [u8]) {
    let len = b.len() as u64;
    if len < 3 * SECTOR {
        return;
    }
    for at in [SECTOR, (len / SECTOR - 1) * SECTOR] {
        let at = at as usize;
        if &b[at..at + 8] != b"EFI PART" {
            continue;
        }
        let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let start = le64(b, at + 72).checked_mul(SECTOR);
        let size = u64::from(le32(b, at + 80)) * u64::from(le32(b, at + 84));
        if let Some(start) = start.filter(|s| size <= 1 << 20 && s + size <= len) {
            let crc = crc32(&b[start as usize..(start + size) as usize]);
            b[at + 88..at + 92].copy_from_slice(&crc.to_le_bytes());
        }
        b[at + 16..at + 20].fill(0);
        let crc = crc32(&b[at..at + 92]);
        b[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
    }
}

fn set_field(b: &mut [u8], f: Field, v: &Value) {
    let (at, w) = (f.at as usize, usize::from(f.width));
    if at + w > b.len() {
        return;
    }
    let mut raw = [0u8; 8];
    if f.big_endian {
        raw[8 - w..].copy_from_slice(&b[at..at + w]);
    } else {
        raw[..w].copy_from_slice(&b[at..at + w]);
    }
    let old = if f.big_endian {
        u64::from_be_bytes(raw)
    } else {
        u64::from_le_bytes(raw)
    };
    let new = match v {
        Value::Set(n) => *n,
        Value::Add(d) => old.wrapping_add_signed(i64::from(*d)),
    };
    if f.big_endian {
        b[at..at + w].copy_from_slice(&new.to_be_bytes()[8 - w..]);
    } else {
        b[at..at + w].copy_from_slice(&new.to_le_bytes()[..w]);
    }
}

fn damaged(img: &Image, d: &Damage, raw: bool) -> Vec<u8> {
    let mut b = img.bytes.clone();
    for hit in &d.hits {
        let (r, off, p) = match hit {
            Hit::Field(f, v) => {
                set_field(&mut b, img.fields[f % img.fields.len()], v);
                continue;
            }
            Hit::Bytes(r, off, p) => (r, off, p),
        };
        let region = img.regions[r % img.regions.len()];
        let at = (region.start + off % region.len) as usize;
        if at >= b.len() {
            continue;
        }
        let bytes = match p {
            Poke::Byte(v) => vec![*v],
            Poke::Xor(v) => vec![b[at] ^ v],
            Poke::Le16(v) => v.to_le_bytes().to_vec(),
            Poke::Le32(v) => v.to_le_bytes().to_vec(),
            Poke::Le64(v) => v.to_le_bytes().to_vec(),
            Poke::Be32(v) => v.to_be_bytes().to_vec(),
            Poke::Be64(v) => v.to_be_bytes().to_vec(),
            Poke::Zero(n) => vec![0; usize::from(*n)],
        };
        let end = (at + bytes.len()).min(b.len());
        b[at..end].copy_from_slice(&bytes[..end - at]);
    }
    if let Some(t) = d.truncate {
        let keep = (b.len() as u64 * u64::from(t) / 65536) as usize;
        b.truncate(keep);
    }
    if raw && d.fix_gpt {
        fix_gpt(&mut b);
    }
    b
}

/// Open an image and scan it, reading a few paths the scan may not.
fn probe_image(path: &Path) -> Result<String, String> {
    let (t, layout) = Target::image(path).map_err(|e| format!("{e:#}"))?;
    let ctx = ScanContext::detect(&t, None);
    let report = scan::run(catalog(), &t, &ctx, &Selection::default());
    for p in [
        "/etc/fstab",
        "/etc/alt",
        "/etc/long",
        "/lib/x/data",
        "/var/log/audit/audit.log",
    ] {
        let _ = t.read_to_string(p);
        let _ = t.read_link(p);
        let _ = t.canonical(p);
    }
    let _ = t.read_dir("/");
    let _ = t.glob("/var/log/*/*");
    Ok(format!(
        "{} mounts, {} controls",
        layout.mounts.len(),
        report.summary.total
    ))
}

/// One image property at a time: the allocation watch is process-wide.
static IMAGE_LOCK: Mutex<()> = Mutex::new(());

fn image_case(
    name: &str,
    bytes: Vec<u8>,
    extra: impl FnOnce(&Path) + Send + 'static,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join(name);
    std::fs::write(&path, &bytes).expect("writing the image");
    let size = bytes.len();
    drop(bytes);
    LARGEST.store(0, Ordering::Relaxed);
    let p = path.clone();
    let outcome = bounded(IMAGE_LIMIT, move || {
        let r = probe_image(&p);
        extra(&p);
        r
    })?;
    let largest = LARGEST.load(Ordering::Relaxed);
    prop_assert!(
        largest <= ALLOCATION_BUDGET,
        "an allocation of {largest} bytes reading a {size}-byte image"
    );
    match outcome {
        Ok(_) => {
            OPENED.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => prop_assert!(!e.trim().is_empty(), "an empty error"),
    }
    let panics = std::mem::take(&mut *READER_PANICS.lock().unwrap_or_else(|e| e.into_inner()));
    prop_assert!(
        panics.is_empty(),
        "a reader panicked: {}",
        panics.join("; ")
    );
    Ok(())
}

/// Panics on the image view's worker thread (the GPT and ext4 readers),
/// which the view reports as damage: each one is a reader trusting a
/// field it should check.
static READER_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Record the worker's panics, then let the hook in place have them.
/// After the first image is opened, so this hook runs first.
fn watch_reader_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("image-view") {
                if let Ok(mut p) = READER_PANICS.lock() {
                    p.push(info.to_string());
                }
            }
            previous(info);
        }));
    });
}

/// Damaged images that still opened and scanned.
static OPENED: AtomicUsize = AtomicUsize::new(0);

#[test]
fn raw_disk_images() {
    let _one = IMAGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let img = &images().raw;
    // The undamaged image reads and scans.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clean = dir.path().join("clean.raw");
    std::fs::write(&clean, &img.bytes).expect("writing the image");
    let summary = probe_image(&clean).expect("the clean image opens");
    assert!(summary.starts_with("2 mounts"), "{summary}");
    watch_reader_panics();
    property("raw_disk_images", 1400, damage(), |d| {
        image_case("disk.raw", damaged(img, &d, true), |_| {})
    });
    note(&format!(
        "props: raw_disk_images: {} opened",
        OPENED.swap(0, Ordering::Relaxed)
    ));
}

/// The qcow2 reader on its own: reads anywhere are bytes or errors.
fn read_qcow2(path: &Path) {
    let Ok(f) = std::fs::File::open(path) else {
        return;
    };
    let Ok(mut q) = stemforge::scan::qcow2::Qcow2::open(f) else {
        return;
    };
    let mut buf = vec![0u8; 64 << 10];
    let _ = q.read_at(0, &mut buf);
    let _ = q.read_at(q.size.saturating_sub(4096), &mut buf[..4096]);
    let _ = q.read_at(q.size / 2, &mut buf[..1000]);
    let _ = q.read_at(u64::MAX - 10, &mut buf[..100]);
}

#[test]
fn qcow2_images() {
    let _one = IMAGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let imgs = images();
    // The undamaged images read and scan.
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (name, img) in [
        ("plain", &imgs.qcow2),
        ("compressed", &imgs.qcow2_compressed),
    ] {
        let clean = dir.path().join(format!("{name}.qcow2"));
        std::fs::write(&clean, &img.bytes).expect("writing the image");
        let summary = probe_image(&clean).expect("the clean image opens");
        assert!(summary.starts_with("2 mounts"), "{name}: {summary}");
        assert!(img.fields.len() > 20, "{name}: {} fields", img.fields.len());
    }
    watch_reader_panics();
    property(
        "qcow2_images",
        1000,
        (any::<bool>(), damage()),
        |(compressed, d)| {
            let img = if compressed {
                &imgs.qcow2_compressed
            } else {
                &imgs.qcow2
            };
            image_case("disk.qcow2", damaged(img, &d, false), read_qcow2)
        },
    );
    note(&format!(
        "props: qcow2_images: {} opened",
        OPENED.swap(0, Ordering::Relaxed)
    ));
}

// ---------------------------------------------------------------------------
// Regressions: the minimized inputs of what the properties found.

/// A second `sudo` line in /etc/group took the place of the first, so
/// appending `sudo:root:0:` emptied sudo of the members the first line
/// gives it and `group_members` passed. Minimized input of
/// `account_databases`: `("", "", "sudo:root:0:\n")`.
#[test]
fn a_duplicate_group_line_does_not_replace_the_first() {
    let group = format!("{BAD_GROUP}sudo:root:0:\n");
    let u = stemforge::scan::users::Users::parse(BAD_PASSWD, &group);
    assert_eq!(u.groups["sudo"], (27, vec!["alice".to_string()]));
    assert_eq!(u.duplicate_groups, vec!["sudo".to_string()]);
    let results = scan_files(
        &[
            file("/etc/passwd", BAD_PASSWD),
            file("/etc/shadow", BAD_SHADOW),
            file("/etc/group", group),
        ],
        &[],
        &[],
    );
    for (id, what) in controls_of(&["accounts"]) {
        if what.contains("group sudo holds") {
            assert_eq!(results[&id].0, Status::Fail, "{id}: {:?}", results[&id].1);
        }
    }
}

/// A partition of 18446744073709551615 bytes passed the per-file checks,
/// and adding the partitions up overflowed (a panic in debug builds, a
/// wrapped size in release ones). Minimized input of `profiles`:
/// `(0, Some([Set("size", 55609127045947243, "18446744073709551615B")]), [])`.
#[test]
fn partition_sizes_that_overflow_are_a_config_error() {
    use stemforge::profile::{ProfileSource, load};
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (rel, text) in yaml_files(&root_dir().join("os-profiles")) {
        std::fs::write(dir.path().join(rel), text).expect("copying a profile");
    }
    let path = dir.path().join("debian-bookworm-docker.yml");
    let original = std::fs::read(&path).expect("reading the profile");
    let edit = Edit::Set("size", 55609127045947243, "18446744073709551615B".into());
    std::fs::write(&path, mutate(&original, &[edit])).expect("writing the profile");
    let e = load(
        &path.display().to_string(),
        &ProfileSource::Dir(dir.path().to_path_buf()),
    )
    .expect_err("an error, not a disk");
    assert_eq!(e.file, path);
    assert!(e.line.is_some(), "{e}");
}

/// The raw image with `change` made to its bytes, opened, and what
/// `check` makes of it; no allocation past the budget meanwhile.
fn with_damaged_raw(change: impl FnOnce(&mut Vec<u8>, &Images), check: impl FnOnce(&Path)) {
    let _one = IMAGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let imgs = images();
    let mut b = imgs.raw.bytes.clone();
    change(&mut b, imgs);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, &b).expect("writing the image");
    drop(b);
    LARGEST.store(0, Ordering::Relaxed);
    check(&path);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOCATION_BUDGET,
        "an allocation of {largest} bytes"
    );
}

/// i_size_high of /etc/alt, a fast symlink, raised by 56: 240518168596
/// bytes, which ext4-view allocated whole to read the target (the
/// allocation failed and the process aborted). Minimized input of
/// `raw_disk_images`: `Damage { hits: [Field(2000915022662339065,
/// Add(56))], truncate: None, fix_gpt: true }`.
#[test]
fn a_symlink_claiming_terabytes_is_an_error() {
    with_damaged_raw(
        |b, imgs| set_field(b, le(imgs.inodes["/etc/alt"] + 0x6c, 4), &Value::Add(56)),
        |path| {
            let (t, _) = Target::image(path).expect("the image opens");
            let e = t.read_link("/etc/alt").expect_err("no target");
            assert!(e.to_string().contains("240518168596 bytes"), "{e}");
            assert!(t.read_to_string("/etc/alt").is_err());
            assert!(t.read_to_string("/etc/ssh/sshd_config").is_ok());
        },
    );
}

/// The same on /etc/fstab, which ext4-view read whole to find the root.
#[test]
fn an_fstab_claiming_terabytes_is_an_error() {
    with_damaged_raw(
        |b, imgs| set_field(b, le(imgs.inodes["/etc/fstab"] + 0x6c, 4), &Value::Add(56)),
        |path| {
            let e = Target::image(path).map(|_| ()).expect_err("no root");
            assert!(format!("{e:#}").contains("/etc/fstab"), "{e:#}");
        },
    );
}

/// A superblock claiming 2^32 - 1 blocks in groups of one: ext4-view
/// reserved a descriptor for each of 4 billion groups before reading any.
#[test]
fn a_superblock_claiming_billions_of_groups_is_refused() {
    with_damaged_raw(
        |b, _| {
            let sb = ROOT_LBA * SECTOR + 1024;
            set_field(b, le(sb + 0x4, 4), &Value::Set(0xffff_ffff));
            set_field(b, le(sb + 0x20, 4), &Value::Set(1));
        },
        |path| {
            let e = Target::image(path).map(|_| ()).expect_err("no root");
            let e = format!("{e:#}");
            assert!(e.contains("no ext4 partition holds an /etc/fstab"), "{e}");
        },
    );
}

/// ext4-view divides by the superblock's blocks per group (a panic when
/// it is 0) and, on a 64-bit file system, reads 64-bit descriptor fields
/// past a descriptor size shorter than them (a panic on `None`). The
/// view caught both as "its reader failed"; the superblock is now
/// refused before ext4-view reads it. Minimized from the raw image
/// property: one field set, `Value::Set(0)` on blocks per group and
/// `Value::Set(32)` on the descriptor size.
#[test]
fn superblock_fields_ext4_view_trusts_are_checked_first() {
    for (offset, value) in [(0x20, 0), (0xfe, 32)] {
        with_damaged_raw(
            |b, _| {
                let sb = ROOT_LBA * SECTOR + 1024;
                let width = if offset == 0xfe { 2 } else { 4 };
                set_field(b, le(sb + offset, width), &Value::Set(value));
            },
            |path| {
                let e = Target::image(path).map(|_| ()).expect_err("no root");
                let e = format!("{e:#}");
                assert!(!e.contains("reader failed"), "{e}");
                assert!(e.contains("no ext4 partition holds an /etc/fstab"), "{e}");
            },
        );
    }
}

/// Eight bytes written over the root directory's `..` entry made an
/// entry `&` that is the root directory itself: the file system walk went
/// round the loop for ever (the raw image property's 60 s bound caught
/// it). An image's walk now stops 128 directories deep and reports the
/// loop as directories it could not read. Minimized input as found.
#[test]
fn a_directory_loop_in_an_image_ends_the_walk() {
    let d = Damage {
        hits: vec![Hit::Bytes(
            9116123515978746987,
            14725288439808218120,
            Poke::Be64(2789360803245932101),
        )],
        truncate: None,
        fix_gpt: true,
    };
    with_damaged_raw(
        |b, imgs| *b = damaged(&imgs.raw, &d, true),
        |path| {
            let p = path.to_path_buf();
            let started = Instant::now();
            let results = bounded(IMAGE_LIMIT, move || {
                let (t, _) = Target::image(&p).expect("the image opens");
                let ctx = ScanContext::detect(&t, None);
                scan::run(catalog(), &t, &ctx, &Selection::default()).results
            })
            .expect("the scan ends");
            let walks: Vec<_> = results
                .iter()
                .filter(|r| r.evidence.iter().any(|e| e.contains("a directory loop?")))
                .collect();
            assert!(!walks.is_empty(), "no walk saw the loop");
            assert!(walks.iter().all(|r| r.status == Status::Error));
            assert!(started.elapsed() < Duration::from_secs(30));
        },
    );
}

/// A qcow2 file of 9 MiB with 2 MiB clusters whose L1 table points at
/// 12,000 L2 tables 512 bytes apart: checking the tables when opening
/// read 24 GB from it (minutes). L2 tables lie on cluster boundaries.
#[test]
fn qcow2_l2_tables_off_cluster_boundaries_are_refused() {
    let cluster = 2u64 << 20;
    let count = 12_000u64;
    let l1_at = 4096u64;
    let first = 1u64 << 20;
    let mut b = vec![0u8; (first + 512 * count + cluster) as usize];
    let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    put(0, b"QFI\xfb");
    put(4, &3u32.to_be_bytes());
    put(20, &21u32.to_be_bytes());
    put(24, &cluster.to_be_bytes());
    put(36, &(count as u32).to_be_bytes());
    put(40, &l1_at.to_be_bytes());
    put(100, &104u32.to_be_bytes());
    for k in 0..count {
        put((l1_at + 8 * k) as usize, &(first + 512 * k).to_be_bytes());
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("spread.qcow2");
    std::fs::write(&path, &b).expect("writing the image");
    let started = Instant::now();
    let f = std::fs::File::open(&path).expect("opening the image");
    let e = stemforge::scan::qcow2::Qcow2::open(f).expect_err("refused");
    assert!(e.to_string().contains("cluster boundary"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
