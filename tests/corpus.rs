//! The malformed-input corpus (tests/corpus/, see its README.md), run
//! through the stemforge binary as a user runs it: bad profiles, stages
//! and waiver files, hostile root trees and damaged disk images. Every
//! entry states what it expects (exit code, fragments of stderr or
//! stdout, controls that must or must not pass); every run must also
//! finish in time, never panic, never show what a canary file outside
//! its input holds, and write nothing outside its own work directory.
//! All entries run; the failures are reported together at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// A run that takes longer is killed and fails its entry.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The file system UUID of the images' root partition (their fstab names it).
const ROOT_UUID: &str = "5f1c0f4e-2b7d-4c36-9a55-0d6c3b1e7a10";
/// The images' root partition: 1 MiB into a 10 MiB disk, 8 MiB long.
const PART1: u64 = 1 << 20;
const PART_LEN: u64 = 8 << 20;
const DISK_LEN: u64 = 10 << 20;
/// A user the runs that test permissions drop to when the test runs as root.
const NOBODY: u32 = 65534;

// ---- expectations ------------------------------------------------------------

/// What an entry expects, from its `# expect:` lines.
#[derive(Debug, Default, Clone)]
struct Expect {
    exit: i32,
    stderr: Vec<String>,
    stdout: Vec<String>,
    /// Control-id patterns that must all come out `pass`.
    pass: Vec<String>,
    /// The same, when the test runs as root (the tree's files are then
    /// root's, as owner checks want).
    pass_if_root: Vec<String>,
    /// Control-id patterns that must not come out `pass`.
    not_pass: Vec<String>,
    /// Run as an unprivileged user (root reads through mode 000).
    as_nobody: bool,
    /// The command, for entries that choose one.
    run: Option<String>,
}

/// Parse the `# expect:` lines of `text` (any number, they add up).
fn parse_expect(text: &str) -> Result<Expect, String> {
    let mut e = Expect {
        exit: 2,
        ..Default::default()
    };
    let mut found = false;
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("# expect:") else {
            continue;
        };
        found = true;
        for (key, value) in tokens(rest)? {
            match key.as_str() {
                "exit" => e.exit = value.parse().map_err(|_| format!("exit={value}"))?,
                "stderr~" => e.stderr.push(value),
                "stdout~" => e.stdout.push(value),
                "pass" => e.pass.push(value),
                "pass-if-root" => e.pass_if_root.push(value),
                "not-pass" => e.not_pass.push(value),
                "as" if value == "nobody" => e.as_nobody = true,
                "run" => e.run = Some(value),
                _ => return Err(format!("unknown expectation `{key}={value}`")),
            }
        }
    }
    if !found {
        return Err("no `# expect:` line".into());
    }
    Ok(e)
}

/// `key=value` and `key~="quoted value"` pairs.
fn tokens(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quote after `{key}=`")),
                    Some('"') => break,
                    Some('\\') => value.push(chars.next().unwrap_or('\\')),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        if key.is_empty() || value.is_empty() {
            return Err(format!("bad expectation near `{key}={value}`"));
        }
        out.push((key, value));
    }
}

// ---- running -----------------------------------------------------------------

/// What one run of the binary did.
#[derive(Debug, Default, Clone)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
    elapsed: Duration,
}

/// The per-entry scratch space: the binary runs with its working
/// directory, HOME, TMPDIR and caches in here.
struct Work {
    dir: PathBuf,
}

impl Work {
    fn new(base: &Path, name: &str) -> Work {
        let dir = base.join(name.replace('/', "_"));
        fs::create_dir_all(&dir).unwrap();
        for sub in ["home", "tmp", "cache", "in"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        Work { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The names directly in the work directory and everything under tmp/.
    fn listing(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for e in fs::read_dir(self.dir.join("tmp")).unwrap().flatten() {
            names.insert(format!("tmp/{}", e.file_name().to_string_lossy()));
        }
        names
    }
}

/// Run stemforge with `args` in `work`, killed after [`TIMEOUT`].
fn run(work: &Work, args: &[OsString], as_nobody: bool) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stemforge"));
    cmd.args(args)
        .current_dir(&work.dir)
        .env("HOME", work.path("home"))
        .env("TMPDIR", work.path("tmp"))
        .env("XDG_CACHE_HOME", work.path("cache"))
        .env("XDG_CONFIG_HOME", work.path("home"))
        .env("STEMFORGE_CACHE_DIR", work.path("cache"))
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: geteuid has no preconditions.
    if as_nobody && unsafe { libc::geteuid() } == 0 {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("stemforge starts");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > TIMEOUT {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    Outcome {
        code: status.code(),
        stdout: String::from_utf8_lossy(&out_t.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_t.join().unwrap()).into_owned(),
        timed_out,
        elapsed,
    }
}

/// What is wrong with `o` given `e` (empty: nothing). `token` is the
/// canary's unique text, which no output may contain.
fn judge(e: &Expect, o: &Outcome, token: &str) -> Vec<String> {
    let mut bad = Vec::new();
    if o.timed_out {
        bad.push(format!("killed after {} s", TIMEOUT.as_secs()));
    }
    if o.code != Some(e.exit) {
        bad.push(format!("exit {:?}, expected {}", o.code, e.exit));
    }
    for f in &e.stderr {
        if !o.stderr.contains(f.as_str()) {
            bad.push(format!("stderr lacks {f:?}"));
        }
    }
    for f in &e.stdout {
        if !o.stdout.contains(f.as_str()) {
            bad.push(format!("stdout lacks {f:?}"));
        }
    }
    if o.stderr.contains("panicked") {
        bad.push("panicked".into());
    }
    if o.stdout.contains(token) || o.stderr.contains(token) {
        bad.push("the output shows the canary's content: something read outside the input".into());
    }
    if !e.pass.is_empty() || !e.not_pass.is_empty() || !e.pass_if_root.is_empty() {
        match serde_json::from_str::<serde_json::Value>(&o.stdout) {
            Err(err) => bad.push(format!("stdout is not a JSON report: {err}")),
            Ok(report) => bad.extend(judge_controls(e, &report)),
        }
    }
    bad
}

fn judge_controls(e: &Expect, report: &serde_json::Value) -> Vec<String> {
    let mut bad = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let results: Vec<(&str, &str, String)> = report["results"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["id"].as_str().unwrap_or(""),
                        r["status"].as_str().unwrap_or(""),
                        r["evidence"].to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let if_root = e.pass_if_root.iter().filter(|_| root);
    for (pattern, want_pass) in e
        .pass
        .iter()
        .chain(if_root)
        .map(|p| (p, true))
        .chain(e.not_pass.iter().map(|p| (p, false)))
    {
        let matching: Vec<_> = results
            .iter()
            .filter(|(id, _, _)| glob_match(pattern, id))
            .collect();
        if matching.is_empty() {
            bad.push(format!("no control matches `{pattern}`"));
        }
        for (id, status, evidence) in matching {
            if (*status == "pass") != want_pass {
                bad.push(format!("{id} is {status}: {evidence}"));
            }
        }
    }
    bad
}

/// `*` matches any run of characters.
fn glob_match(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            let Some(rest) = s.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|i| rest.is_char_boundary(*i))
                .any(|i| glob_match(tail, &rest[i..]))
        }
    }
}

// ---- tree recipes ------------------------------------------------------------

/// Where recipes put their canary: files outside every input, which an
/// input may point at and no run may read.
struct Canary {
    dir: PathBuf,
    token: String,
}

impl Canary {
    fn plant(base: &Path) -> Canary {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let token = format!(
            "canary{:012x}",
            (nanos ^ (u128::from(std::process::id()) << 20)) & 0xffff_ffff_ffff
        );
        let dir = base.join("canary");
        fs::create_dir_all(&dir).unwrap();
        let t = &token;
        // Hardened content that would make controls pass if it were read,
        // with the token where reports show what they read.
        let files = [
            (
                "passwd",
                format!("root:x:0:0:{t}:/root:/bin/bash\n{t}:x:0:0::/:/bin/sh\n"),
            ),
            (
                "shadow",
                format!("root:!:19000:0:99999:7:::\n{t}:!:19000::::::\n"),
            ),
            ("group", format!("root:x:0:\n{t}:x:0:\n")),
            (
                "sshd_config",
                format!("PermitRootLogin no\nBanner /etc/{t}\nLogLevel INFO\nMaxAuthTries 3\n"),
            ),
            ("os-release", format!("ID={t}\nVERSION_ID=\"{t}\"\n")),
            ("fstab", format!("LABEL={t} / ext4 defaults 0 1\n")),
            ("profile.yml", format!("name: {t}\n")),
            ("daemon.json", format!("{{\"{t}\": true}}\n")),
        ];
        for (name, text) in files {
            fs::write(dir.join(name), text).unwrap();
        }
        Canary { dir, token }
    }

    /// `${CANARY}` (the canary directory), `${UP}` (enough `../` to reach
    /// `/` from any input) and `${TOKEN}` in recipe text.
    fn expand(&self, s: &str) -> String {
        s.replace("${CANARY}", &self.dir.to_string_lossy())
            .replace("${UP}", &"../".repeat(40))
            .replace("${TOKEN}", &self.token)
    }
}

/// Unescape `\n`, `\t`, `\\`, `\s` (a space) and `\xHH` into bytes.
fn unescape(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b's' => out.push(b' '),
                b'\\' => out.push(b'\\'),
                b'x' if i + 3 < b.len() + 1 => {
                    let hex = std::str::from_utf8(&b[i + 2..(i + 4).min(b.len())]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(v) => {
                            out.push(v);
                            i += 4;
                            continue;
                        }
                        Err(_) => out.extend_from_slice(b"\\x"),
                    }
                }
                other => out.extend_from_slice(&[b'\\', other]),
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Sizes as recipes write them: `4096`, `512K`, `8MiB`, `50GiB`, `1TiB`.
fn parse_size(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().map_err(|_| format!("size `{s}`"))?;
    let mult: u64 = match &s[split..] {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        u => return Err(format!("size unit `{u}`")),
    };
    n.checked_mul(mult).ok_or(format!("size `{s}` too large"))
}

/// The tree a recipe describes, made on disk; `mode` lines are applied
/// last and undone by [`Tree::relax`] so the tree can be removed.
struct Tree {
    root: PathBuf,
    modes: Vec<(PathBuf, u32)>,
    /// `scan-root`: the directory to scan instead of the root.
    scan_root: Option<PathBuf>,
}

impl Tree {
    fn host(&self, path: &str) -> PathBuf {
        let rel = unescape(path.trim_start_matches('/'));
        self.root.join(OsString::from_vec(rel))
    }

    fn parent(&self, p: &Path) -> Result<(), String> {
        let parent = p.parent().ok_or("no parent")?;
        fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))
    }

    /// Apply the recipe at `file` (lines `op PATH [ARGS]`, `#` comments).
    fn apply_file(&mut self, file: &Path, canary: &Canary) -> Result<(), String> {
        let text = fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        self.apply(&text, file.parent().unwrap(), canary)
    }

    fn apply(&mut self, text: &str, dir: &Path, canary: &Canary) -> Result<(), String> {
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            self.op(line, dir, canary)
                .map_err(|e| format!("line {}: `{line}`: {e}", n + 1))?;
        }
        Ok(())
    }

    fn op(&mut self, line: &str, dir: &Path, canary: &Canary) -> Result<(), String> {
        let line = canary.expand(line);
        let (op, rest) = line.split_once(' ').unwrap_or((&line, ""));
        let (path, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        let io = |e: std::io::Error| format!("{path}: {e}");
        match op {
            "include" => return self.apply_file(&dir.join(path), canary),
            "scan-root" => {
                self.scan_root = Some(self.host(path));
                return Ok(());
            }
            _ => {}
        }
        let p = self.host(path);
        self.parent(&p)?;
        match op {
            "dir" => fs::create_dir_all(&p).map_err(io)?,
            "file" => {
                if p.is_dir() {
                    fs::remove_dir_all(&p).map_err(io)?;
                }
                fs::write(&p, unescape(arg)).map_err(io)?;
            }
            "symlink" => {
                let _ = fs::remove_file(&p);
                let target = OsString::from_vec(unescape(arg));
                std::os::unix::fs::symlink(target, &p).map_err(io)?;
            }
            "fifo" => {
                let _ = fs::remove_file(&p);
                let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
                // SAFETY: a valid NUL-terminated path.
                if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                    return Err(io(std::io::Error::last_os_error()));
                }
            }
            "socket" => {
                let _ = fs::remove_file(&p);
                // The socket file stays after the listener is dropped.
                std::os::unix::net::UnixListener::bind(&p).map_err(io)?;
            }
            "sparse" => {
                let f = fs::File::create(&p).map_err(io)?;
                f.set_len(parse_size(arg)?).map_err(io)?;
            }
            "remove" => {
                let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
            }
            "mode" => {
                let mode = u32::from_str_radix(arg, 8).map_err(|_| format!("mode `{arg}`"))?;
                self.modes.push((p, mode));
            }
            "deep" => {
                // Nested directories `d/d/d/...`, made relative to an open
                // directory: the whole path outgrows PATH_MAX.
                let depth: usize = arg.parse().map_err(|_| format!("depth `{arg}`"))?;
                fs::create_dir_all(&p).map_err(io)?;
                let mut fd = rustix::fs::open(
                    &p,
                    rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
                    rustix::fs::Mode::empty(),
                )
                .map_err(|e| format!("{path}: {e}"))?;
                for _ in 0..depth {
                    rustix::fs::mkdirat(&fd, "d", rustix::fs::Mode::from_raw_mode(0o755))
                        .map_err(|e| format!("{path}: {e}"))?;
                    fd = rustix::fs::openat(
                        &fd,
                        "d",
                        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
                        rustix::fs::Mode::empty(),
                    )
                    .map_err(|e| format!("{path}: {e}"))?;
                }
                let ww = rustix::fs::Mode::from_raw_mode(0o777);
                rustix::fs::mkdirat(&fd, "bottom", ww).map_err(|e| format!("{path}: {e}"))?;
                rustix::fs::chmodat(&fd, "bottom", ww, rustix::fs::AtFlags::empty())
                    .map_err(|e| format!("{path}: {e}"))?;
            }
            _ => return Err(format!("unknown operation `{op}`")),
        }
        Ok(())
    }

    /// Apply the deferred `mode` lines (to what is still there and no
    /// symlink: a later line may have replaced it).
    fn seal(&self) -> Result<(), String> {
        for (p, mode) in self.modes.iter().rev() {
            if p.symlink_metadata()
                .is_ok_and(|m| !m.file_type().is_symlink())
            {
                fs::set_permissions(p, fs::Permissions::from_mode(*mode))
                    .map_err(|e| format!("{}: {e}", p.display()))?;
            }
        }
        Ok(())
    }

    /// Undo the `mode` lines so the tree can be removed.
    fn relax(&self) {
        for (p, _) in &self.modes {
            if p.symlink_metadata()
                .is_ok_and(|m| !m.file_type().is_symlink())
            {
                let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o755));
            }
        }
    }
}

/// Copy a file, with the canary's names expanded in text.
fn copy_file(from: &Path, to: &Path, canary: &Canary) {
    let bytes = fs::read(from).unwrap();
    let bytes = match String::from_utf8(bytes) {
        Ok(text) => canary.expand(&text).into_bytes(),
        Err(e) => e.into_bytes(),
    };
    fs::write(to, bytes).unwrap();
}

/// Copy a directory (see [`copy_file`]), leaving out the entry's own
/// `expect` and `layout.tree`.
fn copy_dir(from: &Path, to: &Path, canary: &Canary) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let name = e.file_name();
        if name == "expect" || name == "layout.tree" {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(&name), canary);
        } else {
            copy_file(&e.path(), &to.join(&name), canary);
        }
    }
}

// ---- disk images ---------------------------------------------------------------

/// CRC-32 (IEEE), as GPT uses it.
fn crc32(data: &[u8]) -> u32 {
    crc(data, 0xEDB8_8320)
}

/// CRC-32C (Castagnoli), as ext4's metadata checksums use it.
fn crc32c(data: &[u8]) -> u32 {
    crc(data, 0x82F6_3B78)
}

fn crc(data: &[u8], poly: u32) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ poly } else { c >> 1 };
        }
    }
    !c
}

fn tool(program: &str, args: &[&OsStr]) -> Result<(), String> {
    // mkfs.ext4 lives in sbin, which an unprivileged PATH may lack.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{program} is not installed"))?;
    let o = Command::new(found)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

/// A 10 MiB GPT disk whose one partition is an ext4 file system made
/// from `tree` (with an fstab that mounts it as /), written to `out`.
fn make_raw(tree: &Path, scratch: &Path, out: &Path) -> Result<(), String> {
    use gpt::disk::LogicalBlockSize;
    let part = scratch.join("part.ext4");
    let _ = fs::remove_file(&part);
    tool(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-b".as_ref(),
            "4096".as_ref(),
            "-U".as_ref(),
            ROOT_UUID.as_ref(),
            "-L".as_ref(),
            "root".as_ref(),
            "-E".as_ref(),
            "root_owner=0:0".as_ref(),
            "-d".as_ref(),
            tree.as_os_str(),
            part.as_os_str(),
            "8M".as_ref(),
        ],
    )?;
    let mut f = fs::File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(out)
        .map_err(|e| e.to_string())?;
    f.set_len(DISK_LEN).map_err(|e| e.to_string())?;
    gpt::mbr::ProtectiveMBR::with_lb_size((DISK_LEN / 512 - 1) as u32)
        .overwrite_lba0(&mut f)
        .map_err(|e| e.to_string())?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .create_from_device(f, Some(uuid::Uuid::from_u128(0x5eed)))
        .map_err(|e| e.to_string())?;
    disk.add_partition_at(
        "root",
        1,
        PART1 / 512,
        PART_LEN / 512,
        gpt::partition_types::LINUX_FS,
        0,
    )
    .map_err(|e| e.to_string())?;
    let f = disk.write().map_err(|e| e.to_string())?;
    let bytes = fs::read(&part).map_err(|e| e.to_string())?;
    f.write_all_at(&bytes, PART1).map_err(|e| e.to_string())?;
    Ok(())
}

/// A damaged image: its base and the damage done to it.
struct ImageRecipe {
    base: Vec<String>,
    tree_ops: Vec<String>,
    damage: Vec<String>,
}

fn parse_image_recipe(text: &str) -> Result<ImageRecipe, String> {
    let mut r = ImageRecipe {
        base: Vec::new(),
        tree_ops: Vec::new(),
        damage: Vec::new(),
    };
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(b) = line.strip_prefix("base:") {
            r.base = b.split_whitespace().map(str::to_string).collect();
        } else if let Some(t) = line.strip_prefix("tree ") {
            r.tree_ops.push(t.to_string());
        } else {
            r.damage.push(line.to_string());
        }
    }
    if r.base.is_empty() {
        return Err("no `base:` line".into());
    }
    Ok(r)
}

/// Make the recipe's image at `out` (its extension follows the base).
fn make_image(
    r: &ImageRecipe,
    scratch: &Path,
    out_stem: &Path,
    canary: &Canary,
) -> Result<PathBuf, String> {
    let kind = r.base[0].as_str();
    let ext = match kind {
        "qcow2" | "qcow2-compressed" => "qcow2",
        "vmdk" => "vmdk",
        _ => "raw",
    };
    let out = out_stem.with_extension(ext);
    match kind {
        "raw" | "qcow2" | "qcow2-compressed" | "vmdk" => {
            let tree_dir = scratch.join("tree");
            let _ = fs::remove_dir_all(&tree_dir);
            let mut tree = Tree {
                root: tree_dir.clone(),
                modes: Vec::new(),
                scan_root: None,
            };
            tree.apply_file(&Path::new(CORPUS).join("images/_base.tree"), canary)?;
            for op in &r.tree_ops {
                tree.apply(op, &Path::new(CORPUS).join("images"), canary)?;
            }
            tree.seal()?;
            let raw = scratch.join("disk.raw");
            let made = make_raw(&tree_dir, scratch, &raw);
            tree.relax();
            made?;
            match kind {
                "raw" => {
                    fs::rename(&raw, &out).map_err(|e| e.to_string())?;
                }
                _ => {
                    let mut args: Vec<&OsStr> = vec!["convert".as_ref(), "-f".as_ref()];
                    args.extend(["raw".as_ref(), "-O".as_ref()] as [&OsStr; 2]);
                    match kind {
                        "vmdk" => args.extend([
                            "vmdk".as_ref(),
                            "-o".as_ref(),
                            "subformat=streamOptimized".as_ref(),
                        ] as [&OsStr; 3]),
                        "qcow2-compressed" => {
                            args.extend(["qcow2".as_ref(), "-c".as_ref()] as [&OsStr; 2])
                        }
                        _ => args.push("qcow2".as_ref()),
                    }
                    args.extend([raw.as_os_str(), out.as_os_str()]);
                    tool("qemu-img", &args)?;
                }
            }
        }
        "empty" => fs::write(&out, b"").map_err(|e| e.to_string())?,
        "zeros" | "random" => {
            let len = parse_size(r.base.get(1).ok_or("a size")?)?;
            let mut bytes = vec![0u8; len as usize];
            if kind == "random" {
                // A fixed sequence: the same bytes on every run.
                let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
                for b in bytes.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = (x >> 24) as u8;
                }
            }
            fs::write(&out, bytes).map_err(|e| e.to_string())?;
        }
        "dir" => fs::create_dir_all(&out).map_err(|e| e.to_string())?,
        "fifo" => Tree {
            root: out.parent().unwrap().to_path_buf(),
            modes: Vec::new(),
            scan_root: None,
        }
        .op(
            &format!("fifo /{}", out.file_name().unwrap().to_string_lossy()),
            scratch,
            canary,
        )?,
        "missing" => {}
        "symlink" => {
            let target = canary.expand(r.base.get(1).ok_or("a target")?);
            std::os::unix::fs::symlink(target, &out).map_err(|e| e.to_string())?;
        }
        other => return Err(format!("unknown base `{other}`")),
    }
    for d in &r.damage {
        damage(&out, d).map_err(|e| format!("`{d}`: {e}"))?;
    }
    Ok(out)
}

/// Offsets in damage lines: numbers (decimal or 0x hex) and names joined
/// by `+` and `-`. Names: `end` (the file's length), `gpt` (the primary
/// GPT header), `entries` (the partition entries), `backup` (the backup
/// header), `part1` (the root partition), `sb` (its ext4 superblock),
/// `l1` and `l2` (a qcow2's L1 table and first L2 table).
fn offset(file: &Path, expr: &str) -> Result<u64, String> {
    let f = fs::File::open(file).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let be64 = |at: usize| -> Result<u64, String> {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, at as u64)
            .map_err(|_| "the file is too short for this name".to_string())?;
        Ok(u64::from_be_bytes(b))
    };
    let name = |n: &str| -> Result<u64, String> {
        Ok(match n {
            "end" => len,
            "gpt" => 512,
            "entries" => 1024,
            "backup" => len - 512,
            "part1" => PART1,
            "sb" => PART1 + 1024,
            "l1" => be64(40)?,
            "l2" => {
                let l1 = be64(40)? as usize;
                (0..256)
                    .map(|i| be64(l1 + 8 * i).map(|e| e & 0x00ff_ffff_ffff_fe00))
                    .find(|e| e.as_ref().map_or(true, |v| *v != 0))
                    .ok_or("no L2 table")??
            }
            _ => {
                if let Some(h) = n.strip_prefix("0x") {
                    u64::from_str_radix(h, 16).map_err(|_| format!("`{n}`"))?
                } else {
                    n.parse().map_err(|_| format!("`{n}`"))?
                }
            }
        })
    };
    let mut total: i128 = 0;
    let mut sign = 1i128;
    let mut term = String::new();
    for c in expr.chars().chain(std::iter::once('+')) {
        if c == '+' || c == '-' {
            total += sign * i128::from(name(term.trim())?);
            sign = if c == '+' { 1 } else { -1 };
            term.clear();
        } else {
            term.push(c);
        }
    }
    u64::try_from(total).map_err(|_| format!("`{expr}` is negative"))
}

/// One damage line: `truncate SIZE|N%`, `poke OFFSET HEX`,
/// `fill OFFSET LEN BYTE`, `gpt-crc`, `ext4-csum`.
fn damage(file: &Path, line: &str) -> Result<(), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let f = fs::File::options()
        .read(true)
        .write(true)
        .open(file)
        .map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let write = |at: u64, b: &[u8]| f.write_all_at(b, at).map_err(|e| e.to_string());
    let read = |at: u64, n: usize| {
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, at).map_err(|e| e.to_string())?;
        Ok::<_, String>(b)
    };
    match words.as_slice() {
        ["truncate", size] => {
            let to = match size.strip_suffix('%') {
                Some(p) => len * p.parse::<u64>().map_err(|_| "percent")? / 100,
                None => parse_size(size)?,
            };
            f.set_len(to).map_err(|e| e.to_string())?;
        }
        ["poke", at, hex] => {
            let bytes = hex::decode(hex).map_err(|e| e.to_string())?;
            write(offset(file, at)?, &bytes)?;
        }
        ["fill", at, n, byte] => {
            let v = u8::from_str_radix(byte, 16).map_err(|_| "fill byte")?;
            let n = parse_size(n)? as usize;
            write(offset(file, at)?, &vec![v; n])?;
        }
        ["gpt-crc"] => {
            // Both headers: the entries' CRC (when the array is of a size
            // one can read), then the header's own.
            for at in [512, len - 512] {
                let h = read(at, 92)?;
                if &h[..8] != b"EFI PART" {
                    continue;
                }
                let le32 = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
                let le64 = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
                let table = u64::from(le32(80)) * u64::from(le32(84));
                let start = le64(72).saturating_mul(512);
                if table <= 1 << 20 && start.saturating_add(table) <= len {
                    let entries = read(start, table as usize)?;
                    write(at + 88, &crc32(&entries).to_le_bytes())?;
                }
                let mut h = read(at, 92)?;
                h[16..20].fill(0);
                write(at + 16, &crc32(&h).to_le_bytes())?;
            }
        }
        ["ext4-csum"] => {
            let sb = PART1 + 1024;
            let bytes = read(sb, 1024)?;
            // ext4 stores the CRC-32C register without its final inversion.
            write(sb + 0x3FC, &(!crc32c(&bytes[..0x3FC])).to_le_bytes())?;
        }
        _ => return Err("unknown damage".into()),
    }
    Ok(())
}

// ---- entries -------------------------------------------------------------------

/// One corpus entry, ready to run.
struct Entry {
    /// `profiles/extends-cycle`.
    name: String,
    category: &'static str,
    expect: Expect,
    /// The input in the corpus (a file or a directory).
    source: PathBuf,
}

fn entries() -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for (category, single_ext) in [
        ("profiles", Some("yml")),
        ("stages", None),
        ("waivers", Some("yml")),
        ("trees", Some("tree")),
        ("images", Some("image")),
    ] {
        let dir = Path::new(CORPUS).join(category);
        let mut items: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('_'))
            .collect();
        items.sort();
        for p in items {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let expect_text = if p.is_dir() {
                fs::read_to_string(p.join("expect"))
                    .map_err(|e| format!("{}/expect: {e}", p.display()))?
            } else {
                if p.extension().and_then(|e| e.to_str()) != single_ext {
                    return Err(format!("{}: not a corpus entry", p.display()));
                }
                fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?
            };
            let name = format!("{category}/{stem}");
            let expect = parse_expect(&expect_text).map_err(|e| format!("{name}: {e}"))?;
            out.push(Entry {
                name,
                category,
                expect,
                source: p,
            });
        }
    }
    Ok(out)
}

/// Make the entry's input in `work` and say how to run it.
fn prepare(
    e: &Entry,
    work: &Work,
    canary: &Canary,
    scratch: &Path,
) -> Result<(Vec<OsString>, Option<Tree>), String> {
    let os = |s: &str| OsString::from(s);
    let p = |p: PathBuf| p.into_os_string();
    let layout = |dir: &Path, src: &Path| -> Result<Option<Tree>, String> {
        let recipe = src.join("layout.tree");
        if !recipe.exists() {
            return Ok(None);
        }
        let mut t = Tree {
            root: dir.to_path_buf(),
            modes: Vec::new(),
            scan_root: None,
        };
        t.apply_file(&recipe, canary)?;
        t.seal()?;
        Ok(Some(t))
    };
    let out = work.path("out");
    Ok(match e.category {
        "profiles" => {
            let dir = work.path("in/profiles");
            let (profile, tree) = if e.source.is_dir() {
                copy_dir(&e.source, &dir, canary);
                ("main".to_string(), layout(&dir, &e.source)?)
            } else {
                fs::create_dir_all(&dir).unwrap();
                let name = e.source.file_name().unwrap();
                copy_file(&e.source, &dir.join(name), canary);
                (e.source.file_stem().unwrap().to_string_lossy().into(), None)
            };
            let args = match e.expect.run.as_deref() {
                Some("profiles") => vec![os("profiles"), os("--profiles-dir"), p(dir)],
                _ => vec![
                    os("build"),
                    os("--dry-run"),
                    os("--profiles-dir"),
                    p(dir),
                    os("--profile"),
                    os(&profile),
                    os("--out"),
                    p(out),
                ],
            };
            (args, tree)
        }
        "stages" => {
            let dir = work.path("in/stages");
            copy_dir(&e.source, &dir, canary);
            let tree = layout(&dir, &e.source)?;
            let args = match e.expect.run.as_deref() {
                None | Some("stages") => vec![os("stages"), os("--stages"), p(dir)],
                Some("controls") => vec![os("controls"), os("--stages"), p(dir)],
                Some("build") => vec![
                    os("build"),
                    os("--dry-run"),
                    os("--profile"),
                    os("debian-bookworm"),
                    os("--stages"),
                    p(dir),
                    os("--out"),
                    p(out),
                ],
                Some("scan") => {
                    fs::create_dir_all(work.path("root")).unwrap();
                    vec![
                        os("scan"),
                        os("--root"),
                        p(work.path("root")),
                        os("--stages"),
                        p(dir),
                        os("--format"),
                        os("json"),
                    ]
                }
                Some(other) => return Err(format!("unknown run `{other}`")),
            };
            (args, tree)
        }
        "waivers" => {
            let file = work.path("in").join(e.source.file_name().unwrap());
            copy_file(&e.source, &file, canary);
            fs::create_dir_all(work.path("root")).unwrap();
            let args = vec![
                os("scan"),
                os("--root"),
                p(work.path("root")),
                os("--waivers"),
                p(file),
                os("--format"),
                os("json"),
            ];
            (args, None)
        }
        "trees" => {
            let mut tree = Tree {
                root: work.path("in/tree"),
                modes: Vec::new(),
                scan_root: None,
            };
            fs::create_dir_all(&tree.root).unwrap();
            tree.apply_file(&e.source, canary)?;
            tree.seal()?;
            let target = tree.scan_root.clone().unwrap_or_else(|| tree.root.clone());
            let args = vec![
                os("scan"),
                os("--root"),
                p(target),
                os("--format"),
                os("json"),
            ];
            (args, Some(tree))
        }
        "images" => {
            let text = fs::read_to_string(&e.source).map_err(|e| e.to_string())?;
            let recipe = parse_image_recipe(&text)?;
            let stem = e.source.file_stem().unwrap();
            let image = make_image(&recipe, scratch, &work.path("in").join(stem), canary)?;
            let args = vec![
                os("scan"),
                os("--image"),
                p(image),
                os("--format"),
                os("json"),
            ];
            (args, None)
        }
        _ => unreachable!(),
    })
}

/// Names, sizes and modification times of every file under `dir`.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            }
            out.insert(e.path(), (md.len(), md.modified().ok()));
        }
    }
    out
}

fn top_level(dir: &Path) -> BTreeSet<OsString> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect()
}

#[test]
fn the_malformed_input_corpus_is_refused_cleanly() {
    let started = Instant::now();
    let entries = entries().unwrap_or_else(|e| panic!("the corpus does not parse: {e}"));
    let corpus_before = snapshot(Path::new(CORPUS));
    let repo_before = top_level(Path::new(REPO));
    let base = tempfile::Builder::new()
        .prefix("stemforge-corpus-")
        .tempdir()
        .unwrap();
    // Runs that drop to an unprivileged user must reach their inputs.
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let canary = Canary::plant(base.path());
    let scratch = base.path().join("scratch");
    fs::create_dir_all(&scratch).unwrap();
    let mut failures: Vec<String> = Vec::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut times: Vec<(Duration, String)> = Vec::new();
    for e in &entries {
        *counts.entry(e.category).or_default() += 1;
        let work = Work::new(&base.path().join("work"), &e.name);
        let prepared = prepare(e, &work, &canary, &scratch);
        let (args, tree) = match prepared {
            Ok(x) => x,
            Err(err) => {
                failures.push(format!("{}: cannot make the input: {err}", e.name));
                continue;
            }
        };
        let before = work.listing();
        let o = run(&work, &args, e.expect.as_nobody);
        if let Some(t) = &tree {
            t.relax();
        }
        let mut bad = judge(&e.expect, &o, &canary.token);
        let after = work.listing();
        let new: Vec<&String> = after.difference(&before).collect();
        if !new.is_empty() {
            bad.push(format!("wrote into its work directory: {new:?}"));
        }
        times.push((o.elapsed, e.name.clone()));
        if std::env::var_os("CORPUS_VERBOSE").is_some() {
            let last = o.stderr.lines().last().unwrap_or("");
            let _ = writeln!(std::io::stderr(), "{} exit {:?}: {last}", e.name, o.code);
        }
        if !bad.is_empty() {
            let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
            failures.push(format!(
                "{}: {}\n    stemforge {}\n    stderr: {}",
                e.name,
                bad.join("; "),
                args.join(" "),
                o.stderr.trim().replace('\n', "\n            ")
            ));
        }
        let _ = fs::remove_dir_all(&work.dir);
    }
    if snapshot(Path::new(CORPUS)) != corpus_before {
        failures.push("the corpus directory changed during the run".into());
    }
    let repo_after = top_level(Path::new(REPO));
    let appeared: Vec<_> = repo_after.difference(&repo_before).collect();
    if !appeared.is_empty() {
        failures.push(format!("new files in the repository: {appeared:?}"));
    }
    times.sort();
    let slowest: Vec<String> = times
        .iter()
        .rev()
        .take(5)
        .map(|(d, n)| format!("{n} {:.1} s", d.as_secs_f64()))
        .collect();
    // On stderr itself, past the test harness's capture: the count shows
    // on every run.
    let _ = writeln!(
        std::io::stderr(),
        "corpus: {} entries run ({}) in {:.1} s; slowest: {}",
        entries.len(),
        counts
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64(),
        slowest.join(", ")
    );
    assert!(
        failures.is_empty(),
        "{} of {} corpus entries failed:\n\n{}",
        failures.len(),
        entries.len(),
        failures.join("\n\n")
    );
}

/// The judge fails an entry whose expected fragment is not in stderr,
/// whose exit code differs, or that panicked or showed the canary.
#[test]
fn the_judge_can_fail() {
    let e = parse_expect("# expect: exit=2 stderr~=\"extends\" not-pass=\"sshd-*\"").unwrap();
    let ok = Outcome {
        code: Some(2),
        stderr: "error: a.yml:1: extends: loop".into(),
        stdout: r#"{"results": [{"id": "sshd-x", "status": "error", "evidence": []}]}"#.into(),
        ..Default::default()
    };
    assert!(judge(&e, &ok, "canary0").is_empty());
    let cases = [
        Outcome {
            stderr: "error: something else".into(),
            ..ok.clone()
        },
        Outcome {
            code: Some(0),
            ..ok.clone()
        },
        Outcome {
            stderr: format!("{}\nthread 'main' panicked at x", ok.stderr),
            ..ok.clone()
        },
        Outcome {
            stdout: ok.stdout.replace("error", "pass"),
            ..ok.clone()
        },
        Outcome {
            stderr: format!("{} canary0", ok.stderr),
            ..ok.clone()
        },
        Outcome {
            timed_out: true,
            ..ok.clone()
        },
    ];
    for o in cases {
        assert!(!judge(&e, &o, "canary0").is_empty(), "{o:?}");
    }
    assert!(parse_expect("exit=2").is_err());
    assert!(parse_expect("# expect: exit=2 stderr~=\"open").is_err());
    assert!(glob_match("sshd-*", "sshd-no-root-login"));
    assert!(!glob_match("sshd-*", "fs-tmp"));
    assert_eq!(unescape(r"a\xffb\n"), b"a\xffb\n");
}
