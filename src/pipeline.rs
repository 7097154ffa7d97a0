//! `stemforge build`: plan → preflight → bootstrap → stages → disk → scan →
//! formats → verify, each a named, timed step.

use crate::bootstrap::{self, BootstrapSpec, MirrorOverrides};
use crate::cache::{Cache, Hit, Lock};
use crate::chroot::Chroot;
use crate::config::{ConfigError, format_size, locate};
use crate::disk::{self, DiskPlan};
use crate::exec;
use crate::formats::{self, Artifact, Format};
use crate::fsutil;
use crate::osimage;
use crate::profile::{self, Profile, ProfileSource};
use crate::progress::{self, Steps};
use crate::scan::{self, Report, ScanContext, Selection, target::Target};
use crate::stage::{Catalog, StageSource};
use crate::verify::{self, Accel, Verdict, VerifyOptions};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub profile: String,
    pub profiles: ProfileSource,
    pub stages: StageSource,
    pub mirror: Option<String>,
    /// `SUITE=URL` pairs from `--suite-mirror`.
    pub suite_mirrors: Vec<String>,
    pub out_dir: PathBuf,
    pub name: Option<String>,
    /// `--format` words; `None`: the profile's formats.
    pub formats: Option<Vec<String>>,
    /// The image's version (stemcells, SBOMs, OVF); default: the date of
    /// SOURCE_DATE_EPOCH as YYYYMMDD.
    pub image_version: Option<String>,
    pub verify: bool,
    /// Boot even when the disk is the one a cached verdict proved
    /// (`--verify always`).
    pub reverify: bool,
    /// Reuse and keep layers, disks and formats in the cache; off: made
    /// afresh in the work directory (the bootstrap is shared still).
    pub layer_cache: bool,
    pub dry_run: bool,
    pub cache_dir: PathBuf,
    pub keep_work: bool,
    pub firmware: Option<String>,
    pub accel: Accel,
    pub timeout: Option<u64>,
    pub vm_def: Option<PathBuf>,
    pub agent_binary: Option<PathBuf>,
    /// A BOSH agent to install (`--bosh-agent`).
    pub bosh_agent: Option<PathBuf>,
    /// `--role-input NAME=FILE`
    pub role_inputs: Vec<(String, PathBuf)>,
    /// "Now" for every output; `None`: SOURCE_DATE_EPOCH, else the clock.
    pub source_date_epoch: Option<i64>,
}

/// Everything decided before any work starts.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub name: String,
    pub profile: Profile,
    #[serde(skip)]
    pub catalog: Catalog,
    pub stages: Vec<String>,
    pub skipped_stages: Vec<(String, String)>,
    pub controls: usize,
    pub bootstrap: BootstrapSpec,
    pub disk: DiskPlan,
    pub formats: Vec<Format>,
    pub version: String,
    /// Seconds since the epoch that stand for "now" in every output.
    pub source_date_epoch: i64,
    /// SHA-256 over the profile, the stages, the bootstrap spec and the
    /// stemforge version (the archive's state adds to it at build time).
    pub input_hash: String,
    pub verify: bool,
    pub out_dir: PathBuf,
    pub outputs: Vec<PathBuf>,
    pub agent_binary: PathBuf,
    pub agent_static: Option<bool>,
    /// The BOSH agent file and how manifests name it.
    pub bosh_agent: Option<(PathBuf, String)>,
    /// The roles' inputs, checked.
    pub role_inputs: Vec<crate::roles::RoleInput>,
}

/// The command line's mirrors, checked: URLs, and suites the profile has.
fn mirror_overrides(o: &BuildOptions, p: &Profile) -> Result<MirrorOverrides> {
    let url_ok = |u: &str| u.starts_with("http://") || u.starts_with("https://");
    if let Some(m) = &o.mirror {
        if !url_ok(m) {
            return Err(ConfigError::new(
                "--mirror",
                format!("`{m}` must be an http:// or https:// URL"),
            )
            .into());
        }
    }
    let mut suites = std::collections::BTreeMap::new();
    for pair in &o.suite_mirrors {
        let Some((suite, url)) = pair.split_once('=') else {
            return Err(
                ConfigError::new("--suite-mirror", format!("`{pair}`: write SUITE=URL")).into(),
            );
        };
        if !p.bootstrap.suites.iter().any(|s| s == suite) {
            return Err(ConfigError::new(
                "--suite-mirror",
                format!(
                    "profile {} has no suite `{suite}` (suites: {})",
                    p.name,
                    p.bootstrap.suites.join(", ")
                ),
            )
            .into());
        }
        if !url_ok(url) {
            return Err(ConfigError::new(
                "--suite-mirror",
                format!("`{url}` must be an http:// or https:// URL"),
            )
            .into());
        }
        suites.insert(suite.to_string(), url.to_string());
    }
    Ok(MirrorOverrides {
        default: o.mirror.clone(),
        suites,
    })
}

/// Load and check everything; touch nothing. Errors here are the user's
/// input ([`ConfigError`]).
pub fn plan(o: &BuildOptions) -> Result<Plan> {
    let profile = profile::load(&o.profile, &o.profiles)?;
    let catalog = Catalog::load(&o.stages)?;
    let known = catalog.known_roles();
    for r in &profile.roles {
        if !known.contains(r) {
            let file = profile.sources[0].clone();
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let line = locate(&text, r"^roles:", 1);
            let known_list = if known.is_empty() {
                "none yet".to_string()
            } else {
                known.iter().cloned().collect::<Vec<_>>().join(", ")
            };
            return Err(ConfigError::new(
                file,
                format!("unknown role `{r}` (stages know: {known_list})"),
            )
            .with_line(line)
            .with_key("roles")
            .into());
        }
    }
    if let Some((a, b, why)) = crate::roles::conflict(&profile.roles) {
        let file = profile.sources[0].clone();
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        return Err(ConfigError::at(
            file,
            &text,
            "roles",
            r"^roles:",
            format!("roles `{a}` and `{b}` exclude each other: {why}"),
        )
        .into());
    }
    let role_inputs =
        crate::roles::check_all(&profile.roles, &profile.role_inputs, &o.role_inputs)?;
    let name = o.name.clone().unwrap_or_else(|| profile.name.clone());
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(ConfigError::new(
            "--name",
            format!("`{name}`: use letters, digits, '.', '_' and '-'"),
        )
        .into());
    }
    let applicable = catalog.applicable(&profile.os.distro, &profile.os.codename, &profile.roles);
    let stages: Vec<String> = applicable.iter().map(|s| s.dir_name.clone()).collect();
    let skipped_stages = catalog
        .stages
        .iter()
        .filter(|s| !stages.contains(&s.dir_name))
        .map(|s| (s.dir_name.clone(), s.when.describe()))
        .collect();
    let controls = applicable.iter().map(|s| s.controls.len()).sum();
    // The bootstrap carries the profile's packages only: each stage's
    // layer installs its own, so editing a stage's package list reruns
    // that stage's layer and the ones above it, nothing beneath; every
    // role of an OS shares one bootstrap.
    let packages = profile.package_set(&[]);
    let mirrors = mirror_overrides(o, &profile)?;
    let spec = BootstrapSpec::new(
        &profile,
        &mirrors,
        packages,
        osimage::seed_files(&applicable),
    );
    let formats = match &o.formats {
        Some(words) => Format::parse_list(words, "--format")?,
        None => profile.formats.clone(),
    };
    let source_date_epoch = match o.source_date_epoch {
        Some(e) => e,
        None => source_date_epoch()?,
    };
    let bosh_agent = match &o.bosh_agent {
        Some(f) => Some((f.clone(), crate::boshagent::check(f)?)),
        None => None,
    };
    let version = match &o.image_version {
        Some(v) => check_version(v)?,
        None => chrono::DateTime::from_timestamp(source_date_epoch, 0)
            .context("SOURCE_DATE_EPOCH out of range")?
            .format("%Y%m%d")
            .to_string(),
    };
    let input_hash = formats::manifest::hash_json(&serde_json::json!({
        "stemforge": crate::VERSION,
        "profile": &profile,
        "stages": applicable.iter().map(|s| (&s.dir_name, &s.digest)).collect::<Vec<_>>(),
        "bootstrap": &spec,
        "version": &version,
        "epoch": source_date_epoch,
        "bosh_agent": bosh_agent.as_ref().map(|(_, v)| v),
        "role_inputs": &role_inputs,
    }));
    let disk = disk::plan(&profile, &input_hash, source_date_epoch);
    let mut outputs: Vec<PathBuf> = formats
        .iter()
        .flat_map(|f| {
            let os = format!("{}-{}", profile.os.distro, profile.os.codename);
            formats::producer(*f).files_for(&name, &version, &os)
        })
        .map(|f| o.out_dir.join(f))
        .collect();
    for suffix in [
        "offline-scan.json",
        "steps.json",
        "build.log",
        "manifest.json",
        "SHA256SUMS",
    ] {
        outputs.push(o.out_dir.join(format!("{name}.{suffix}")));
    }
    if o.verify {
        // One set per boot (see `boots`): the first keeps the plain names.
        let mut sets = vec![""];
        let made = Format::closure(&formats);
        if made.contains(&Format::Vmdk) {
            sets.push(".vsphere");
        }
        if made.contains(&Format::Aws) {
            sets.push(".aws");
        }
        for set in sets {
            for suffix in VERIFY_REPORTS {
                outputs.push(o.out_dir.join(format!("{name}{set}.{suffix}")));
            }
        }
    }
    let agent_binary = match &o.agent_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating the stemforge binary")?,
    };
    let agent_static = is_static_elf(&agent_binary);
    Ok(Plan {
        name,
        profile,
        catalog,
        stages,
        skipped_stages,
        controls,
        bootstrap: spec,
        disk,
        formats,
        version,
        source_date_epoch,
        input_hash,
        verify: o.verify,
        out_dir: o.out_dir.clone(),
        outputs,
        agent_binary,
        agent_static,
        bosh_agent,
        role_inputs,
    })
}

impl Plan {
    /// The plan as `--dry-run` prints it.
    pub fn render(&self) -> String {
        let p = &self.profile;
        let b = &self.bootstrap;
        let mut s = format!(
            "Build plan for {} ({})\n\nprofile     {} ({})\nOS          {} {} ({})\nvariant     {}\nkeyring     {}\nsources\n",
            self.name,
            p.description,
            p.name,
            p.sources
                .iter()
                .map(|s| s.display().to_string())
                .collect::<Vec<_>>()
                .join(" <- "),
            p.os.distro,
            p.os.version,
            p.os.codename,
            b.variant,
            b.keyring,
        );
        for src in &b.sources {
            s.push_str(&format!("  {}\n", src.deb_line(&b.keyring)));
        }
        s.push_str(&format!(
            "kernel      {}\npackages    {} in the bootstrap's one apt run:\n",
            p.kernel,
            b.packages.len()
        ));
        s.push_str(&wrap(&b.packages.join(" "), 76, "  "));
        s.push_str(&format!(
            "roles       {}\nstages      {} applied, {} controls\n",
            if p.roles.is_empty() {
                "none".to_string()
            } else {
                p.roles.join(", ")
            },
            self.stages.len(),
            self.controls
        ));
        for st in self
            .catalog
            .stages
            .iter()
            .filter(|st| self.stages.contains(&st.dir_name))
        {
            let install = st.packages.install_for(&p.os.distro, &p.os.codename);
            let install: Vec<&String> =
                install.iter().filter(|x| !b.packages.contains(x)).collect();
            if !install.is_empty() {
                s.push_str(&format!(
                    "  {} installs in its layer: {}\n",
                    st.dir_name,
                    install
                        .iter()
                        .map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
        }
        for i in &self.role_inputs {
            s.push_str(&format!(
                "  input {}={} ({}, sha256 {})\n",
                i.name,
                i.file.display(),
                i.role,
                &i.sha256[..16]
            ));
        }
        for st in &self.stages {
            s.push_str(&format!("  {st}\n"));
        }
        for (st, when) in &self.skipped_stages {
            s.push_str(&format!("  {st} (skipped: applies to {when})\n"));
        }
        s.push_str(&format!("disk        {}", self.disk.describe()));
        s.push_str(&format!(
            "boot        UEFI, GRUB from the image's modules; cmdline: {}\n",
            p.boot.cmdline.join(" ")
        ));
        s.push_str(&format!(
            "formats     {}\nverify      {}\nscanner     {}{}\noutputs\n",
            self.formats.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "),
            if self.verify { "boot under QEMU + OVMF and scan inside" } else { "no (--no-verify)" },
            self.agent_binary.display(),
            match self.agent_static {
                Some(true) => " (static)",
                Some(false) => " (dynamic: the image must have this host's glibc or newer; `make build` makes a static one)",
                None => "",
            }
        ));
        for o in &self.outputs {
            s.push_str(&format!("  {}\n", o.display()));
        }
        s
    }
}

fn wrap(text: &str, width: usize, indent: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for w in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + w.len() > width {
            out.push_str(&format!("{indent}{line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    if !line.is_empty() {
        out.push_str(&format!("{indent}{line}\n"));
    }
    out
}

/// SOURCE_DATE_EPOCH from the environment, else the start of today (UTC):
/// every time in the image is this one, so rebuilds within a day reuse
/// the cached layers (set SOURCE_DATE_EPOCH, e.g. to the commit's time,
/// to reuse them across days). ext4 keeps 32-bit seconds in the fields
/// every reader knows, so that is the range.
fn source_date_epoch() -> Result<i64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => match v.trim().parse::<i64>() {
            Ok(e) if (0..=u32::MAX as i64).contains(&e) => Ok(e),
            _ => Err(ConfigError::new(
                "SOURCE_DATE_EPOCH",
                format!("`{v}` is not a number of seconds from 1970 to 2106"),
            )
            .into()),
        },
        Err(_) => {
            let now = chrono::Utc::now().timestamp();
            Ok(now - now.rem_euclid(86_400))
        }
    }
}

/// An image version: what BOSH and file names accept.
fn check_version(v: &str) -> Result<String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c));
    if !ok {
        return Err(ConfigError::new(
            "--image-version",
            format!("`{v}`: use letters, digits, '.', '-' and '+'"),
        )
        .into());
    }
    Ok(v.to_string())
}

/// Whether an ELF file is statically linked (no PT_INTERP).
pub fn is_static_elf(path: &Path) -> Option<bool> {
    let b = std::fs::read(path).ok()?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return None;
    }
    let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().ok()?) as usize;
    let (phentsize, phnum) = (u16at(0x36), u16at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let t = u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?);
        if t == 3 {
            return Some(false);
        }
    }
    Some(true)
}

/// A failed preflight: every problem found, each with what to do.
#[derive(Debug, thiserror::Error)]
#[error("preflight failed:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct PreflightError(pub Vec<String>);

/// Check, in seconds, everything a long build would otherwise find out
/// late: root, host tools, disk space, firmware, the mirrors. Returns the
/// mirrors' Release files (they key the bootstrap cache).
pub fn preflight(o: &BuildOptions, plan: &Plan) -> Result<Vec<Vec<u8>>> {
    let mut problems = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        problems.push("not running as root: building needs root (chroot, file ownership in the image); run it with sudo".to_string());
    }
    // The table `make deps` installs from, so the two cannot drift. Its
    // files (firmware, keyrings) are checked where they are used.
    const HOST_TOOLS: &str = include_str!("../scripts/host-tools.tsv");
    let tools = HOST_TOOLS
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some((f.next()?, f.next()?, f.next()?))
        })
        .filter(|(tool, _, when)| {
            !tool.starts_with('/') && (*when == "always" || (*when == "verify" && plan.verify))
        });
    for (tool, pkg, _) in tools {
        if exec::which(tool).is_none() {
            problems.push(format!(
                "{tool} not found: apt-get install {pkg} (`make deps` installs everything)"
            ));
        }
    }
    if !Path::new(&plan.bootstrap.keyring).is_file() {
        let hint = if plan.profile.os.distro == "ubuntu" {
            "apt-get install ubuntu-keyring (Ubuntu hosts; elsewhere copy the file from an Ubuntu system)"
        } else {
            "apt-get install debian-archive-keyring"
        };
        problems.push(format!(
            "keyring {} not found: {hint}",
            plan.bootstrap.keyring
        ));
    }
    let need_out: u64 = 6 << 30;
    match fsutil::free_space(&o.out_dir) {
        Ok(free) if free < need_out => problems.push(format!(
            "{} has {} free; a build needs about {}",
            o.out_dir.display(),
            format_size(free),
            format_size(need_out)
        )),
        Ok(_) => {}
        Err(e) => problems.push(format!("{e:#}")),
    }
    match fsutil::free_space(&o.cache_dir) {
        Ok(free) if free < (2 << 30) => problems.push(format!(
            "cache {} has {} free; a bootstrapped tree needs about 2GiB (--cache-dir elsewhere?)",
            o.cache_dir.display(),
            format_size(free)
        )),
        Ok(_) => {}
        Err(e) => problems.push(format!("{e:#}")),
    }
    if plan.agent_static == Some(false) {
        progress::warn(
            "the scanner placed in the image is dynamically linked; it runs only where the image's glibc is at least the build host's",
        );
    }
    // The mirrors, all at once.
    let handles: Vec<_> = plan
        .bootstrap
        .sources
        .iter()
        .cloned()
        .map(|s| std::thread::spawn(move || bootstrap::fetch_release(&s)))
        .collect();
    let mut releases = Vec::new();
    for h in handles {
        match h
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("mirror check panicked")))
        {
            Ok(r) => releases.push(r),
            Err(e) => {
                // One line per unreachable mirror, however many suites it serves.
                let p = format!("{e:#}");
                if !problems.contains(&p) {
                    problems.push(p);
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(PreflightError(problems).into());
    }
    Ok(releases)
}

/// What a build produced.
#[derive(Debug)]
pub struct Built {
    pub artifacts: Vec<Artifact>,
    pub offline: Report,
    /// One verification boot per bootable output (none with --no-verify).
    pub verdicts: Vec<Verdict>,
    pub steps: Steps,
    pub plan: Plan,
}

impl Built {
    pub fn passed(&self) -> bool {
        self.offline.passed() && self.verdicts.iter().all(|v| v.passed)
    }
}

/// Run the whole build. `Ok(None)` for a dry run (the plan is printed).
pub fn build(o: &BuildOptions) -> Result<Option<Built>> {
    let mut steps = Steps::new();
    let plan = steps.run("plan", |_| plan(o))?;
    if o.dry_run {
        print!("{}", plan.render());
        return Ok(None);
    }
    let releases = steps.run("preflight", |_| preflight(o, &plan))?;

    std::fs::create_dir_all(&o.out_dir)
        .with_context(|| format!("creating {}", o.out_dir.display()))?;
    // One build per output directory: a second one refuses at once
    // rather than wait, or clear the first one's outputs under it.
    let lock_path = o.out_dir.join(".stemforge.lock");
    let Some(out_lock) = Lock::try_acquire(&lock_path)? else {
        let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
        return Err(ConfigError::new(
            "--out",
            format!(
                "{} is in use by another build ({}); wait for it or choose another --out",
                o.out_dir.display(),
                if holder.trim().is_empty() {
                    "unknown"
                } else {
                    holder.trim()
                }
            ),
        )
        .into());
    };
    out_lock.note(&format!(
        "pid {}, profile {}",
        std::process::id(),
        plan.profile.name
    ))?;
    let work_base = o.out_dir.join(".work");
    let work = work_base.join(&plan.name);
    // A killed build's tree: nothing is mounted in it (mounts live in
    // namespaces that died with it), so it can go.
    fsutil::remove_tree(&work)?;
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // This build's outputs from an earlier one, finished or cut short, go
    // first, and every output of the profile's that a killed build left
    // half-written: after a failure or a kill, every output there is whole
    // and of this build.
    for p in stale_outputs(&plan, &o.out_dir, true) {
        fsutil::remove_tree(&p)?;
    }
    if !o.keep_work {
        crate::interrupt::remove_on_forced_stop(work.clone());
    }
    for p in stale_outputs(&plan, &o.out_dir, false) {
        crate::interrupt::remove_on_forced_stop(p);
    }
    // The layers are overlay mounts: in a namespace of the build's own,
    // gone with it however it ends.
    crate::layers::private_mounts()?;
    let log = o.out_dir.join(format!("{}.build.log", plan.name));
    let _ = std::fs::remove_file(&log);
    progress::set_log_file(&log)?;
    progress::detail(&plan.render());

    let result = run_steps(o, &plan, &releases, &work, &mut steps);
    // A failure on a (nearly) full disk says which disk.
    let result = result.map_err(|e| {
        for dir in [&o.out_dir, &o.cache_dir] {
            if let Ok(free) = fsutil::free_space(dir) {
                if free < (256 << 20) {
                    return e.context(format!(
                        "disk full: {} has {} free",
                        dir.display(),
                        format_size(free)
                    ));
                }
            }
        }
        e
    });
    let summary = steps.summary_table();
    progress::info(&format!("\n{summary}"));
    let steps_json = serde_json::to_string_pretty(&steps.to_json())? + "\n";
    let written = fsutil::write_atomic(
        &o.out_dir.join(format!("{}.steps.json", plan.name)),
        steps_json.as_bytes(),
    );
    // A failed step's error is the one to report (on a full disk the step
    // times cannot be written either).
    match (written, &result) {
        (Err(e), Ok(_)) => return Err(e),
        (Err(e), Err(_)) => progress::warn(&format!("{e:#}")),
        (Ok(()), _) => {}
    }
    progress::close_log_file();
    if result.is_ok() || !o.keep_work {
        if o.keep_work {
            progress::info(&format!("work tree kept at {}", work.display()));
        } else {
            fsutil::remove_tree(&work)?;
        }
    }
    if result.is_err() {
        // Nothing half-written stays under a name that looks finished.
        for p in stale_outputs(&plan, &o.out_dir, false) {
            fsutil::remove_tree(&p)?;
        }
    }
    drop(out_lock);
    let (artifacts, offline, verdicts) = result?;
    Ok(Some(Built {
        artifacts,
        offline,
        verdicts,
        steps,
        plan,
    }))
}

/// The reports of one verification boot; a boot's set is `NAME.SUFFIX`,
/// `NAME.vsphere.SUFFIX` or `NAME.aws.SUFFIX` (see `boots`).
const VERIFY_REPORTS: [&str; 3] = ["console.log", "scan.json", "verify.json"];

/// Outputs of this build an earlier build may have left: under temporary
/// names (every output and verification report of the profile's), and
/// with `finished`, this build's outputs under their final names too.
fn stale_outputs(plan: &Plan, out_dir: &Path, finished: bool) -> Vec<PathBuf> {
    let os = format!("{}-{}", plan.profile.os.distro, plan.profile.os.codename);
    let name = &plan.name;
    let reports = ["", ".vsphere", ".aws"]
        .into_iter()
        .flat_map(|set| VERIFY_REPORTS.map(|suffix| format!("{name}{set}.{suffix}")));
    let half_written = Format::ALL
        .iter()
        .flat_map(|f| formats::producer(*f).files_for(name, &plan.version, &os))
        .chain(reports)
        .map(|n| fsutil::partial_path(&out_dir.join(n)));
    plan.outputs
        .iter()
        .flat_map(|out| {
            let mut v = vec![fsutil::partial_path(out)];
            if finished {
                v.push(out.clone());
            }
            v
        })
        .chain(half_written)
        .collect()
}

type StepsOutcome = (Vec<Artifact>, Report, Vec<Verdict>);

fn run_steps(
    o: &BuildOptions,
    plan: &Plan,
    releases: &[Vec<u8>],
    work: &Path,
    steps: &mut Steps,
) -> Result<StepsOutcome> {
    let cache = match o.layer_cache {
        true => Cache::new(&o.cache_dir),
        false => Cache::new(&o.cache_dir).with_private_layers(&work.join("private-cache")),
    };
    formats::manifest::remember_hashes_in(&cache.hash_memo_dir());
    let epoch = plan.source_date_epoch;
    // `_in_use` keeps the cache entry from being pruned by another build
    // while this one reads it.
    let (base, bootstrap_key, _in_use) = steps.run("bootstrap", |s| {
        let (base, hit, key, lock) = bootstrap::bootstrap(&cache, &plan.bootstrap, releases)?;
        s.note(match hit {
            Hit::Hit => "cache hit",
            Hit::Miss => "cache miss",
        });
        progress::detail(&format!("bootstrapped tree: {}", base.display()));
        Ok((base, key, lock))
    })?;
    let mnt = work.join("rootfs");
    let (stack, _view) = steps.run("stages", |s| {
        let stack = layers_of(o, plan, &cache, &base, &bootstrap_key, &mnt)?;
        let view = stack.view(&work.join("scratch"))?;
        let (made, found) = stack.counts();
        s.note(format!(
            "{} stages; layers: {made} made, {found} from the cache",
            plan.stages.len()
        ));
        Ok((stack, view))
    })?;
    let chroot = Chroot::new(&mnt)?.with_epoch(epoch);
    let tree = mnt.clone();
    let raw_partial = work.join(format!("{}.raw", plan.name));
    let disk_key = crate::reuse::key(
        "disk",
        &serde_json::json!({"tree": stack.key(), "plan": &plan.disk, "profile": &plan.profile}),
    );
    let (disk, _disk_in_use) = steps.run("disk", |s| {
        let (meta, hit, lock) = crate::reuse::disk(&cache, &disk_key, &raw_partial, |raw| {
            let r = disk::assemble(&chroot, &plan.profile, &plan.disk, work, raw)?;
            Ok((r.kernel, r.sha256))
        })?;
        s.note(format!(
            "kernel {}{}",
            meta.kernel,
            if hit == Hit::Hit { ", cache hit" } else { "" }
        ));
        Ok((meta, lock))
    })?;
    let offline = steps.run("scan", |s| {
        let target = Target::root(&tree)?;
        let ctx = ScanContext::detect(&target, None);
        let report = scan::run(&plan.catalog, &target, &ctx, &Selection::default());
        fsutil::write_atomic(
            &o.out_dir.join(format!("{}.offline-scan.json", plan.name)),
            scan::report::render_json(&report).as_bytes(),
        )?;
        s.note(format!(
            "{} pass, {} fail, {} n/a",
            report.summary.pass, report.summary.fail, report.summary.not_applicable
        ));
        Ok(report)
    })?;
    if !offline.passed() {
        let _ = std::fs::remove_file(&raw_partial);
        let failing: Vec<String> = offline
            .problems()
            .map(|r| {
                format!(
                    "  {} {}: {}",
                    r.status.as_str().to_uppercase(),
                    r.id,
                    r.evidence.join("; ")
                )
            })
            .collect();
        progress::info(&format!(
            "the image fails {} of its own controls (report: {}):\n{}",
            failing.len(),
            o.out_dir
                .join(format!("{}.offline-scan.json", plan.name))
                .display(),
            failing.join("\n")
        ));
        return Ok((Vec::new(), offline, Vec::new()));
    }
    let closure = Format::closure(&plan.formats);
    let formats_key = crate::reuse::key(
        "formats",
        &serde_json::json!({
            "disk": &disk_key,
            "formats": &closure,
            "wanted": &plan.formats,
            "name": &plan.name,
            "version": &plan.version,
            "epoch": epoch,
            "input_hash": &plan.input_hash,
            "bosh_agent": plan.bosh_agent.as_ref().map(|(_, v)| v),
        }),
    );
    let (products, timings, _formats_in_use) = steps.run("formats", |s| {
        let (products, timings, hit, lock) =
            crate::reuse::formats(&cache, &formats_key, &o.out_dir, work, &raw_partial, || {
                let job = formats::Job {
                    name: &plan.name,
                    profile: &plan.profile,
                    version: &plan.version,
                    tree: &tree,
                    apt_lists: Some(&base.join("var/lib/apt/lists")),
                    disk: &raw_partial,
                    out_dir: &o.out_dir,
                    work,
                    wanted: &plan.formats.iter().copied().collect(),
                    epoch,
                    input_hash: &plan.input_hash,
                    bosh_agent: plan.bosh_agent.as_ref().map(|(_, v)| v.as_str()),
                };
                formats::produce_all(&job, &closure)
            })?;
        s.note(format!(
            "{} formats{}",
            closure.len(),
            if hit == Hit::Hit { ", cache hit" } else { "" }
        ));
        Ok((products, timings, lock))
    })?;
    for t in &timings {
        steps.record_sub(t.format.name(), t.seconds, &t.note);
    }
    let artifacts: Vec<Artifact> = products
        .iter()
        .filter(|(f, _)| plan.formats.contains(f))
        .flat_map(|(_, v)| v.iter().cloned())
        .collect();
    let verdicts = if o.verify {
        let boots = boots(&products, &plan.profile.boot);
        steps.run("verify", |s| {
            let qemu = verify::qemu_version();
            let mut verdicts = Vec::new();
            for (image, boot_as, firmware, name) in boots {
                let report_name = format!("{}{name}", plan.name);
                let verdict_key = crate::reuse::key(
                    "verdict",
                    &serde_json::json!({
                        "disk_sha256": &disk.sha256,
                        "image": image.extension().map(|e| e.to_string_lossy().into_owned()),
                        "boot_as": boot_as,
                        "firmware": firmware,
                        "name": &report_name,
                        "qemu": &qemu,
                    }),
                );
                if !o.reverify {
                    if let Some(v) = crate::reuse::cached_verdict(
                        &cache,
                        &verdict_key,
                        &disk.sha256,
                        &o.out_dir,
                        &report_name,
                    )? {
                        progress::info(&format!(
                            "    {} as {:?} with {}: the disk is bit for bit the one verified before; verdict reused (--verify always boots it again)",
                            image.display(),
                            boot_as,
                            firmware.name()
                        ));
                        s.note(format!("{:?}/{} passed, reused", boot_as, firmware.name()));
                        verdicts.push(v);
                        continue;
                    }
                }
                progress::info(&format!(
                    "    booting {} as {:?} with {}",
                    image.display(),
                    boot_as,
                    firmware.name()
                ));
                let v = verify::verify(&VerifyOptions {
                    image,
                    out_dir: o.out_dir.clone(),
                    name: report_name.clone(),
                    vm: verify::VmChoice {
                        firmware: o.firmware.clone(),
                        accel: o.accel,
                        vm_def: o.vm_def.clone(),
                        cache_dir: o.cache_dir.clone(),
                    },
                    timeout: o.timeout,
                    boot_as,
                    firmware,
                })?;
                if v.passed {
                    crate::reuse::keep_verdict(&cache, &verdict_key, &o.out_dir, &report_name)?;
                }
                s.note(format!(
                    "{:?}/{} {}{}",
                    boot_as,
                    firmware.name(),
                    if v.passed { "passed" } else { "FAILED" },
                    v.boot_seconds
                        .map(|b| format!(" in {b:.0} s"))
                        .unwrap_or_default()
                ));
                verdicts.push(v);
            }
            Ok(verdicts)
        })?
    } else {
        steps.skip("verify", "--verify never");
        Vec::new()
    };
    steps.run("manifest", |s| {
        let (manifest, _) = write_manifest(o, plan, &tree, bootstrap_key, &artifacts)?;
        s.note(format!("{} files", artifacts.len()));
        progress::detail(&format!("manifest: {}", manifest.display()));
        Ok(())
    })?;
    if o.keep_work {
        progress::activity("copying the image tree for --keep-work");
        fsutil::copy_tree(&tree, &work.join("tree"))?;
    }
    drop(stack);
    Ok((artifacts, offline, verdicts))
}

/// The image tree's layers: from the cache, or made (each on the ones
/// beneath it) where an input changed.
fn layers_of<'a>(
    o: &BuildOptions,
    plan: &Plan,
    cache: &'a Cache,
    base: &Path,
    base_key: &str,
    mnt: &Path,
) -> Result<crate::layers::Stack<'a>> {
    let epoch = plan.source_date_epoch;
    let chroot_at = |root: &Path| -> Result<Chroot> { Ok(Chroot::new(root)?.with_epoch(epoch)) };
    let mut stack = crate::layers::Stack::new(cache, base, base_key, mnt)?;
    let stages: Vec<&crate::stage::Stage> = plan
        .catalog
        .stages
        .iter()
        .filter(|st| plan.stages.contains(&st.dir_name))
        .collect();
    for (i, st) in stages.iter().enumerate() {
        let inputs = serde_json::json!({"position": i, "digest": &st.digest, "epoch": epoch});
        stack.push("stage", &st.dir_name, &inputs, |root| {
            let chroot = chroot_at(root)?;
            // The stage's own packages first, then its actions.
            let (missing, purge) = osimage::package_changes(root, &[st])?;
            osimage::prepare(&chroot, &missing, &purge)?;
            osimage::apply_stage(&chroot, st)
        })?;
    }
    let dirty = stack.layers.iter().any(|l| l.meta.initramfs_dirty);
    let info = osimage::image_info(&plan.profile, &plan.stages, epoch);
    let catalog_dir = match &o.stages {
        StageSource::Dir(d) => Some(d.as_path()),
        StageSource::Embedded => None,
    };
    let bosh_sha = match &plan.bosh_agent {
        Some((f, _)) => Some(formats::manifest::sha256_file(f)?),
        None => None,
    };
    let inputs = serde_json::json!({
        "agent": formats::manifest::sha256_file(&plan.agent_binary)?,
        "catalog": plan.catalog.stages.iter().map(|s| (&s.dir_name, &s.digest)).collect::<Vec<_>>(),
        "agent_files": verify::agent_files(),
        "role_inputs": &plan.role_inputs,
        "bosh_agent": bosh_sha,
        "info": &info,
        "initramfs": dirty,
        "disk": &plan.disk,
        "profile": &plan.profile,
    });
    stack.push("image", "image", &inputs, |root| {
        let chroot = chroot_at(root)?;
        crate::roles::apply_inputs(root, &plan.role_inputs)?;
        osimage::install_stemforge(
            root,
            &plan.agent_binary,
            catalog_dir,
            &verify::agent_files(),
            &info,
        )?;
        if let Some((file, _)) = &plan.bosh_agent {
            crate::boshagent::install(&chroot, file)?;
        }
        osimage::finalize(&chroot, dirty)?;
        disk::configure_tree(root, &plan.profile, &plan.disk)?;
        Ok(false)
    })?;
    Ok(stack)
}

/// What verify boots: the qcow2 on KVM's hardware (through Secure Boot
/// when the image is signed), the VMDK on vSphere's, the raw disk on AWS's
/// when the AWS output was made (with legacy BIOS when the disk is hybrid,
/// as on instance types without UEFI), or on KVM's when it is the only
/// disk. With the suffix of each boot's report files: the first keeps the
/// plain names.
fn boots(
    products: &formats::Products,
    boot: &crate::profile::Boot,
) -> Vec<(PathBuf, verify::BootAs, verify::BootFirmware, String)> {
    use verify::{BootAs, BootFirmware};
    let disk = |f: Format, ext: &str| {
        formats::input(products, f, ext)
            .ok()
            .map(|a| a.path.clone())
    };
    let uefi = if boot.secure_boot {
        BootFirmware::SecureBoot
    } else {
        BootFirmware::Uefi
    };
    let mut out: Vec<(PathBuf, BootAs, BootFirmware)> = Vec::new();
    out.extend(disk(Format::Qcow2, ".qcow2").map(|p| (p, BootAs::Kvm, uefi)));
    out.extend(disk(Format::Vmdk, ".vmdk").map(|p| (p, BootAs::Vsphere, BootFirmware::Uefi)));
    if let Some(raw) = disk(Format::Raw, ".raw") {
        if products.contains_key(&Format::Aws) {
            let fw = if boot.bios {
                BootFirmware::Bios
            } else {
                BootFirmware::Uefi
            };
            out.push((raw, BootAs::Aws, fw));
        } else if out.is_empty() {
            out.push((raw, BootAs::Kvm, uefi));
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, (p, b, f))| {
            let suffix = if i == 0 {
                String::new()
            } else {
                format!(".{}", format!("{b:?}").to_lowercase())
            };
            (p, b, f, suffix)
        })
        .collect()
}

/// `NAME.manifest.json` and `NAME.SHA256SUMS` over the outputs and the
/// reports beside them.
fn write_manifest(
    o: &BuildOptions,
    plan: &Plan,
    tree: &Path,
    bootstrap_key: String,
    artifacts: &[Artifact],
) -> Result<(PathBuf, PathBuf)> {
    use formats::manifest::{Inputs, Manifest, Named, SCHEMA, hash_json};
    let packages = formats::sbom::read_packages(tree, None)?
        .into_iter()
        .map(|p| {
            let key = if p.architecture == "all" || p.architecture == "amd64" {
                p.name
            } else {
                format!("{}:{}", p.name, p.architecture)
            };
            (key, p.version)
        })
        .collect();
    let stages = plan
        .catalog
        .stages
        .iter()
        .filter(|st| plan.stages.contains(&st.dir_name))
        .map(|st| Named {
            name: st.dir_name.clone(),
            sha256: st.digest.clone(),
        })
        .collect();
    let b = &plan.bootstrap;
    let inputs = Inputs {
        profile: Named {
            name: plan.profile.name.clone(),
            sha256: hash_json(&plan.profile),
        },
        stages,
        bootstrap_key,
        sources: b.sources.iter().map(|s| s.deb_line(&b.keyring)).collect(),
        keyring: b.keyring.clone(),
        packages,
        host_tools: formats::manifest::host_tools(),
        bosh_agent: plan
            .bosh_agent
            .as_ref()
            .map_or("none".into(), |(_, v)| v.clone()),
    };
    let manifest = Manifest {
        schema: SCHEMA,
        name: plan.name.clone(),
        version: plan.version.clone(),
        stemforge_version: crate::VERSION.to_string(),
        source_date_epoch: plan.source_date_epoch,
        input_hash: hash_json(&(&plan.input_hash, &inputs)),
        inputs,
        outputs: Vec::new(),
    };
    let mut files: Vec<(PathBuf, String)> = artifacts
        .iter()
        .map(|a| (a.path.clone(), a.format.name().to_string()))
        .collect();
    let report = |suffix: &str| o.out_dir.join(format!("{}.{suffix}", plan.name));
    files.push((report("offline-scan.json"), "report".into()));
    for suffix in ["scan.json", "verify.json", "console.log"] {
        if plan.verify && report(suffix).exists() {
            files.push((report(suffix), "report".into()));
        }
    }
    formats::manifest::write(&o.out_dir, manifest, &files)
}

/// Refuse an output directory that is a file, before anything is written.
pub fn check_out_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("--out {} exists and is not a directory", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(profile: &str) -> BuildOptions {
        BuildOptions {
            profile: profile.into(),
            profiles: ProfileSource::Embedded,
            stages: StageSource::Embedded,
            mirror: None,
            suite_mirrors: vec![],
            out_dir: "out".into(),
            name: None,
            formats: None,
            image_version: None,
            verify: true,
            reverify: false,
            layer_cache: true,
            dry_run: true,
            cache_dir: "/var/cache/stemforge".into(),
            keep_work: false,
            firmware: None,
            accel: Accel::Auto,
            timeout: None,
            vm_def: None,
            agent_binary: None,
            bosh_agent: None,
            role_inputs: Vec::new(),
            source_date_epoch: None,
        }
    }

    #[test]
    fn every_profile_plans_without_network() {
        for name in ProfileSource::Embedded.names().unwrap() {
            let p = plan(&opts(&name)).unwrap();
            let text = p.render();
            assert!(text.contains(&p.profile.kernel), "{text}");
            assert!(text.contains("/boot/efi"), "{text}");
            assert!(p.bootstrap.packages.contains(&"openssh-server".to_string()));
            assert!(p.bootstrap.packages.contains(&"auditd".to_string()));
            // A stage's packages install in its layer, not the bootstrap.
            assert!(!p.bootstrap.packages.contains(&"cloud-init".to_string()));
            assert!(
                text.contains("05-cloud installs in its layer: cloud-init"),
                "{text}"
            );
            assert!(p.controls >= 40);
            assert!(
                p.outputs
                    .iter()
                    .any(|o| o.ends_with(format!("{name}.qcow2")))
            );
        }
    }

    #[test]
    fn mirror_override_reaches_the_sources() {
        let mut o = opts("ubuntu-noble");
        o.mirror = Some("http://mirror.internal/ubuntu".into());
        let p = plan(&o).unwrap();
        assert_eq!(
            p.bootstrap.sources[0].mirror,
            "http://mirror.internal/ubuntu"
        );
        assert!(
            p.render()
                .contains("http://mirror.internal/ubuntu noble-updates main universe")
        );
    }

    #[test]
    fn suite_mirrors_are_checked() {
        let mut o = opts("debian-bookworm");
        o.suite_mirrors = vec!["bookworm-security=http://m/sec".into()];
        let p = plan(&o).unwrap();
        assert_eq!(p.bootstrap.sources[2].mirror, "http://m/sec");
        for bad in [
            "noble-security=http://m/x",
            "bookworm-security",
            "bookworm=ftp://m/x",
        ] {
            o.suite_mirrors = vec![bad.into()];
            let e = plan(&o).unwrap_err();
            assert!(e.downcast_ref::<ConfigError>().is_some(), "{bad}: {e}");
        }
        o.suite_mirrors = vec![];
        o.mirror = Some("mirror.internal/debian".into());
        assert!(plan(&o).is_err());
    }

    #[test]
    fn a_build_without_verify_still_clears_a_killed_verify_s_partial_reports() {
        let mut o = opts("debian-bookworm");
        o.verify = false;
        let p = plan(&o).unwrap();
        let stale = stale_outputs(&p, Path::new("out"), false);
        for n in [
            ".debian-bookworm.console.log.partial",
            ".debian-bookworm.aws.verify.json.partial",
            ".debian-bookworm.qcow2.partial",
        ] {
            assert!(stale.contains(&Path::new("out").join(n)), "{n}: {stale:?}");
        }
        assert!(!stale.contains(&Path::new("out").join("debian-bookworm.qcow2")));
    }

    #[test]
    fn bad_names_are_rejected() {
        let mut o = opts("debian-bookworm");
        o.name = Some("../x".into());
        assert!(plan(&o).is_err());
    }

    #[test]
    fn static_elf_detection() {
        assert_eq!(is_static_elf(Path::new("/bin/sh")), Some(false));
        assert_eq!(is_static_elf(Path::new("/etc/passwd")), None);
    }
}
